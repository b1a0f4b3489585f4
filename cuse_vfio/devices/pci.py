"""The PCI framework: one emulated PCI function as the hardware would be.

This is the device *below* vfio-pci: the config space a host kernel reads
with ``pci_read_config_*``, the BARs it maps, the interrupts it receives.
What user space sees through a device fd is :mod:`.vfio_pci`'s virtualized
view of it (``vfio_pci_config.c``); keeping the two apart is what lets that
module model the kernel's virtualization rule for rule.

Writing a device model
----------------------
Subclass :class:`PciDevice`, one file per model, reading top to bottom as
identity -> BARs and capabilities -> register handlers -> reset::

    @register_model("scratchpad")             # registry.py: topology files name it
    class Scratchpad(PciDevice):
        vendor_id, device_id = 0x1b36, 0x00f0
        class_code = 0xff0000
        interrupt_pin = 1                      # INTA; 0 = no INTx

        def __init__(self, name=None, **options):   # options: the topology entry's keys
            super().__init__(name, **options)
            self.ram = self.add_bar(0, RamBar(64 * 1024))          # plain memory: mmappable
            self.add_bar(2, MmioBar(4096, self.regs_read, self.regs_write))
            self.add_capability(MsiCapability(vectors=4, addr64=True))

        def regs_read(self, offset, size): ...          # naturally aligned 1/2/4/8 bytes
        def regs_write(self, offset, size, value): ...

        def reset(self): ...                   # explicit: the model's own state

* Identity: class attributes ``vendor_id``, ``device_id``, ``subsystem_vendor_id``,
  ``subsystem_id``, ``revision``, ``class_code`` (24 bits), ``interrupt_pin``.
  What firmware leaves (``firmware_command``, ``interrupt_line``, a BAR's
  ``address``) and ``command_wmask`` let a model look like a given machine.
* Reset: ``can_reset = True`` offers a device-specific function reset;
  ``ExpressCapability(flr=True)`` and ``PmCapability(no_soft_reset=False)``
  offer FLR and PM reset.  With any of them vfio-pci sets
  VFIO_DEVICE_FLAGS_RESET; without, VFIO_DEVICE_RESET is EINVAL, as for QEMU's
  edu.  A reset puts config space back to power-on and then calls ``reset()``.
* BARs: :class:`MmioBar` / :class:`IoBar` (register handlers, for registers
  with side effects: clients use pread/pwrite), :class:`RamBar` (plain memory in
  a memfd, :class:`SharedMemory`, offered for mmap whole, MSI-X table included,
  as 6.1 does); ``bits64`` / ``prefetchable``; :class:`Rom` for the expansion ROM.
* Capabilities: :class:`PmCapability`, :class:`MsiCapability`,
  :class:`MsixCapability` (table and PBA inside a BAR),
  :class:`ExpressCapability` (makes config space 4 KiB),
  :class:`VendorCapability`, and extended ones (:class:`ExtendedCapability`,
  :class:`VendorExtCapability`).  Each lands on the next free dword.
* Interrupts, one narrow helper: ``raise_irq(index, vector)`` /
  ``lower_irq(index)`` with the VFIO irq index (:class:`IrqIndex`); INTx is a
  level, MSI and MSI-X are messages; ``msi_enabled()`` / ``msix_enabled()``
  say what the host set up; ``signal_error()`` is the ERR index.  Masking,
  automasking and eventfds are vfio-pci's business (:class:`IrqSink`).
* DMA, the other: ``self.dma.read(iova, size)`` / ``self.dma.write(iova, data)``,
  through the container's IOMMU.  Nothing moves while bus mastering is off or
  no IOMMU is attached (:class:`DmaFault`), or when the IOMMU refuses (a
  VfioError with ``.reason``); each is a fault in the log.  Catch VfioError
  where the hardware would flag an error.
* Time: ``self.call_later(delay, fn)`` for work a real device does
  asynchronously; ``complete_pending()`` runs it now (``manual_time=True``
  makes tests deterministic).  Handlers, config hooks and deferred work all
  run under ``self.lock``.
* A handler or reset that raises fails that one access with EIO and a logged
  traceback; the device and the server live on.
"""

from __future__ import annotations

import collections
import enum
import errno
import fcntl
import logging
import mmap
import os
import threading
import weakref
from typing import Callable, Dict, List, Optional, Protocol

from ..errors import VfioError
from ..uapi import (
    VFIO_PCI_ERR_IRQ_INDEX,
    VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_REQ_IRQ_INDEX,
)

log = logging.getLogger(__name__)

# -- include/uapi/linux/pci_regs.h, the part this framework needs ------------
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_COMMAND_IO = 0x0001
PCI_COMMAND_MEMORY = 0x0002
PCI_COMMAND_MASTER = 0x0004
PCI_COMMAND_PARITY = 0x0040
PCI_COMMAND_SERR = 0x0100
PCI_COMMAND_INTX_DISABLE = 0x0400
PCI_STATUS = 0x06
PCI_STATUS_INTERRUPT = 0x0008
PCI_STATUS_CAP_LIST = 0x0010
PCI_STATUS_PARITY = 0x0100
PCI_STATUS_SIG_TARGET_ABORT = 0x0800
PCI_STATUS_REC_TARGET_ABORT = 0x1000
PCI_STATUS_REC_MASTER_ABORT = 0x2000
PCI_STATUS_SIG_SYSTEM_ERROR = 0x4000
PCI_STATUS_DETECTED_PARITY = 0x8000
PCI_STATUS_RW1C = (PCI_STATUS_PARITY | PCI_STATUS_SIG_TARGET_ABORT | PCI_STATUS_REC_TARGET_ABORT
                   | PCI_STATUS_REC_MASTER_ABORT | PCI_STATUS_SIG_SYSTEM_ERROR | PCI_STATUS_DETECTED_PARITY)
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BIST = 0x0F
PCI_BASE_ADDRESS_0 = 0x10
PCI_BASE_ADDRESS_5 = 0x24
PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_ROM_ADDRESS_ENABLE = 0x01
PCI_ROM_ADDRESS_MASK = 0xFFFFF800
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D
PCI_STD_HEADER_SIZEOF = 64
PCI_CFG_SPACE_SIZE = 256
PCI_CFG_SPACE_EXP_SIZE = 4096
PCI_STD_NUM_BARS = 6

PCI_CAP_LIST_ID = 0
PCI_CAP_LIST_NEXT = 1
PCI_CAP_FLAGS = 2

PCI_CAP_ID_PM = 0x01
PCI_CAP_ID_MSI = 0x05
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11

