"""QEMU's inter-VM shared memory device without interrupts, ``ivshmem-plain`` (hw/misc/ivshmem.c).

PCI 1af4:1110, revision 1, class 0x050000 (memory controller, RAM),
subsystem 1af4:1100, no interrupt pin and no MSI-X (QEMU's table: "ivshmem-
plain: Interrupt none, Interrupt Pin 0, MSI-X cap no"), conventional PCI.

BAR0: 256 bytes of 32-bit registers (QEMU serves them as 4-byte accesses;
smaller ones are widened by its memory core, so a 1- or 2-byte access sees
its part of the register):

====== ========== ==============================================================
offset register   behaviour
====== ========== ==============================================================
0x00   IntrMask   RW
0x04   IntrStatus RW; a read returns it and clears it (no interrupt is raised)
0x08   IVPosition RO, 0: a plain device has no peer number
0x0c   Doorbell   WO; a plain device has no peers, so every ring is ignored
====== ========== ==============================================================

BAR2: the shared memory, 64-bit prefetchable, mappable whole.  Options
(topology keys): ``size`` (bytes, or a string like ``"64M"``; a power of
two of at least 4 KiB; default 4 MiB) and ``shm``: a file path whose bytes
are the memory (QEMU's ``memory-backend-file,share=on,mem-path=``), shared
with every other process or device that maps the same file; without it the
memory is a memfd private to this device (``memory-backend-memfd``).
"""

from __future__ import annotations

import logging
import re
from typing import Optional, Union

from .pci import FileRamBar, MmioBar, PciDevice, RamBar
from .registry import register_model

log = logging.getLogger(__name__)

REG_INTRMASK = 0x00
REG_INTRSTATUS = 0x04
REG_IVPOSITION = 0x08
REG_DOORBELL = 0x0C
REGS_SIZE = 0x100                    # IVSHMEM_REG_BAR_SIZE

DEFAULT_SIZE = 4 << 20
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(size: Union[int, str]) -> int:
    """Bytes, or QEMU's size notation ("2M", "1G")."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"size {size!r} is not a number of bytes like 4194304 or \"4M\"")
    return int(m.group(1)) * _SUFFIX[m.group(2).upper()]


@register_model("ivshmem-plain")
class IvshmemPlain(PciDevice):
    vendor_id = 0x1AF4                 # PCI_VENDOR_ID_IVSHMEM (Red Hat / Qumranet)
    device_id = 0x1110                 # PCI_DEVICE_ID_IVSHMEM
    revision = 1
    class_code = 0x050000              # PCI_CLASS_MEMORY_RAM
    subsystem_vendor_id = 0x1AF4
    subsystem_id = 0x1100
    interrupt_pin = 0

    def __init__(self, name=None, *, size: Union[int, str] = DEFAULT_SIZE, shm: Optional[str] = None, **options):
        super().__init__(name, **options)
        size = parse_size(size)
        if size < 4096 or size & (size - 1):
            raise ValueError(f"size {size:#x}: the shared memory is a BAR, a power of two of at least 4 KiB")
        if shm is not None and not isinstance(shm, str):
            raise ValueError(f"shm {shm!r} is a file path")
        self.intrmask = 0
        self.intrstatus = 0
        self.add_bar(0, MmioBar(REGS_SIZE, self.mmio_read, self.mmio_write))
        try:
            self.shared = self.add_bar(2, FileRamBar(size, shm, bits64=True, prefetchable=True) if shm
                                       else RamBar(size, bits64=True, prefetchable=True))
        except OSError as e:
            raise ValueError(f"shm {shm}: cannot use it as shared memory: {e.strerror}") from None

    def reset(self) -> None:
        # ivshmem_reset: the registers clear; the shared memory is the memdev's, untouched
        self.intrmask = 0
        self.intrstatus = 0

    # -- BAR0 ---------------------------------------------------------------------
    def mmio_read(self, addr: int, size: int) -> int:
        reg = addr & ~3
        if reg == REG_INTRMASK:
            value = self.intrmask
        elif reg == REG_INTRSTATUS:
            value, self.intrstatus = self.intrstatus, 0
        else:  # IVPosition reads 0; the doorbell and the rest of the BAR read 0 as well
            value = 0
        return value >> 8 * (addr & 3) & ((1 << 8 * size) - 1)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        reg = addr & ~3
        # a narrower write is widened to the register: the other bytes written as zero
        value = (value << 8 * (addr & 3)) & 0xFFFFFFFF
        if reg == REG_INTRMASK:
            self.intrmask = value
        elif reg == REG_INTRSTATUS:
            self.intrstatus = value
        elif reg == REG_DOORBELL:
            log.debug("%s: doorbell 0x%x ignored: ivshmem-plain has no peers", self.name, value)
