"""PCI capabilities a model adds to its config space: PM, MSI, MSI-X, PCI Express, vendor, extended."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from .config import ConfigSpace
from .irq import IrqIndex
from .regs import (
    PCI_CAP_EXP_ENDPOINT_SIZEOF_V2,
    PCI_CAP_FLAGS,
    PCI_CAP_ID_EXP,
    PCI_CAP_ID_MSI,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_PM,
    PCI_CAP_ID_VNDR,
    PCI_CAP_MSIX_SIZEOF,
    PCI_D0,
    PCI_D3HOT,
    PCI_EXP_DEVCAP,
    PCI_EXP_DEVCAP_FLR,
    PCI_EXP_DEVCTL,
    PCI_EXP_DEVCTL2,
    PCI_EXP_DEVCTL_BCR_FLR,
    PCI_EXP_DEVSTA,
    PCI_EXP_FLAGS,
    PCI_EXP_TYPE_ENDPOINT,
    PCI_EXT_CAP_ID_VNDR,
    PCI_MSI_ADDRESS_HI,
    PCI_MSI_ADDRESS_LO,
    PCI_MSI_DATA_32,
    PCI_MSI_DATA_64,
    PCI_MSI_FLAGS,
    PCI_MSI_FLAGS_64BIT,
    PCI_MSI_FLAGS_ENABLE,
    PCI_MSI_FLAGS_MASKBIT,
    PCI_MSI_FLAGS_QSIZE,
    PCI_MSI_MASK_32,
    PCI_MSI_MASK_64,
    PCI_MSIX_ENTRY_CTRL_MASKBIT,
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_ENTRY_VECTOR_CTRL,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_MASKALL,
    PCI_MSIX_PBA,
    PCI_MSIX_TABLE,
    PCI_PM_CTRL,
    PCI_PM_CTRL_NO_SOFT_RESET,
    PCI_PM_CTRL_STATE_MASK,
    PCI_PM_PMC,
    PCI_PM_SIZEOF,
)

if TYPE_CHECKING:
    from .device import PciDevice

# -- capabilities --------------------------------------------------------------
class Capability:
    """A standard capability: ``cap_id``, its length, and how it lays itself out."""

    cap_id = 0
    extended = False
    #: an extended capability's version (bits 19:16 of its header)
    version = 0
    #: the function it was added to, and where (set by ``PciDevice.add_capability``)
    device: Optional[PciDevice] = None
    offset = 0
    #: the config space it lives in, for the capabilities that keep it (set by ``build``)
    _config: ConfigSpace

    @property
    def _fn(self) -> PciDevice:
        """The function it was added to: only an added capability acts."""
        assert self.device is not None, f"{type(self).__name__} was not added to a function"
        return self.device

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
                             (self._config.get(self.offset + PCI_PM_CTRL, 1) & ~3) | self._fn.power_state)
            return
        old, self._fn.power_state = self._fn.power_state, state
        if old == PCI_D3HOT and state == PCI_D0 and not self.no_soft_reset:
            self._fn.reset_function()


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
        # MSI Enable is in the flags' low byte (as Multiple Message Enable is)
        return bool(self._config.data[self.offset + PCI_MSI_FLAGS] & PCI_MSI_FLAGS_ENABLE)

    def enabled_vectors(self) -> int:
        return self._vectors_of(self.flags())

    def _vectors_of(self, flags: int) -> int:
        return min(self.vectors, 1 << ((flags & PCI_MSI_FLAGS_QSIZE) >> 4))

    def _masked(self, vector: int) -> bool:
        return self.per_vector_mask and bool(self._config.get(self._mask_reg, 4) >> vector & 1)

    def notify(self, vector: int) -> None:
        # The flags' low byte, read once: enabled, and how many vectors (Multiple Message Enable)
        flags = self._config.data[self.offset + PCI_MSI_FLAGS]
        if not flags & PCI_MSI_FLAGS_ENABLE or vector >= self.vectors \
                or vector >= 1 << ((flags & PCI_MSI_FLAGS_QSIZE) >> 4):
            return
        if self.per_vector_mask and self._masked(vector):
            pending = self._config.get(self._mask_reg + 4, 4)
            self._config.set(self._mask_reg + 4, 4, pending | (1 << vector))
            return
        fn = self.device
        assert fn is not None, "only an added capability sends"
        if fn.irq_sink is not None:
            fn.irq_sink.msi_message(IrqIndex.MSI, vector)

    def _deliver_pending(self) -> None:
        if not self.per_vector_mask or not self.enabled():
            return
        pending = self._config.get(self._mask_reg + 4, 4)
        for vector in range(self.vectors):
            if pending >> vector & 1 and not self._masked(vector):
                pending &= ~(1 << vector)
                self._config.set(self._mask_reg + 4, 4, pending)
                self._fn._send_msi(IrqIndex.MSI, vector)

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
        return bool(self._config.get(self.offset + PCI_MSIX_FLAGS, 2) & PCI_MSIX_FLAGS_ENABLE)

    def entry_masked(self, vector: int) -> bool:
        ctrl = int.from_bytes(self.table[vector * 16 + 12:vector * 16 + 16], "little")
        return bool(ctrl & PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def _blocked(self, vector: int) -> bool:
        return bool(self.flags() & PCI_MSIX_FLAGS_MASKALL) or self.entry_masked(vector)

    def notify(self, vector: int) -> None:
        # The flags' high byte, read once: enabled, and the function mask
        flags = self._config.data[self.offset + PCI_MSIX_FLAGS + 1] << 8
        if not flags & PCI_MSIX_FLAGS_ENABLE or vector >= self.vectors:
            return
        # Vector Control's Mask Bit is bit 0 of the entry's last dword
        if flags & PCI_MSIX_FLAGS_MASKALL or self.table[vector * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL] \
                & PCI_MSIX_ENTRY_CTRL_MASKBIT:
            self.pending |= 1 << vector
            return
        fn = self.device
        assert fn is not None, "only an added capability sends"
        if fn.irq_sink is not None:
            fn.irq_sink.msi_message(IrqIndex.MSIX, vector)

    def _deliver_pending(self) -> None:
        if not self.enabled():
            return
        for vector in range(self.vectors):
            if self.pending >> vector & 1 and not self._blocked(vector):
                self.pending &= ~(1 << vector)
                self._fn._send_msi(IrqIndex.MSIX, vector)

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
            self._fn.reset_function()


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