PCI_PM_PMC = 2
PCI_PM_CTRL = 4
PCI_PM_CTRL_STATE_MASK = 0x0003
PCI_PM_CTRL_NO_SOFT_RESET = 0x0008
PCI_PM_CAP_PME_MASK = 0xF800
PCI_PM_SIZEOF = 8
PCI_D0, PCI_D3HOT = 0, 3

PCI_MSI_FLAGS = 2
PCI_MSI_FLAGS_ENABLE = 0x0001
PCI_MSI_FLAGS_QMASK = 0x000E
PCI_MSI_FLAGS_QSIZE = 0x0070
PCI_MSI_FLAGS_64BIT = 0x0080
PCI_MSI_FLAGS_MASKBIT = 0x0100
PCI_MSI_ADDRESS_LO = 4
PCI_MSI_ADDRESS_HI = 8
PCI_MSI_DATA_32 = 8
PCI_MSI_MASK_32 = 12
PCI_MSI_PENDING_32 = 16
PCI_MSI_DATA_64 = 12
PCI_MSI_MASK_64 = 16
PCI_MSI_PENDING_64 = 20

PCI_MSIX_FLAGS = 2
PCI_MSIX_FLAGS_QSIZE = 0x07FF
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_TABLE = 4
PCI_MSIX_PBA = 8
PCI_MSIX_TABLE_BIR = 0x7
PCI_MSIX_ENTRY_SIZE = 16
PCI_MSIX_ENTRY_VECTOR_CTRL = 12
PCI_MSIX_ENTRY_CTRL_MASKBIT = 0x1
PCI_CAP_MSIX_SIZEOF = 12

PCI_EXP_FLAGS = 2
PCI_EXP_FLAGS_TYPE = 0x00F0
PCI_EXP_TYPE_ENDPOINT = 0x0
PCI_EXP_TYPE_RC_END = 0x9
PCI_EXP_DEVCAP = 4
PCI_EXP_DEVCAP_FLR = 0x10000000
PCI_EXP_DEVCTL = 8
PCI_EXP_DEVCTL_PHANTOM = 0x0200
PCI_EXP_DEVCTL_BCR_FLR = 0x8000
PCI_EXP_DEVSTA = 10
PCI_EXP_DEVCTL2 = 0x28
PCI_CAP_EXP_ENDPOINT_SIZEOF_V2 = 0x3C

PCI_EXT_CAP_ID_VNDR = 0x0B


class IrqIndex(enum.IntEnum):
    """What a model raises, named as VFIO numbers the interrupt indexes of vfio-pci."""

    INTX = VFIO_PCI_INTX_IRQ_INDEX
    MSI = VFIO_PCI_MSI_IRQ_INDEX
    MSIX = VFIO_PCI_MSIX_IRQ_INDEX
    ERR = VFIO_PCI_ERR_IRQ_INDEX
    REQ = VFIO_PCI_REQ_IRQ_INDEX


class IrqSink(Protocol):
    """Where a function's interrupts go: the interrupt controller, played by vfio-pci.

    The function calls it with its lock held; a sink must not call back into
    the model's register handlers.
    """

    def intx_line(self, asserted: bool) -> None:
        """The INTx line changed level (after the function's INTx-disable bit)."""

    def msi_message(self, index: "IrqIndex", vector: int) -> None:
        """An MSI or MSI-X message for ``vector`` left the function (enabled and unmasked)."""

    def error_signal(self) -> None:
        """An uncorrectable error the host would learn about through AER."""


class DmaFault(VfioError):
    """A DMA the device attempted did not happen (nothing was transferred)."""

    def __init__(self, reason: str, iova: int, size: int, write: bool, device: str):
        super().__init__(errno.EIO, f"{device}: DMA {'write' if write else 'read'} of {size} bytes "
                                    f"at iova 0x{iova:x} blocked: {reason}")
        self.reason = reason
        self.iova = iova
        self.size = size
        self.write = write
        self.device = device


