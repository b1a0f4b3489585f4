"""The virtio PCI transport of a transitional device, laid out as QEMU's virtio-pci lays it out.

::

    BAR0  I/O, legacy interface: the 20-byte header (+ 4 bytes of MSI-X vectors
          while MSI-X is enabled), then the device-specific config
    BAR1  32-bit memory, 4 KiB: the MSI-X table at 0, the PBA at 0x800
          (config vector + one vector per queue)
    BAR4  64-bit prefetchable memory, 16 KiB, the virtio 1.0 interface:
          0x0000 common config, 0x1000 ISR, 0x2000 device config,
          0x3000 notify (notify_off_multiplier 4: queue n at 0x3000 + 4n)

    capabilities (conventional PCI, 256-byte config space):
    0x40 common  0x50 ISR  0x60 device  0x70 notify  0x84 PCI config access  0x98 MSI-X

The device config page (BAR4 0x2000-0x2fff) is a register window
(``MmioBar.add_window``): memory the device rewrites whenever what it holds
changes (:meth:`VirtioPciFunction.update_device_config`), before the config
generation moves, so a driver that reads it between two reads of
config_generation sees a whole state.  Its reads have no side effect; a write
through the device fd goes to the device (``write_config``) and the page is
then rewritten, so a read-only field reads back as it was, as QEMU's
``virtio_config_modern_write*`` then ``get_config``.  With ``mmap_windows = true``
vfio-pci offers that page for mmap (a sparse mmap area), and a client such as
QEMU maps it and reads MAC and status without a trap.  Off by default,
since DPDK cannot use it: 22.11 maps BAR4 whole, which is refused (EINVAL),
and its PCI bus then gives the device up, legacy interface included; a
DPDK that knows sparse areas maps the page and takes the modern interface,
whose common config it reads through a pointer into the unmapped rest of
BAR4.  With no mappable area it takes the legacy BAR0.  What the mapping
cannot reproduce: a store through it to a read-only field stays until the
device next rewrites the page (the spec forbids a modern driver to write
them), and an access straddling the end of the config reads the config's
bytes and then 0xff where QEMU reads all ones.

Which interface a driver uses is its choice: DPDK's virtio PMD wants BAR4
mapped (cuse-vfio serves register BARs through pread/pwrite only), so it
falls back to the legacy BAR0 through the VFIO region; Linux's virtio_pci
takes the modern one.  One device state serves both, as in QEMU.

Rules that come from QEMU (``hw/virtio/virtio-pci.c``, ``virtio.c``): registers
answer at their exact offset (a read elsewhere in the legacy header is all
ones, in the common config 0); a vector beyond the MSI-X table reads back as
NO_VECTOR; writing 0 to the legacy queue PFN resets the device; the ISR reads
and clears and lowers INTx; the INTx level is ISR bit 0 (a config change sets
both bits); clearing bus mastering takes DRIVER_OK away; a config change
interrupts only a driver that set DRIVER_OK.  From the spec: FEATURES_OK is
refused for features the device did not offer, for a modern driver without
VIRTIO_F_VERSION_1, and for what :meth:`VirtioPciFunction.validate_features`
refuses; queue_size takes only powers of two up to the device's size.

Errors: a ring that breaks the rules (:class:`VirtqueueError`) or a refused DMA
makes the device "need a reset" as ``virtio_error`` does: DEVICE_NEEDS_RESET
and a config interrupt once VERSION_1 is negotiated; on the legacy interface,
which has no such bit, a broken ring stops the device and a DMA fault stops
the queue it hit, with a logged sentence.  Either lasts until a reset.
"""

from __future__ import annotations

import logging
import struct
from typing import Callable, List, Optional

from ..pci import (
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_IO,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_COMMAND_SERR,
    ConfigSpace,
    IoBar,
    IrqIndex,
    MmioBar,
    MsixCapability,
    PciDevice,
    VendorCapability,
)
from .virtqueue import (
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    QueueDmaError,
    SplitVirtqueue,
    VirtqueueError,
)

log = logging.getLogger(__name__)

# -- include/uapi/linux/virtio_config.h ----------------------------------------------
VIRTIO_CONFIG_S_ACKNOWLEDGE = 0x01
VIRTIO_CONFIG_S_DRIVER = 0x02
VIRTIO_CONFIG_S_DRIVER_OK = 0x04
VIRTIO_CONFIG_S_FEATURES_OK = 0x08
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33

# -- include/uapi/linux/virtio_pci.h ---------------------------------------------------
VIRTIO_PCI_HOST_FEATURES = 0
VIRTIO_PCI_GUEST_FEATURES = 4
VIRTIO_PCI_QUEUE_PFN = 8
VIRTIO_PCI_QUEUE_NUM = 12
VIRTIO_PCI_QUEUE_SEL = 14
VIRTIO_PCI_QUEUE_NOTIFY = 16
VIRTIO_PCI_STATUS = 18
VIRTIO_PCI_ISR = 19
VIRTIO_MSI_CONFIG_VECTOR = 20
VIRTIO_MSI_QUEUE_VECTOR = 22
VIRTIO_PCI_QUEUE_ADDR_SHIFT = 12
VIRTIO_PCI_ISR_QUEUE = 0x1
VIRTIO_PCI_ISR_CONFIG = 0x2

VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

VIRTIO_PCI_COMMON_DFSELECT = 0
VIRTIO_PCI_COMMON_DF = 4
VIRTIO_PCI_COMMON_GFSELECT = 8
VIRTIO_PCI_COMMON_GF = 12
VIRTIO_PCI_COMMON_MSIX = 16
VIRTIO_PCI_COMMON_NUMQ = 18
VIRTIO_PCI_COMMON_STATUS = 20
VIRTIO_PCI_COMMON_CFGGENERATION = 21
VIRTIO_PCI_COMMON_Q_SELECT = 22
VIRTIO_PCI_COMMON_Q_SIZE = 24
VIRTIO_PCI_COMMON_Q_MSIX = 26
VIRTIO_PCI_COMMON_Q_ENABLE = 28
VIRTIO_PCI_COMMON_Q_NOFF = 30
VIRTIO_PCI_COMMON_Q_DESCLO = 32
VIRTIO_PCI_COMMON_Q_DESCHI = 36
VIRTIO_PCI_COMMON_Q_AVAILLO = 40
VIRTIO_PCI_COMMON_Q_AVAILHI = 44
VIRTIO_PCI_COMMON_Q_USEDLO = 48
VIRTIO_PCI_COMMON_Q_USEDHI = 52

PCI_VENDOR_ID_REDHAT_QUMRANET = 0x1AF4

# -- where things are (QEMU's layout) ---------------------------------------------------
LEGACY_BAR, MSIX_BAR, MODERN_BAR = 0, 1, 4
MSIX_PBA_OFFSET = 0x800
MODERN_BAR_SIZE = 0x4000
REGION_SIZE = 0x1000
COMMON_OFFSET, ISR_OFFSET, DEVICE_OFFSET, NOTIFY_OFFSET = 0x0000, 0x1000, 0x2000, 0x3000
NOTIFY_OFF_MULTIPLIER = 4
LEGACY_HEADER = 20            # VIRTIO_PCI_CONFIG_OFF(0)
LEGACY_HEADER_MSIX = 24       # VIRTIO_PCI_CONFIG_OFF(1)
#: VIRTIO_LEGACY_FEATURES: offered on the legacy interface only
LEGACY_ONLY_FEATURES = 1 << VIRTIO_F_ANY_LAYOUT

U32 = 0xFFFFFFFF