# -- config space --------------------------------------------------------------
class ConfigSpace:
    """Bytes with per-bit write masks: what a config read or write does in hardware.

    ``wmask`` bits take the written value, ``w1cmask`` bits clear when written
    with 1 (RW1C), every other bit is read-only.  Hooks run after a write that
    touches their range, for registers with side effects.
    """

    def __init__(self, size: int):
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)
        #: the power-on value of every byte (what a reset gives back to software-changeable bits)
        self.default = bytearray(size)
        self._hooks: List[tuple] = []

    def init(self, offset: int, size: int, value: int, wmask: int = 0, w1c: int = 0) -> None:
        """Set a register's power-on value and which of its bits software may change."""
        self.data[offset:offset + size] = value.to_bytes(size, "little")
        self.default[offset:offset + size] = value.to_bytes(size, "little")
        self.wmask[offset:offset + size] = wmask.to_bytes(size, "little")
        self.w1cmask[offset:offset + size] = w1c.to_bytes(size, "little")

    def set(self, offset: int, size: int, value: int) -> None:
        """The device updating its own register: no masks, no hooks."""
        self.data[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def reset(self) -> None:
        """A function reset: every bit software can change returns to its power-on value.

        Read-only bits the device maintains itself (the interrupt status bit,
        pending bits) are the device's to clear.
        """
        for o in range(self.size):
            soft = self.wmask[o] | self.w1cmask[o]
            if soft:
                self.data[o] = (self.data[o] & ~soft) | (self.default[o] & soft)

    def on_write(self, offset: int, size: int, hook: Callable[[int, int], None]) -> None:
        self._hooks.append((offset, offset + size, hook))

    def read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > self.size:
            return (1 << (8 * size)) - 1  # beyond the function's config space: all ones
        return self.get(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > self.size:
            return
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            o = offset + i
            new = (self.data[o] & ~self.wmask[o]) | (byte & self.wmask[o])
            self.data[o] = new & ~(byte & self.w1cmask[o]) & 0xFF
        for start, end, hook in self._hooks:
            if offset < end and start < offset + size:
                hook(offset, size)


# -- BARs ------------------------------------------------------------------------
class Bar:
    """One base address register's resource: its size, its type, and what accesses do."""

    io = False
    #: a BAR of plain memory may be mapped by the client (the whole BAR, VFIO_REGION_INFO_FLAG_MMAP)
    mmappable = False

    def __init__(self, size: int, *, bits64: bool = False, prefetchable: bool = False):
        if size & (size - 1) or size < (4 if self.io else 16):
            raise ValueError(f"BAR size {size:#x} is not a power of two of at least {4 if self.io else 16}")
        self.size = size
        self.bits64 = bits64 and not self.io
        self.prefetchable = prefetchable and not self.io
        #: the address the host's enumeration gave it (0 = unassigned)
        self.address = 0

    def type_bits(self) -> int:
        if self.io:
            return PCI_BASE_ADDRESS_SPACE_IO
        return (PCI_BASE_ADDRESS_MEM_TYPE_64 if self.bits64 else 0) | (
            PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetchable else 0)

    def read(self, offset: int, size: int) -> int:
        raise NotImplementedError

    def write(self, offset: int, size: int, value: int) -> None:
        raise NotImplementedError


class MmioBar(Bar):
    """Memory-space registers: ``read(offset, size) -> int``, ``write(offset, size, value)``."""

    def __init__(self, size: int, read: Callable[[int, int], int], write: Callable[[int, int, int], None],
                 **kwargs):
        super().__init__(size, **kwargs)
        self._read = read
        self._write = write

    def read(self, offset: int, size: int) -> int:
        return self._read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._write(offset, size, value)


class IoBar(MmioBar):
    """I/O-space registers (never 64-bit, never prefetchable, never mmapped)."""

    io = True


class SharedMemory:
    """Bytes in a memfd, mapped here: memory a transport can hand to a client to map.

    ``fileno()`` is the memfd (send it over a Unix socket; the client maps it
    ``MAP_SHARED``), ``view`` is this process's writable mapping of the same
    pages, so a store by either side is seen by the other.  ``close()`` drops
    this side's mapping and fd (a client's mapping lives on).
    """

    def __init__(self, size: int, name: str = "cuse-vfio"):
        if size <= 0:
            raise ValueError("shared memory needs at least one byte")
        self.size = size
        self._fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self._fd, size)
            # A client gets this very memfd: sealed, it can neither shrink it
            # under our mapping (a SIGBUS in the server) nor grow it.
            fcntl.fcntl(self._fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(self._fd)
            raise
        self.view = memoryview(self._map)
        # The fd is closed with the object even when nobody calls close().
        self._finalizer = weakref.finalize(self, os.close, self._fd)

    def fileno(self) -> int:
        if not self._finalizer.alive:
            raise ValueError("shared memory is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        if self.closed:
            return
        self.view.release()
        try:
            self._map.close()
        except BufferError:
            pass  # a slice of the view is still held somewhere: the mapping goes with it
        self._finalizer()


class RamBar(Bar):
    """Plain memory: reads return what was written.  Offered for mmap.

    The bytes live in a memfd (:class:`SharedMemory`): vfio-pci offers the BAR
    for mmap (VFIO_REGION_INFO_FLAG_MMAP) and hands ``memory`` to a transport, which
    passes the fd to the client; the client's stores through its mapping and
    the model's through ``backing`` are the same memory.  ``on_write(offset,
    size)`` (optional) is told after a write through the device fd; writes
    through an mmap are not seen, as on hardware.
    """

    mmappable = True

    def __init__(self, size: int, *, on_write: Optional[Callable[[int, int], None]] = None, **kwargs):
        super().__init__(size, **kwargs)
        self.memory = SharedMemory(size, "cuse-vfio-bar")
        #: the model's view of the BAR's bytes (writable, ``size`` long)
        self.backing = self.memory.view
        self._on_write = on_write

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.backing[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.backing[offset:offset + size] = value.to_bytes(size, "little")
        if self._on_write is not None:
            self._on_write(offset, size)

    def renew_memory(self) -> None:
        """Move the bytes into a fresh memfd and let go of this side of the old one.

        Every mapping a client took of the old memfd stays on pages nothing
        else sees any more: the model, and whoever maps the BAR next, use the
        new memory.  vfio-pci calls it at the device's last close, since here
        (unlike in Linux, where a mapping holds the device file open) a
        mapping can outlive the open it came from.
        """
        old = self.memory
        new = SharedMemory(self.size, "cuse-vfio-bar")
        new.view[:] = old.view
        self.memory = new
        self.backing = new.view
        old.close()

    def close(self) -> None:
        self.memory.close()


class Rom:
    """An expansion ROM image; the BAR is the image rounded up to a power of two (at least 2 KiB)."""

    def __init__(self, image: bytes, size: Optional[int] = None):
        self.image = bytes(image)
        bar = max(2048, 1 << max(0, len(self.image) - 1).bit_length())
        self.size = size if size is not None else bar
        if self.size & (self.size - 1) or self.size < max(2048, len(self.image)):
            raise ValueError(f"ROM BAR size {self.size:#x} must be a power of two >= 2 KiB holding the image")
        self.address = 0

    def read(self, offset: int, size: int) -> int:
        chunk = self.image[offset:offset + size]
        return int.from_bytes(chunk + b"\xff" * (size - len(chunk)), "little")

    def image_size(self) -> int:
        """How much of the BAR a host believes is ROM (``pci_get_rom_size``): 0 when the header is invalid."""
        pos = 0
        while True:
            if self.read(pos, 2) != 0xAA55:
                break
            pcir = pos + self.read(pos + 24, 2)
            if self.read(pcir, 4) != 0x52494350:  # "PCIR"
                break
            last = self.read(pcir + 21, 1) & 0x80
            length = self.read(pcir + 16, 2)
            pos += length * 512
            if pos >= self.size or not length or last:
                break
        return min(pos, self.size)


# -- capabilities --------------------------------------------------------------
class Capability:
    """A standard capability: ``cap_id``, its length, and how it lays itself out."""

    cap_id = 0
    extended = False
    #: the function it was added to, and where (set by ``PciDevice.add_capability``)
    device: "PciDevice" = None
    offset = 0

    def length(self) -> int:
        raise NotImplementedError

    def build(self, config: ConfigSpace, offset: int) -> None:
        """Write the body (the ID and next pointer are the framework's)."""


class PmCapability(Capability):
    """Power management: D0/D3hot; ``no_soft_reset`` says D3hot->D0 keeps state."""

    cap_id = PCI_CAP_ID_PM

    def __init__(self, no_soft_reset: bool = True):
        self.no_soft_reset = no_soft_reset

    def length(self) -> int:
        return PCI_PM_SIZEOF

    def build(self, config: ConfigSpace, offset: int) -> None:
        config.init(offset + PCI_PM_PMC, 2, 0x0003)  # PM spec 1.2, no PME, no D1/D2
        config.init(offset + PCI_PM_CTRL, 2, PCI_PM_CTRL_NO_SOFT_RESET if self.no_soft_reset else 0,
                    wmask=PCI_PM_CTRL_STATE_MASK)
        config.on_write(offset + PCI_PM_CTRL, 1, self._ctrl_written)
        self._config = config

    def state(self) -> int:
        return self._config.get(self.offset + PCI_PM_CTRL, 1) & PCI_PM_CTRL_STATE_MASK

    def _ctrl_written(self, offset: int, size: int) -> None:
        state = self.state()
        if state in (1, 2):  # D1/D2 are not supported: the write is ignored
            self._config.set(self.offset + PCI_PM_CTRL, 1,
                             (self._config.get(self.offset + PCI_PM_CTRL, 1) & ~3) | self.device.power_state)
            return
        old, self.device.power_state = self.device.power_state, state
        if old == PCI_D3HOT and state == PCI_D0 and not self.no_soft_reset:
            self.device.reset_function()


class MsiCapability(Capability):
    """MSI with ``vectors`` (1..32, a power of two), optional 64-bit address and per-vector masking."""

    cap_id = PCI_CAP_ID_MSI

    def __init__(self, vectors: int = 1, addr64: bool = True, per_vector_mask: bool = False):
        if vectors not in (1, 2, 4, 8, 16, 32):
            raise ValueError("MSI vectors must be 1, 2, 4, 8, 16 or 32")
        self.vectors = vectors
        self.addr64 = addr64
        self.per_vector_mask = per_vector_mask

    def length(self) -> int:
        return 10 + (4 if self.addr64 else 0) + (10 if self.per_vector_mask else 0)

    @property
    def _mask_reg(self) -> int:
        return self.offset + (PCI_MSI_MASK_64 if self.addr64 else PCI_MSI_MASK_32)

    def build(self, config: ConfigSpace, offset: int) -> None:
        flags = ((self.vectors.bit_length() - 1) << 1) | (PCI_MSI_FLAGS_64BIT if self.addr64 else 0) | (
            PCI_MSI_FLAGS_MASKBIT if self.per_vector_mask else 0)
        config.init(offset + PCI_MSI_FLAGS, 2, flags, wmask=PCI_MSI_FLAGS_ENABLE | PCI_MSI_FLAGS_QSIZE)
        config.init(offset + PCI_MSI_ADDRESS_LO, 4, 0, wmask=0xFFFFFFFC)
        if self.addr64:
            config.init(offset + PCI_MSI_ADDRESS_HI, 4, 0, wmask=0xFFFFFFFF)
        config.init(offset + (PCI_MSI_DATA_64 if self.addr64 else PCI_MSI_DATA_32), 2, 0, wmask=0xFFFF)
        if self.per_vector_mask:
            config.init(self._mask_reg, 4, 0, wmask=(1 << self.vectors) - 1 if self.vectors < 32 else 0xFFFFFFFF)
            config.init(self._mask_reg + 4, 4, 0)  # pending: read-only
            config.on_write(self._mask_reg, 4, lambda o, s: self._deliver_pending())
        config.on_write(offset + PCI_MSI_FLAGS, 2, lambda o, s: self._deliver_pending())
        self._config = config

    def flags(self) -> int:
        return self._config.get(self.offset + PCI_MSI_FLAGS, 2)

    def enabled(self) -> bool:
        return bool(self.flags() & PCI_MSI_FLAGS_ENABLE)

    def enabled_vectors(self) -> int:
        return min(self.vectors, 1 << ((self.flags() & PCI_MSI_FLAGS_QSIZE) >> 4))

    def _masked(self, vector: int) -> bool:
        return self.per_vector_mask and bool(self._config.get(self._mask_reg, 4) >> vector & 1)

    def notify(self, vector: int) -> None:
        if not self.enabled() or vector >= self.enabled_vectors():
            return
        if self._masked(vector):
            pending = self._config.get(self._mask_reg + 4, 4)
            self._config.set(self._mask_reg + 4, 4, pending | (1 << vector))
            return
        self.device._send_msi(IrqIndex.MSI, vector)

    def _deliver_pending(self) -> None:
        if not self.per_vector_mask or not self.enabled():
            return
        pending = self._config.get(self._mask_reg + 4, 4)
        for vector in range(self.vectors):
            if pending >> vector & 1 and not self._masked(vector):
                pending &= ~(1 << vector)
                self._config.set(self._mask_reg + 4, 4, pending)
                self.device._send_msi(IrqIndex.MSI, vector)

    # what the host's PCI core does when vfio-pci enables MSI (pci_alloc_irq_vectors)
    def host_enable(self, nvec: int) -> None:
        qsize = max(0, (nvec - 1).bit_length())
        flags = (self.flags() & ~PCI_MSI_FLAGS_QSIZE) | (qsize << 4) | PCI_MSI_FLAGS_ENABLE
        self._config.set(self.offset + PCI_MSI_ADDRESS_LO, 4, 0xFEE00000)
        self._config.write(self.offset + PCI_MSI_FLAGS, 2, flags)

    def host_disable(self) -> None:
        self._config.write(self.offset + PCI_MSI_FLAGS, 2, self.flags() & ~(PCI_MSI_FLAGS_ENABLE | PCI_MSI_FLAGS_QSIZE))

    def reset(self) -> None:
        if self.per_vector_mask:
            self._config.set(self._mask_reg + 4, 4, 0)


class MsixCapability(Capability):
    """MSI-X with its table and PBA inside BARs of the same function (``table_bar``, ``pba_bar``)."""

    cap_id = PCI_CAP_ID_MSIX

    def __init__(self, vectors: int, table_bar: int, table_offset: int = 0,
                 pba_bar: Optional[int] = None, pba_offset: Optional[int] = None):
        if not 1 <= vectors <= 2048:
            raise ValueError("MSI-X has 1..2048 vectors")
        self.vectors = vectors
        self.table_bar = table_bar
        self.table_offset = table_offset
        self.pba_bar = table_bar if pba_bar is None else pba_bar
        self.pba_offset = (table_offset + vectors * PCI_MSIX_ENTRY_SIZE + 7) & ~7 if pba_offset is None else pba_offset
        if self.table_offset & 7 or self.pba_offset & 7:
            raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned")
        self.table = bytearray(vectors * PCI_MSIX_ENTRY_SIZE)
        self.pending = 0
        self.reset()

    def length(self) -> int:
        return PCI_CAP_MSIX_SIZEOF

    @property
    def table_size(self) -> int:
        return self.vectors * PCI_MSIX_ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        return ((self.vectors + 63) // 64) * 8

    def build(self, config: ConfigSpace, offset: int) -> None:
        config.init(offset + PCI_MSIX_FLAGS, 2, self.vectors - 1, wmask=PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
        config.init(offset + PCI_MSIX_TABLE, 4, self.table_offset | self.table_bar)
        config.init(offset + PCI_MSIX_PBA, 4, self.pba_offset | self.pba_bar)
        config.on_write(offset + PCI_MSIX_FLAGS, 2, lambda o, s: self._deliver_pending())
        self._config = config

    def flags(self) -> int:
        return self._config.get(self.offset + PCI_MSIX_FLAGS, 2)

    def enabled(self) -> bool:
        return bool(self.flags() & PCI_MSIX_FLAGS_ENABLE)

    def entry_masked(self, vector: int) -> bool:
        ctrl = int.from_bytes(self.table[vector * 16 + 12:vector * 16 + 16], "little")
        return bool(ctrl & PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def _blocked(self, vector: int) -> bool:
        return bool(self.flags() & PCI_MSIX_FLAGS_MASKALL) or self.entry_masked(vector)

    def notify(self, vector: int) -> None:
        if not self.enabled() or vector >= self.vectors:
            return
        if self._blocked(vector):
            self.pending |= 1 << vector
            return
        self.device._send_msi(IrqIndex.MSIX, vector)

    def _deliver_pending(self) -> None:
        if not self.enabled():
            return
        for vector in range(self.vectors):
            if self.pending >> vector & 1 and not self._blocked(vector):
                self.pending &= ~(1 << vector)
                self.device._send_msi(IrqIndex.MSIX, vector)

    # the table and PBA as seen through the BAR
    def table_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.table[offset:offset + size], "little")

    def table_write(self, offset: int, size: int, value: int) -> None:
        self.table[offset:offset + size] = value.to_bytes(size, "little")
        self._deliver_pending()

    def pba_read(self, offset: int, size: int) -> int:
        return (self.pending >> (8 * offset)) & ((1 << (8 * size)) - 1)

    # what the host's PCI core does for vfio-pci (pci_alloc_irq_vectors, request_irq/free_irq)
    def host_enable(self) -> None:
        for vector in range(self.vectors):
            self.host_mask(vector, True)
        self._config.write(self.offset + PCI_MSIX_FLAGS, 2, PCI_MSIX_FLAGS_ENABLE)

    def host_disable(self) -> None:
        self._config.write(self.offset + PCI_MSIX_FLAGS, 2, 0)

    def host_mask(self, vector: int, masked: bool) -> None:
        ctrl = PCI_MSIX_ENTRY_CTRL_MASKBIT if masked else 0
        self.table_write(vector * 16 + PCI_MSIX_ENTRY_VECTOR_CTRL, 4, ctrl)

    def reset(self) -> None:
        for vector in range(self.vectors):
            self.table[vector * 16:vector * 16 + 16] = (PCI_MSIX_ENTRY_CTRL_MASKBIT << 96).to_bytes(16, "little")
        self.pending = 0


class ExpressCapability(Capability):
    """PCI Express capability (version 2, endpoint); ``flr`` offers Function Level Reset."""

    cap_id = PCI_CAP_ID_EXP

    def __init__(self, device_type: int = PCI_EXP_TYPE_ENDPOINT, flr: bool = False):
        self.device_type = device_type
        self.flr = flr

    def length(self) -> int:
        return PCI_CAP_EXP_ENDPOINT_SIZEOF_V2

    def build(self, config: ConfigSpace, offset: int) -> None:
        config.init(offset + PCI_EXP_FLAGS, 2, 0x2 | (self.device_type << 4))
        config.init(offset + PCI_EXP_DEVCAP, 4, 0x1 | (PCI_EXP_DEVCAP_FLR if self.flr else 0))  # MPS 256
        # correctable/non-fatal/fatal/UR reporting, relaxed ordering, MPS, ext tag, phantom,
        # aux PME, no-snoop, MRRS; initiate-FLR only when FLR is offered
        devctl_w = 0x7FFF | (PCI_EXP_DEVCTL_BCR_FLR if self.flr else 0)
        config.init(offset + PCI_EXP_DEVCTL, 2, 0x2810, wmask=devctl_w)
        config.init(offset + PCI_EXP_DEVSTA, 2, 0, w1c=0x000F)
        config.init(offset + 12, 4, 0x00000011)  # LNKCAP: 2.5 GT/s x1
        config.init(offset + 18, 2, 0x0011)      # LNKSTA: 2.5 GT/s x1
        config.init(offset + PCI_EXP_DEVCTL2, 2, 0, wmask=0x041F)
        if self.flr:
            config.on_write(offset + PCI_EXP_DEVCTL, 2, self._devctl_written)
        self._config = config

    def _devctl_written(self, offset: int, size: int) -> None:
        reg = self.offset + PCI_EXP_DEVCTL
        ctl = self._config.get(reg, 2)
        if ctl & PCI_EXP_DEVCTL_BCR_FLR:
            # Initiate FLR always reads 0; the reset returns config to power-on values.
            self._config.set(reg, 2, ctl & ~PCI_EXP_DEVCTL_BCR_FLR)
            self.device.reset_function()


class VendorCapability(Capability):
    """Vendor-specific capability: ``payload`` follows the length byte."""

    cap_id = PCI_CAP_ID_VNDR

    def __init__(self, payload: bytes):
        if len(payload) > 253:
            raise ValueError("a vendor capability holds at most 253 bytes after its length byte")
        self.payload = bytes(payload)

    def length(self) -> int:
        return 3 + len(self.payload)

    def build(self, config: ConfigSpace, offset: int) -> None:
        config.init(offset + PCI_CAP_FLAGS, 1, self.length())
        config.data[offset + 3:offset + 3 + len(self.payload)] = self.payload


class ExtendedCapability(Capability):
    """A PCIe extended capability: 4-byte header (id, version, next) then ``body``."""

    extended = True

    def __init__(self, cap_id: int, version: int, body: bytes):
        self.cap_id = cap_id
        self.version = version
        self.body = bytes(body)

    def length(self) -> int:
        return 4 + len(self.body)

    def build(self, config: ConfigSpace, offset: int) -> None:
        config.data[offset + 4:offset + 4 + len(self.body)] = self.body


class VendorExtCapability(ExtendedCapability):
    """Vendor-specific extended capability (VSEC): id, revision, length, then ``payload``."""

    def __init__(self, vsec_id: int, vsec_rev: int, payload: bytes):
        length = 8 + len(payload)
        header = vsec_id | (vsec_rev << 16) | (length << 20)
        super().__init__(PCI_EXT_CAP_ID_VNDR, 1, header.to_bytes(4, "little") + bytes(payload))


# -- deferred work ---------------------------------------------------------------
class DeferredWork:
    """Work a device does later (QEMU's edu computes in a thread and DMAs on a timer).

    With ``manual`` nothing runs until :meth:`run_pending`; otherwise each item
    runs on a timer thread after its delay.  Either way :meth:`run_pending`
    runs what is still waiting, now and in order, so tests are deterministic.
    Every item runs under the device lock.
    """

    def __init__(self, lock, manual: bool = False):
        self._lock = lock
        self.manual = manual
        self._items: List[list] = []  # [callback, timer, done]

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        item = [fn, None, False]
        with self._lock:
            self._items.append(item)
        if not self.manual:
            timer = threading.Timer(max(0.0, delay), self._run, (item,))
            timer.daemon = True
            item[1] = timer
            timer.start()

    def pending(self) -> int:
        with self._lock:
            return sum(1 for item in self._items if not item[2])

    def run_pending(self) -> None:
        while True:
            with self._lock:
                item = next((i for i in self._items if not i[2]), None)
                if item is None:
                    return
                self._run(item)

    def cancel_all(self) -> None:
        with self._lock:
            for item in self._items:
                item[2] = True
                if item[1] is not None:
                    item[1].cancel()
            self._items.clear()

    def _run(self, item: list) -> None:
        with self._lock:
            if item[2]:
                return
            item[2] = True
            if item[1] is not None:
                item[1].cancel()
            self._items.remove(item)
            try:
                item[0]()
            except Exception:
                log.exception("deferred work of a device model failed; the device keeps going")


# -- DMA -------------------------------------------------------------------------
class DmaPort:
    """The only way a model reaches memory: by IOVA, through the container's IOMMU.

    The DmaSpace itself is never handed to the model: vfio-pci attaches it with
    :meth:`_attach`, and every transfer first checks the function's bus-master
    bit, as a PCI function may not issue requests while it is clear.
    """

    MAX_FAULTS = 256

    def __init__(self, device: "PciDevice"):
        self.__device = device
        self.__space = None
        #: the faults this function saw, newest last (also reported to the DmaSpace when it keeps a log)
        self.faults = collections.deque(maxlen=self.MAX_FAULTS)

    def _attach(self, space) -> None:
        self.__space = space

    def read(self, iova: int, size: int) -> bytes:
        return self.__transfer(iova, size, None)

    def write(self, iova: int, data: bytes) -> None:
        self.__transfer(iova, len(data), bytes(data))

    def __transfer(self, iova: int, size: int, data: Optional[bytes]):
        device = self.__device
        write = data is not None
        if not device.bus_master_enabled():
            self.__fault("bus-master-disabled", iova, size, write)
        space = self.__space
        if space is None:
            self.__fault("no-iommu-domain", iova, size, write)
        try:
            if write:
                space.dma_write(iova, data, device=device.name)
                return None
            return space.dma_read(iova, size, device=device.name)
        except VfioError as e:
            self.faults.append({"iova": iova, "size": size, "write": write,
                                "reason": getattr(e, "reason", e.strerror), "device": device.name})
            raise

    def __fault(self, reason: str, iova: int, size: int, write: bool):
        device = self.__device
        record = {"iova": iova, "size": size, "write": write, "reason": reason, "device": device.name}
        self.faults.append(record)
        recorder = getattr(self.__space, "record_fault", None)
        if recorder is not None:
            try:
                recorder(iova=iova, size=size, write=write, reason=reason, device=device.name)
            except Exception:
                log.exception("the DmaSpace failed to record a fault")
        log.info("%s: DMA %s of %d bytes at iova 0x%x blocked: %s", device.name,
                 "write" if write else "read", size, iova, reason)
        raise DmaFault(reason, iova, size, write, device.name)


# -- the function ----------------------------------------------------------------
_BAR_BASES = {"io": 0xC000, "mem32": 0xC0000000, "mem64": 0x80_0000_0000}


class PciDevice:
    """One PCI function (type-0 header).  Subclass it to write a device model."""

    vendor_id = 0xFFFF
    device_id = 0xFFFF
    subsystem_vendor_id = 0
    subsystem_id = 0
    revision = 0
    #: 24-bit class code: base class, sub-class, programming interface
    class_code = 0xFF0000
    #: 1..4 for INTA..INTD, 0 for no INTx
    interrupt_pin = 0
    #: the function can be reset on its own (VFIO_DEVICE_RESET is offered)
    can_reset = False
    #: the function implements the bus-master bit (it does DMA)
    dma_capable = True
    #: writable bits of the command register; None: what the function implements
    #: (I/O and memory decode for its BAR types, bus master when ``dma_capable``,
    #: parity, SERR, INTx disable).  QEMU's devices make IO|MEMORY|MASTER|SERR|INTX_DISABLE
    #: writable whatever their BARs (``pci_init_wmask``).
    command_wmask: Optional[int] = None
    #: command bits the platform firmware set at boot (SeaBIOS: IO | MEMORY | SERR)
    firmware_command = 0
    #: the Interrupt Line register as firmware left it (the IRQ INTx is routed to)
    interrupt_line = 0

    def __init__(self, name: Optional[str] = None, *, manual_time: bool = False, **options):
        if options:
            raise TypeError(f"device model {type(self).__name__} has no option {', '.join(sorted(options))}")
        self.name = name or type(self).__name__
        #: serializes register handlers, config accesses and deferred work
        self.lock = threading.RLock()
        self.deferred = DeferredWork(self.lock, manual=manual_time)
        self.dma = DmaPort(self)
        self.bars: List[Optional[Bar]] = [None] * PCI_STD_NUM_BARS
        self.rom: Optional[Rom] = None
        self.capabilities: List[Capability] = []
        self.msi: Optional[MsiCapability] = None
        self.msix: Optional[MsixCapability] = None
        self.pm: Optional[PmCapability] = None
        self.express: Optional[ExpressCapability] = None
        self.power_state = PCI_D0
        self.config = ConfigSpace(PCI_CFG_SPACE_SIZE)
        self._intx_level = False
        self._intx_out = False
        #: where interrupts go (an :class:`IrqSink`; vfio-pci sets it)
        self.irq_sink = None
        self._next_addr = dict(_BAR_BASES)
        self._build_header()

    # -- building -------------------------------------------------------------
    def _build_header(self) -> None:
        c = self.config
        c.init(PCI_VENDOR_ID, 2, self.vendor_id)
        c.init(PCI_DEVICE_ID, 2, self.device_id)
        c.on_write(PCI_COMMAND, 2, lambda o, s: self._update_intx())
        c.init(PCI_COMMAND, 2, 0, wmask=self._command_wmask())
        c.init(PCI_STATUS, 2, 0, w1c=PCI_STATUS_RW1C)
        c.init(PCI_REVISION_ID, 1, self.revision)
        c.init(PCI_CLASS_PROG, 3, self.class_code)
        c.init(PCI_CACHE_LINE_SIZE, 1, 0, wmask=0xFF)
        c.init(PCI_LATENCY_TIMER, 1, 0, wmask=0xFF)
        c.init(PCI_HEADER_TYPE, 1, 0)
        c.init(PCI_SUBSYSTEM_VENDOR_ID, 2, self.subsystem_vendor_id)
        c.init(PCI_SUBSYSTEM_ID, 2, self.subsystem_id)
        c.init(PCI_INTERRUPT_LINE, 1, 0, wmask=0xFF)
        c.init(PCI_INTERRUPT_PIN, 1, self.interrupt_pin)

    def _command_wmask(self) -> int:
        if self.command_wmask is not None:
            return self.command_wmask
        mask = PCI_COMMAND_PARITY | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE
        if any(b is not None and b.io for b in self.bars):
            mask |= PCI_COMMAND_IO
        if any(b is not None and not b.io for b in self.bars) or self.rom is not None:
            mask |= PCI_COMMAND_MEMORY
        if self.dma_capable:
            mask |= PCI_COMMAND_MASTER
        return mask

    def _assign(self, size: int, kind: str) -> int:
        # What firmware enumeration would do: naturally aligned, increasing addresses.
        addr = (self._next_addr[kind] + size - 1) & ~(size - 1)
        self._next_addr[kind] = addr + size
        return addr

    def add_bar(self, index: int, bar: Bar, address: Optional[int] = None) -> Bar:
        """Implement BAR ``index``; a 64-bit BAR also takes ``index + 1``.

        ``address`` is where enumeration places it (naturally aligned); by
        default the next free address of its kind.
        """
        if not 0 <= index < PCI_STD_NUM_BARS or self.bars[index] is not None:
            raise ValueError(f"BAR{index} is out of range or already used")
        if bar.bits64 and (index == PCI_STD_NUM_BARS - 1 or self.bars[index + 1] is not None):
            raise ValueError(f"64-bit BAR{index} needs BAR{index + 1} free")
        if index > 0 and self.bars[index - 1] is not None and self.bars[index - 1].bits64 and \
                self.bars[index - 1] is not bar:
            raise ValueError(f"BAR{index} is the upper half of 64-bit BAR{index - 1}")
        self.bars[index] = bar
        if address is not None:
            if address % bar.size or not address or address >> (64 if bar.bits64 else 32):
                raise ValueError(f"BAR{index} address {address:#x} is not a naturally aligned "
                                 f"{'64' if bar.bits64 else '32'}-bit address")
            bar.address = address
        else:
            bar.address = self._assign(bar.size, "io" if bar.io else ("mem64" if bar.bits64 else "mem32"))
        reg = PCI_BASE_ADDRESS_0 + 4 * index
        low_mask = 0x3 if bar.io else 0xF
        mask = ~(bar.size - 1)
        self.config.init(reg, 4, (bar.address & 0xFFFFFFFF & ~low_mask) | bar.type_bits(),
                         wmask=mask & 0xFFFFFFFF & ~low_mask)
        if bar.bits64:
            self.config.init(reg + 4, 4, bar.address >> 32, wmask=(mask >> 32) & 0xFFFFFFFF)
        self.config.init(PCI_COMMAND, 2, self.config.get(PCI_COMMAND, 2), wmask=self._command_wmask())
        return bar

    def set_rom(self, rom: Rom) -> Rom:
        self.rom = rom
        rom.address = self._assign(rom.size, "mem32")
        self.config.init(PCI_ROM_ADDRESS, 4, rom.address,
                         wmask=(~(rom.size - 1) & PCI_ROM_ADDRESS_MASK) | PCI_ROM_ADDRESS_ENABLE)
        self.config.init(PCI_COMMAND, 2, self.config.get(PCI_COMMAND, 2), wmask=self._command_wmask())
        return rom

    def add_capability(self, cap: Capability) -> int:
        """Place ``cap`` after the last one of its kind and link it into the list; returns its offset."""
        if cap.device is not None:
            raise ValueError("a capability belongs to one function")
        if isinstance(cap, ExpressCapability) and self.config.size < PCI_CFG_SPACE_EXP_SIZE:
            self._grow_config()
        length = (cap.length() + 3) & ~3
        same = [c for c in self.capabilities if c.extended == cap.extended]
        if cap.extended:
            if self.config.size < PCI_CFG_SPACE_EXP_SIZE:
                raise ValueError("extended capabilities need a PCI Express function (add ExpressCapability first)")
            offset = (same[-1].offset + ((same[-1].length() + 3) & ~3)) if same else PCI_CFG_SPACE_SIZE
            if offset + length > PCI_CFG_SPACE_EXP_SIZE:
                raise ValueError("extended config space is full")
            header = cap.cap_id | (cap.version << 16)
            self.config.init(offset, 4, header)
            if same:
                prev = same[-1].offset
                self.config.set(prev, 4, self.config.get(prev, 4) | (offset << 20))
        else:
            offset = (same[-1].offset + ((same[-1].length() + 3) & ~3)) if same else PCI_STD_HEADER_SIZEOF
            if offset + length > PCI_CFG_SPACE_SIZE:
                raise ValueError("standard config space is full")
            self.config.init(offset + PCI_CAP_LIST_ID, 1, cap.cap_id)
            self.config.init(offset + PCI_CAP_LIST_NEXT, 1, 0)
            self.config.set(same[-1].offset + PCI_CAP_LIST_NEXT if same else PCI_CAPABILITY_LIST, 1, offset)
            self.config.set(PCI_STATUS, 2, self.config.get(PCI_STATUS, 2) | PCI_STATUS_CAP_LIST)
        cap.device = self
        cap.offset = offset
        cap.build(self.config, offset)
        self.capabilities.append(cap)
        for attr, kind in (("msi", MsiCapability), ("msix", MsixCapability), ("pm", PmCapability),
                           ("express", ExpressCapability)):
            if isinstance(cap, kind) and getattr(self, attr) is None:
                setattr(self, attr, cap)
        return offset

    def _grow_config(self) -> None:
        old = self.config
        new = ConfigSpace(PCI_CFG_SPACE_EXP_SIZE)
        for name in ("data", "wmask", "w1cmask", "default"):
            getattr(new, name)[:old.size] = getattr(old, name)
        new._hooks = old._hooks
        self.config = new
        for cap in self.capabilities:
            cap._config = new
        self.config.init(PCI_LATENCY_TIMER, 1, 0)  # PCIe: latency timer is hardwired to 0

    def firmware_setup(self) -> None:
        """What platform firmware leaves at boot: ``firmware_command`` and ``interrupt_line``.

        Not part of power-on state: a function reset clears them, and the host
        restores them with the rest of config space.
        """
        self.config_write(PCI_COMMAND, 2, self.command() | self.firmware_command)
        if self.interrupt_pin:
            self.config_write(PCI_INTERRUPT_LINE, 1, self.interrupt_line)

    # -- config access (the host's pci_{read,write}_config_*) ----------------
    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.config.write(offset, size, value)

    def command(self) -> int:
        return self.config.get(PCI_COMMAND, 2)

    def bus_master_enabled(self) -> bool:
        return bool(self.command() & PCI_COMMAND_MASTER)

    # -- BAR access (MMIO / port I/O from the host) ---------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        bar = self.bars[index]
        if not self._decodes(bar):
            return (1 << (8 * size)) - 1  # master abort: all ones
        handler = self._msix_region(index, offset, size)
        if handler is not None:
            return handler[0](handler[2], size)
        return bar.read(offset, size) & ((1 << (8 * size)) - 1)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        bar = self.bars[index]
        if not self._decodes(bar):
            return
        handler = self._msix_region(index, offset, size)
        if handler is not None:
            if handler[1] is not None:
                handler[1](handler[2], size, value)
            return
        bar.write(offset, size, value)

    def rom_read(self, offset: int, size: int) -> int:
        return self.rom.read(offset, size)

    def _decodes(self, bar: Bar) -> bool:
        bit = PCI_COMMAND_IO if bar.io else PCI_COMMAND_MEMORY
        return bool(self.command() & bit) and self.power_state < PCI_D3HOT

    def _msix_region(self, index: int, offset: int, size: int):
        msix = self.msix
        if msix is None:
            return None
        if index == msix.table_bar and msix.table_offset <= offset < msix.table_offset + msix.table_size:
            return msix.table_read, msix.table_write, offset - msix.table_offset
        if index == msix.pba_bar and msix.pba_offset <= offset < msix.pba_offset + msix.pba_size:
            return msix.pba_read, None, offset - msix.pba_offset
        return None

    # -- interrupts: the narrow helper models use ------------------------------
    def msi_enabled(self) -> bool:
        return self.msi is not None and self.msi.enabled()

    def msix_enabled(self) -> bool:
        return self.msix is not None and self.msix.enabled()

    def raise_irq(self, index: int, vector: int = 0) -> None:
        """Assert INTx (a level, until ``lower_irq``), or send MSI / MSI-X ``vector``.

        A message for a disabled mechanism is dropped, as the hardware would;
        the host's masks and automasking are vfio-pci's business.
        """
        index = IrqIndex(index)
        if index is IrqIndex.INTX:
            if not self.interrupt_pin:
                raise ValueError(f"{self.name} has no INTx pin")
            self._intx_level = True
            self._update_intx()
        elif index is IrqIndex.MSI:
            if self.msi is not None:
                self.msi.notify(vector)
        elif index is IrqIndex.MSIX:
            if self.msix is not None:
                self.msix.notify(vector)
        elif index is IrqIndex.ERR:
            self.signal_error()
        else:
            raise ValueError("a device cannot raise the REQ interrupt: the host does")

    def lower_irq(self, index: int = IrqIndex.INTX) -> None:
        """Deassert INTx (messages have nothing to lower)."""
        if IrqIndex(index) is IrqIndex.INTX:
            self._intx_level = False
            self._update_intx()

    def signal_error(self) -> None:
        """An uncorrectable error the host would learn about through AER (the ERR index)."""
        if self.irq_sink is not None:
            self.irq_sink.error_signal()

    def _update_intx(self) -> None:
        status = self.config.get(PCI_STATUS, 2)
        self.config.set(PCI_STATUS, 2, (status | PCI_STATUS_INTERRUPT) if self._intx_level
                        else (status & ~PCI_STATUS_INTERRUPT))
        out = self._intx_level and not (self.command() & PCI_COMMAND_INTX_DISABLE)
        if out != self._intx_out:
            self._intx_out = out
            if self.irq_sink is not None:
                self.irq_sink.intx_line(out)

    def intx_asserted(self) -> bool:
        """The INTx line as the interrupt controller sees it."""
        return self._intx_out

    def _send_msi(self, index: IrqIndex, vector: int) -> None:
        if self.irq_sink is not None:
            self.irq_sink.msi_message(index, vector)

    # -- time ------------------------------------------------------------------
    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` under the device lock after ``delay`` seconds (or at ``complete_pending``)."""
        self.deferred.call_later(delay, fn)

    def complete_pending(self) -> None:
        """Finish every piece of deferred work now (deterministic tests)."""
        self.deferred.run_pending()

    # -- reset -----------------------------------------------------------------
    def reset(self) -> None:
        """The model's own state back to power-on; override it (the framework handles config space)."""

    def reset_methods(self) -> List[str]:
        """How this function can be reset on its own, in the PCI core's order of preference.

        ``device_specific`` when the model says ``can_reset``; ``flr`` when its
        PCI Express capability offers Function Level Reset; ``pm`` when its
        power-management capability has No_Soft_Reset clear (D3hot -> D0
        resets it).  Empty: the host cannot reset it alone, and vfio-pci
        offers no VFIO_DEVICE_RESET (a reset of its bus may still be possible,
        vfio-pci adds that).
        """
        methods = []
        if self.can_reset:
            methods.append("device_specific")
        if self.express is not None and self.express.flr:
            methods.append("flr")
        if self.pm is not None and not self.pm.no_soft_reset:
            methods.append("pm")
        return methods

    def reset_function(self) -> None:
        """The function is reset (FLR, PM soft reset, or a reset of its bus).

        Config space returns to its power-on values (the host saves and
        restores it around a reset it initiates: ``pci_try_reset_function``),
        pending deferred work is dropped, interrupts go quiet, and the model's
        own :meth:`reset` runs.
        """
        with self.lock:
            self.deferred.cancel_all()
            self.config.reset()
            self.power_state = PCI_D0
            if self.msi is not None:
                self.msi.reset()
            if self.msix is not None:
                self.msix.reset()
            self._intx_level = False
            self._update_intx()
            self.reset()  # the model's own state, last: a model that fails here leaves the rest reset

    def shutdown(self) -> None:
        """The device goes away: nothing deferred may run any more, shared memory is let go."""
        self.deferred.cancel_all()
        for bar in self.bars:
            if isinstance(bar, RamBar):
                bar.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.vendor_id:04x}:{self.device_id:04x}>"


def capability_offsets(config_read: Callable[[int, int], int]) -> Dict[int, int]:
    """Walk a standard capability list through ``config_read``: {offset: cap id}, in list order."""
    found: Dict[int, int] = {}
    if not config_read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST:
        return found
    pos = config_read(PCI_CAPABILITY_LIST, 1) & ~3
    while pos and pos not in found and len(found) < 48:
        found[pos] = config_read(pos + PCI_CAP_LIST_ID, 1)
        pos = config_read(pos + PCI_CAP_LIST_NEXT, 1) & ~3
    return found