def _cap_payload(cfg_type: int, bar: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """struct virtio_pci_cap after cap_len: cfg_type, bar, id, padding[2], offset, length."""
    return struct.pack("<BBBxxII", cfg_type, bar, 0, offset, length) + extra


class PciCfgCapability(VendorCapability):
    """VIRTIO_PCI_CAP_PCI_CFG: a window through config space onto a BAR (bar, offset, length, data)."""

    BAR, OFFSET, LENGTH, DATA = 4, 8, 12, 16

    def __init__(self, access: Callable[[int, int, int, Optional[int]], int]):
        super().__init__(_cap_payload(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0, bytes(4)))
        self._access = access

    def build(self, config: ConfigSpace, offset: int) -> None:
        super().build(config, offset)
        self._config = config
        config.init(offset + self.BAR, 1, 0, wmask=0xFF)
        config.init(offset + self.OFFSET, 4, 0, wmask=U32)
        config.init(offset + self.LENGTH, 4, 0, wmask=U32)
        config.init(offset + self.DATA, 4, 0, wmask=U32)
        config.on_write(offset + self.DATA, 4, lambda o, s: self._transfer(write=True))

    def covers_data(self, pos: int, size: int) -> bool:
        start = self.offset + self.DATA
        return pos < start + 4 and start < pos + size

    def _transfer(self, write: bool) -> None:
        """``virtio_{read,write}_config``: a 1-, 2- or 4-byte access at (bar, offset) through the data."""
        c, base = self._config, self.offset
        bar, off, length = c.get(base + self.BAR, 1), c.get(base + self.OFFSET, 4), c.get(base + self.LENGTH, 4)
        if length not in (1, 2, 4) or off % length:
            return
        if write:
            self._access(bar, off, length, c.get(base + self.DATA, length))
        else:
            value = self._access(bar, off, length, None)
            c.set(base + self.DATA, length, value)

    def refresh(self) -> None:
        self._transfer(write=False)


class VirtioPciFunction(PciDevice):
    """A transitional virtio PCI function; a subclass is the device (net, ...).

    Subclasses give ``device_id``, ``subsystem_id`` (the virtio device ID),
    ``class_code`` and implement: ``device_features()``, ``config_size()``,
    ``device_config()`` (the config bytes as they are now),
    ``queue_notified(queue)``, ``reset_device()``; optionally
    ``write_config(offset, data, legacy)``, ``validate_features(features)``,
    ``features_changed()``, ``driver_ready()``.  Queue work runs under
    ``self.lock`` through :meth:`run_queue_work`.
    """

    vendor_id = PCI_VENDOR_ID_REDHAT_QUMRANET
    subsystem_vendor_id = PCI_VENDOR_ID_REDHAT_QUMRANET
    revision = 0
    interrupt_pin = 1
    #: the device config page is offered for mmap only when a topology says so (DPDK cannot use it, see above)
    mmap_windows = False
    #: the device status the driver wrote (VIRTIO_CONFIG_S_*), set by reset
    status: int
    # what QEMU's pci_init_wmask makes writable, and what SeaBIOS leaves set
    command_wmask = PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_SERR | \
        PCI_COMMAND_INTX_DISABLE
    firmware_command = PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_SERR

    def __init__(self, name=None, *, queue_sizes: List[int], reset: bool = True, **options):
        super().__init__(name, **options)
        self.can_reset = bool(reset)
        self.queues = [SplitVirtqueue(self.dma, i, size) for i, size in enumerate(queue_sizes)]
        self.legacy = LegacyInterface(self)
        self.modern = ModernInterface(self)
        legacy_size = 4
        while legacy_size < LEGACY_HEADER_MSIX + self.config_size():
            legacy_size *= 2
        self.add_bar(LEGACY_BAR, IoBar(legacy_size, self.legacy.read, self.legacy.write))
        self.add_bar(MSIX_BAR, MmioBar(REGION_SIZE, lambda offset, size: 0, lambda offset, size, value: None))
        modern_bar = self.add_bar(MODERN_BAR, MmioBar(MODERN_BAR_SIZE, self.modern.read, self.modern.write,
                                                      bits64=True, prefetchable=True))
        assert isinstance(modern_bar, MmioBar)
        self.modern_bar = modern_bar
        #: the device config as the driver reads it through BAR4 (or a mapping of that page)
        self.device_cfg = modern_bar.add_window(DEVICE_OFFSET, REGION_SIZE, on_write=self._device_cfg_written)
        for cfg_type, offset in ((VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET), (VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET),
                                 (VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET)):
            self.add_capability(VendorCapability(_cap_payload(cfg_type, MODERN_BAR, offset, REGION_SIZE)))
        self.add_capability(VendorCapability(_cap_payload(VIRTIO_PCI_CAP_NOTIFY_CFG, MODERN_BAR, NOTIFY_OFFSET,
                                                          REGION_SIZE, struct.pack("<I", NOTIFY_OFF_MULTIPLIER))))
        self.pci_cfg = PciCfgCapability(self._bar_window)
        self.add_capability(self.pci_cfg)
        self.add_capability(MsixCapability(1 + len(self.queues), MSIX_BAR, 0, MSIX_BAR, MSIX_PBA_OFFSET))
        self.config.on_write(PCI_COMMAND, 2, lambda o, s: self._command_written())
        self.generation = 0
        self.virtio_reset()

    # -- what a device subclass provides ----------------------------------------------------
    def device_features(self) -> int:
        raise NotImplementedError

    def config_size(self) -> int:
        raise NotImplementedError

    def device_config(self) -> bytes:
        raise NotImplementedError

    def write_config(self, offset: int, data: bytes, legacy: bool) -> None:
        """The driver wrote device config (read-only unless the device says otherwise)."""

    def queue_notified(self, queue: SplitVirtqueue) -> None:
        raise NotImplementedError

    def reset_device(self) -> None:
        raise NotImplementedError

    def validate_features(self, features: int) -> Optional[str]:
        """Why ``features`` cannot be accepted (FEATURES_OK refused), or None."""
        return None

    def features_changed(self) -> None:
        """The driver wrote its features (the device applies them at once, as QEMU's set_features)."""

    def driver_ready(self) -> None:
        """DRIVER_OK was just set."""

    # -- features -----------------------------------------------------------------------------
    def offered_features(self) -> int:
        """Everything the device offers: its own, the ring's, VERSION_1 and ANY_LAYOUT (legacy only)."""
        return (self.device_features() | 1 << VIRTIO_RING_F_INDIRECT_DESC | 1 << VIRTIO_RING_F_EVENT_IDX
                | LEGACY_ONLY_FEATURES | 1 << VIRTIO_F_VERSION_1)

    def has_feature(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def set_driver_features(self, value: int, interface: str) -> None:
        """``virtio_set_features``: ignored once FEATURES_OK is set; bits not offered are dropped."""
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK:
            log.warning("%s: the driver wrote its features after FEATURES_OK: ignored", self.name)
            return
        self.driver_features = value
        offered = self.offered_features() & (U32 if interface == "legacy" else ~LEGACY_ONLY_FEATURES)
        if value & ~offered:
            log.info("%s: the driver accepted features the device did not offer (0x%x): they are ignored",
                     self.name, value & ~offered)
        self.features = value & offered
        for queue in self.queues:
            queue.activate(self.has_feature(VIRTIO_RING_F_EVENT_IDX))
        self.features_changed()

    def _features_ok_refusal(self) -> Optional[str]:
        unoffered = self.driver_features & ~(self.offered_features() & ~LEGACY_ONLY_FEATURES)
        if unoffered:
            return f"it accepted features the device did not offer (0x{unoffered:x})"
        if not self.has_feature(VIRTIO_F_VERSION_1):
            return "a driver of the modern interface must accept VIRTIO_F_VERSION_1"
        return self.validate_features(self.features)

    # -- status and reset -----------------------------------------------------------------------
    def write_status(self, value: int, interface: str) -> None:
        value &= 0xFF
        if value == 0:
            self.reset()
            return
        old = self.status
        new_bits = value & ~old
        if interface == "modern" and new_bits & VIRTIO_CONFIG_S_FEATURES_OK:
            refusal = self._features_ok_refusal()
            if refusal is not None:
                # virtio_set_status: the write is dropped, so FEATURES_OK reads back clear
                log.warning("%s: FEATURES_OK refused: %s", self.name, refusal)
                return
        self.status = (value & ~VIRTIO_CONFIG_S_NEEDS_RESET) | (old & VIRTIO_CONFIG_S_NEEDS_RESET)
        if new_bits & VIRTIO_CONFIG_S_DRIVER_OK:
            self.driver_ready()
            for queue in self.queues:  # buffers the driver offered before DRIVER_OK
                self.kick(queue.index)

    def virtio_reset(self) -> None:
        """``virtio_reset`` + ``virtio_pci_reset``: status, features, selectors, ISR, vectors, queues."""
        self.status = 0
        self.driver_features = 0
        self.features = 0
        self.queue_sel = 0
        self.isr = 0
        self.config_vector = VIRTIO_MSI_NO_VECTOR
        self.broken = False
        self.modern.reset()
        for queue in self.queues:
            queue.reset()
        self.lower_irq(IrqIndex.INTX)

    def reset(self) -> None:
        self.virtio_reset()
        self.reset_device()
        self.update_device_config()

    def _command_written(self) -> None:
        # virtio_write_config: a function that may not master the bus cannot be DRIVER_OK
        if not self.command() & PCI_COMMAND_MASTER and self.status & VIRTIO_CONFIG_S_DRIVER_OK:
            self.status &= ~VIRTIO_CONFIG_S_DRIVER_OK
            log.info("%s: bus mastering was turned off: DRIVER_OK cleared", self.name)

    # -- queues ----------------------------------------------------------------------------------
    @property
    def driver_ok(self) -> bool:
        return bool(self.status & VIRTIO_CONFIG_S_DRIVER_OK)

    def selected_queue(self) -> Optional[SplitVirtqueue]:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def kick(self, index: int) -> None:
        """The driver notified queue ``index`` (a doorbell write): its work runs now, under the lock."""
        if index >= len(self.queues):
            log.debug("%s: notify of queue %d, which does not exist", self.name, index)
            return
        queue = self.queues[index]
        if queue.ready and self.driver_ok and not self.broken and not queue.stopped:
            self.run_queue_work(self.queue_notified, queue)

    def usable(self, queue: SplitVirtqueue) -> bool:
        return queue.ready and self.driver_ok and not self.broken and not queue.stopped

    def run_queue_work(self, fn, *args):
        """Run queue processing; a driver error or a refused DMA puts the device in error, never raises."""
        try:
            return fn(*args)
        except VirtqueueError as e:
            self.device_error(str(e))
        except QueueDmaError as e:
            self.dma_error(e)
        return None

    def device_error(self, message: str) -> None:
        """``virtio_error``: the device needs a reset; told through DEVICE_NEEDS_RESET on the modern path."""
        log.warning("%s: %s: the device stops until it is reset", self.name, message)
        self.broken = True
        if self.has_feature(VIRTIO_F_VERSION_1):
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET
            self.config_changed()

    def dma_error(self, error: QueueDmaError) -> None:
        if self.has_feature(VIRTIO_F_VERSION_1):
            self.device_error(f"DMA of {error}")
            return
        error.queue.stopped = True
        log.warning("%s: DMA of %s: the queue stops until the device is reset (the legacy interface "
                    "has no DEVICE_NEEDS_RESET to report it)", self.name, error)

    # -- interrupts -----------------------------------------------------------------------------
    def notify_queue(self, queue: SplitVirtqueue) -> None:
        """``virtio_irq``: used buffers; ISR bit 0 and the queue's vector (or INTx)."""
        self.isr |= VIRTIO_PCI_ISR_QUEUE
        self._send(queue.vector)

    def config_changed(self) -> None:
        """The device config changed: the page rewritten, a new generation, and ``virtio_notify_config``."""
        self.update_device_config()
        self.generation = (self.generation + 1) & 0xFF
        if not self.driver_ok:
            return
        self.isr |= VIRTIO_PCI_ISR_QUEUE | VIRTIO_PCI_ISR_CONFIG
        self._send(self.config_vector)

    def _send(self, vector: int) -> None:
        if self.msix_enabled():
            if vector != VIRTIO_MSI_NO_VECTOR:
                self.raise_irq(IrqIndex.MSIX, vector)
        elif self.isr & VIRTIO_PCI_ISR_QUEUE:
            self.raise_irq(IrqIndex.INTX)

    def read_isr(self) -> int:
        value, self.isr = self.isr, 0
        self.lower_irq(IrqIndex.INTX)
        return value

    def checked_vector(self, vector: int) -> int:
        """``msix_vector_use`` failing for a vector beyond the table: NO_VECTOR, so the driver sees it."""
        return vector if self.msix is not None and vector < self.msix.vectors else VIRTIO_MSI_NO_VECTOR

    # -- device config, as both interfaces reach it ---------------------------------------------
    def update_device_config(self) -> None:
        """Rewrite the device config page from ``device_config()``: call it whenever that may have changed.

        Past the config's end the page reads all ones, as QEMU's
        ``virtio_config_modern_read*`` answer there.
        """
        data = self.device_config()
        self.device_cfg.write(0, data + b"\xff" * (REGION_SIZE - len(data)))

    def _device_cfg_written(self, offset: int, size: int) -> None:
        # A write through the device fd (or the PCI config access window) stored into the page: the device
        # takes it as virtio_config_modern_write* hands it to set_config, then the page shows the device's view.
        value = int.from_bytes(self.device_cfg.read(offset, size), "little")
        self.write_device_config(offset, size, value, legacy=False)
        self.update_device_config()

    def read_device_config(self, offset: int, size: int) -> int:
        """``virtio_config_readX``: all ones for an access past the config's end."""
        data = self.device_config()
        if offset + size > len(data):
            return (1 << (8 * size)) - 1
        return int.from_bytes(data[offset:offset + size], "little")

    def write_device_config(self, offset: int, size: int, value: int, legacy: bool) -> None:
        if offset + size <= self.config_size():
            self.write_config(offset, value.to_bytes(size, "little"), legacy)
            self.update_device_config()

    # -- config space window (VIRTIO_PCI_CAP_PCI_CFG) ------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        if self.pci_cfg.covers_data(offset, size):
            self.pci_cfg.refresh()
        return super().config_read(offset, size)

    def _bar_window(self, bar: int, offset: int, size: int, value: Optional[int]) -> int:
        if bar != MODERN_BAR or offset + size > MODERN_BAR_SIZE:
            return (1 << (8 * size)) - 1 if value is None else 0
        # virtio_read/write_config dispatch to BAR4's memory region: the registers, or the device config page
        if value is None:
            return self.modern_bar.read(offset, size)
        self.modern_bar.write(offset, size, value)
        return 0


class _Registers:
    """A register window of the function; QEMU's virtio regions take at most 4 bytes, so 8 are two 4s."""

    def __init__(self, fn: VirtioPciFunction):
        self.fn = fn

    def read(self, offset: int, size: int) -> int:
        if size == 8:
            return self.access_read(offset, 4) | self.access_read(offset + 4, 4) << 32
        return self.access_read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 8:
            self.access_write(offset, 4, value & U32)
            self.access_write(offset + 4, 4, value >> 32)
        else:
            self.access_write(offset, size, value)

    def access_read(self, offset: int, size: int) -> int:
        raise NotImplementedError

    def access_write(self, offset: int, size: int, value: int) -> None:
        raise NotImplementedError


class LegacyInterface(_Registers):
    """I/O BAR0: virtio 0.9.5's header, exact offsets only, then the device config."""

    def header_size(self) -> int:
        return LEGACY_HEADER_MSIX if self.fn.msix_enabled() else LEGACY_HEADER

    def access_read(self, offset: int, size: int) -> int:
        fn = self.fn
        header = self.header_size()
        mask = (1 << (8 * size)) - 1
        if offset >= header:
            return fn.read_device_config(offset - header, size)
        queue = fn.selected_queue()
        if offset == VIRTIO_PCI_HOST_FEATURES:
            value = fn.offered_features() & U32
        elif offset == VIRTIO_PCI_GUEST_FEATURES:
            value = fn.features & U32
        elif offset == VIRTIO_PCI_QUEUE_PFN:
            value = queue.desc >> VIRTIO_PCI_QUEUE_ADDR_SHIFT if queue else 0
        elif offset == VIRTIO_PCI_QUEUE_NUM:
            value = queue.size if queue else 0
        elif offset == VIRTIO_PCI_QUEUE_SEL:
            value = fn.queue_sel
        elif offset == VIRTIO_PCI_STATUS:
            value = fn.status
        elif offset == VIRTIO_PCI_ISR:
            value = fn.read_isr()
        elif offset == VIRTIO_MSI_CONFIG_VECTOR:
            value = fn.config_vector
        elif offset == VIRTIO_MSI_QUEUE_VECTOR:
            value = queue.vector if queue else VIRTIO_MSI_NO_VECTOR
        else:
            value = U32
        return value & mask

    def access_write(self, offset: int, size: int, value: int) -> None:
        fn = self.fn
        header = self.header_size()
        if offset >= header:
            fn.write_device_config(offset - header, size, value, legacy=True)
            return
        queue = fn.selected_queue()
        if offset == VIRTIO_PCI_GUEST_FEATURES:
            fn.set_driver_features(value & U32, "legacy")
        elif offset == VIRTIO_PCI_QUEUE_PFN:
            if not value:
                fn.reset()  # QEMU: a PFN of 0 resets the whole device
            elif queue is not None:
                queue.set_legacy_address(value << VIRTIO_PCI_QUEUE_ADDR_SHIFT)
        elif offset == VIRTIO_PCI_QUEUE_SEL:
            fn.queue_sel = value & 0xFFFF
        elif offset == VIRTIO_PCI_QUEUE_NOTIFY:
            fn.kick(value & 0xFFFF)
        elif offset == VIRTIO_PCI_STATUS:
            fn.write_status(value, "legacy")
        elif offset == VIRTIO_MSI_CONFIG_VECTOR:
            fn.config_vector = fn.checked_vector(value & 0xFFFF)
        elif offset == VIRTIO_MSI_QUEUE_VECTOR:
            if queue is not None:
                queue.vector = fn.checked_vector(value & 0xFFFF)
        else:
            log.debug("%s: legacy write of %d bytes at 0x%x, which is no register: ignored", fn.name, size, offset)


class ModernInterface(_Registers):
    """BAR4: the virtio 1.0 common config, ISR and notify regions (the device config page is a window of
    memory, which the BAR serves without these handlers)."""

    def __init__(self, fn: VirtioPciFunction):
        super().__init__(fn)
        self.reset()

    def reset(self) -> None:
        self.dfselect = 0
        self.gfselect = 0

    def access_read(self, offset: int, size: int) -> int:
        fn = self.fn
        mask = (1 << (8 * size)) - 1
        region, off = offset & ~(REGION_SIZE - 1), offset & (REGION_SIZE - 1)
        if region == COMMON_OFFSET:
            return self._common_read(off) & mask
        if region == ISR_OFFSET:
            return fn.read_isr() & mask
        return 0  # notify: reads as 0

    def access_write(self, offset: int, size: int, value: int) -> None:
        fn = self.fn
        region, off = offset & ~(REGION_SIZE - 1), offset & (REGION_SIZE - 1)
        if region == COMMON_OFFSET:
            self._common_write(off, value)
        elif region == NOTIFY_OFFSET:
            fn.kick(off // NOTIFY_OFF_MULTIPLIER)

    def _common_read(self, off: int) -> int:
        fn = self.fn
        queue = fn.selected_queue()
        if off == VIRTIO_PCI_COMMON_DFSELECT:
            return self.dfselect
        if off == VIRTIO_PCI_COMMON_DF:
            offered = fn.offered_features() & ~LEGACY_ONLY_FEATURES
            return (offered >> (32 * self.dfselect)) & U32 if self.dfselect <= 1 else 0
        if off == VIRTIO_PCI_COMMON_GFSELECT:
            return self.gfselect
        if off == VIRTIO_PCI_COMMON_GF:
            return (fn.driver_features >> (32 * self.gfselect)) & U32 if self.gfselect <= 1 else 0
        if off == VIRTIO_PCI_COMMON_MSIX:
            return fn.config_vector
        if off == VIRTIO_PCI_COMMON_NUMQ:
            return len(fn.queues)
        if off == VIRTIO_PCI_COMMON_STATUS:
            return fn.status
        if off == VIRTIO_PCI_COMMON_CFGGENERATION:
            return fn.generation
        if off == VIRTIO_PCI_COMMON_Q_SELECT:
            return fn.queue_sel
        if queue is None:
            return VIRTIO_MSI_NO_VECTOR if off == VIRTIO_PCI_COMMON_Q_MSIX else 0
        return {
            VIRTIO_PCI_COMMON_Q_SIZE: queue.size,
            VIRTIO_PCI_COMMON_Q_MSIX: queue.vector,
            VIRTIO_PCI_COMMON_Q_ENABLE: int(queue.enabled),
            VIRTIO_PCI_COMMON_Q_NOFF: queue.index,
            VIRTIO_PCI_COMMON_Q_DESCLO: queue.reg_desc & U32,
            VIRTIO_PCI_COMMON_Q_DESCHI: queue.reg_desc >> 32,
            VIRTIO_PCI_COMMON_Q_AVAILLO: queue.reg_avail & U32,
            VIRTIO_PCI_COMMON_Q_AVAILHI: queue.reg_avail >> 32,
            VIRTIO_PCI_COMMON_Q_USEDLO: queue.reg_used & U32,
            VIRTIO_PCI_COMMON_Q_USEDHI: queue.reg_used >> 32,
        }.get(off, 0)

    def _common_write(self, off: int, value: int) -> None:
        fn = self.fn
        queue = fn.selected_queue()
        if off == VIRTIO_PCI_COMMON_DFSELECT:
            self.dfselect = value & U32
        elif off == VIRTIO_PCI_COMMON_GFSELECT:
            self.gfselect = value & U32
        elif off == VIRTIO_PCI_COMMON_GF:
            if self.gfselect <= 1:
                shift = 32 * self.gfselect
                fn.set_driver_features((fn.driver_features & ~(U32 << shift)) | (value & U32) << shift, "modern")
        elif off == VIRTIO_PCI_COMMON_MSIX:
            fn.config_vector = fn.checked_vector(value & 0xFFFF)
        elif off == VIRTIO_PCI_COMMON_STATUS:
            fn.write_status(value, "modern")
        elif off == VIRTIO_PCI_COMMON_Q_SELECT:
            fn.queue_sel = value & 0xFFFF
        elif queue is None:
            log.debug("%s: queue register 0x%x written with queue %d selected, which does not exist",
                      fn.name, off, fn.queue_sel)
        elif off == VIRTIO_PCI_COMMON_Q_MSIX:
            queue.vector = fn.checked_vector(value & 0xFFFF)
        elif off == VIRTIO_PCI_COMMON_Q_ENABLE:
            self._queue_enable(queue, value & 0xFFFF)
        elif queue.enabled and off in _QUEUE_CONFIG:
            log.warning("%s: queue %d is enabled: its register 0x%x cannot change", fn.name, queue.index, off)
        elif off == VIRTIO_PCI_COMMON_Q_SIZE:
            size = value & 0xFFFF
            if size & (size - 1) or not 0 < size <= queue.max_size:
                log.warning("%s: queue %d: a size of %d is refused (a power of two up to %d)",
                            fn.name, queue.index, size, queue.max_size)
            else:
                queue.size = size
        elif off in _QUEUE_ADDRESS:
            attr, high = _QUEUE_ADDRESS[off]
            old = getattr(queue, attr)
            new = (old & U32) | (value & U32) << 32 if high else (old & ~U32) | (value & U32)
            setattr(queue, attr, new)

    def _queue_enable(self, queue: SplitVirtqueue, value: int) -> None:
        if value != 1:
            self.fn.device_error(f"queue {queue.index}: queue_enable written with {value} (only 1 is allowed)")
            return
        if queue.enabled:
            return
        queue.set_rings(queue.reg_desc, queue.reg_avail, queue.reg_used)
        queue.enabled = True


_QUEUE_ADDRESS = {
    VIRTIO_PCI_COMMON_Q_DESCLO: ("reg_desc", False), VIRTIO_PCI_COMMON_Q_DESCHI: ("reg_desc", True),
    VIRTIO_PCI_COMMON_Q_AVAILLO: ("reg_avail", False), VIRTIO_PCI_COMMON_Q_AVAILHI: ("reg_avail", True),
    VIRTIO_PCI_COMMON_Q_USEDLO: ("reg_used", False), VIRTIO_PCI_COMMON_Q_USEDHI: ("reg_used", True),
}
_QUEUE_CONFIG = set(_QUEUE_ADDRESS) | {VIRTIO_PCI_COMMON_Q_SIZE}
