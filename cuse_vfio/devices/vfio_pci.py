"""vfio-pci: a PCI function (:mod:`.pci`) presented to user space as a VFIO device.

``VfioPciDevice`` implements ``cuse_vfio.core.ops.DeviceOps`` the way
``drivers/vfio/pci/vfio_pci_core.c`` (6.1) implements ``vfio_device_ops``:

* Regions at ``index << 40``: BAR0-5, ROM, CONFIG, VGA (never present: EINVAL).
  BAR reads and writes are split into naturally aligned accesses of 8, 4, 2
  or 1 bytes (``io_width=4`` for the 6.1 split, which has no 8-byte access);
  the MSI-X table reads as 0xff and drops writes; a memory BAR fails with EIO
  while the (virtual) memory-enable bit is clear.
* Config space is virtualized rule for rule as ``vfio_pci_config.c`` does it:
  IDs and the capability pointers come from a virtual copy; BARs are entirely
  virtual (sizing works on the copy, the function's BARs never change); the
  command register goes to the function except INTx-disable, which is virtual
  and masks INTx; status writes are dropped (so RW1C bits cannot be cleared
  from user space); interrupt line is virtual and writable, pin virtual and
  read-only; MSI flags, address and data are virtual, and the MSI Enable bit
  survives a write only while MSI is enabled through SET_IRQS (the value is
  also written to the function); MSI-X control is read from the function, so
  its Enable bit follows SET_IRQS; capabilities vfio-pci does not know are
  hidden from the chain; PM state changes are done by "the host"; PCIe FLR
  and MRRS are virtualized; unassigned config bytes pass through.
* Interrupts as ``vfio_pci_intrs.c``: INTx is automasked when it fires, in the
  function's own INTx-disable bit (a PCI 2.3 function), and UNMASK re-signals
  instead while the function still has it pending; MSI/MSI-X vectors map to
  eventfds, their count fixed when enabled (NORESIZE: no dynamic MSI-X in 6.1);
  ERR (PCI Express only) and REQ are single eventfds.  The MSI Enable the user
  reads is the virtual one it wrote, as on the kernel; MSI-X's is the function's.
* Eventfds come from the caller: ``arg.caller.get_eventfd(fd)`` returns an
  object with ``signal()`` (and optionally ``release()``; ``watch(callback)``
  returning a cancel function, for the unmask irqfd and IOEVENTFD).
* Resets: VFIO_DEVICE_FLAGS_RESET when the function has a reset method
  (:meth:`VfioPciDevice.reset_methods`); hot reset through a
  :class:`HotResetBus` with the group-fd rules; the 6.1 low-power features
  (runtime suspend between accesses, wake-up eventfd) are the only
  DEVICE_FEATUREs.
* mmap: a plain-memory BAR's memfd (:meth:`VfioPciDevice.region_memory`,
  :meth:`VfioPciDevice.mmap`) is what a transport hands to the client.
* DMA: ``set_dma_space(space)`` (the IOMMU driver's ``DmaSpace``, or None) is
  attached to the function's ``DmaPort``; the model never holds it.
* Model code that raises fails one access with EIO (:class:`ModelFailure`).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import uuid
from typing import Callable, Dict, List, Optional

from ..errors import RetryRequest, VfioError
from ..uapi import (
    VFIO_DEVICE_FEATURE,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY,
    VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP,
    VFIO_DEVICE_FEATURE_LOW_POWER_EXIT,
    VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
    VFIO_DEVICE_FEATURE_MIGRATION,
    VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
    VFIO_DEVICE_FLAGS_PCI,
    VFIO_DEVICE_FLAGS_RESET,
    VFIO_DEVICE_GET_INFO,
    VFIO_DEVICE_GET_IRQ_INFO,
    VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
    VFIO_DEVICE_GET_REGION_INFO,
    VFIO_DEVICE_IOEVENTFD,
    VFIO_DEVICE_IOEVENTFD_SIZE_MASK,
    VFIO_DEVICE_PCI_HOT_RESET,
    VFIO_DEVICE_RESET,
    VFIO_DEVICE_SET_IRQS,
    VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_INFO_MASKABLE,
    VFIO_IRQ_INFO_NORESIZE,
    VFIO_IRQ_SET_ACTION_MASK,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_TYPE_MASK,
    VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    VFIO_IRQ_SET_DATA_TYPE_MASK,
    VFIO_PCI_BAR5_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_ERR_IRQ_INDEX,
    VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_NUM_IRQS,
    VFIO_PCI_NUM_REGIONS,
    VFIO_PCI_REQ_IRQ_INDEX,
    VFIO_PCI_ROM_REGION_INDEX,
    VFIO_PCI_VGA_REGION_INDEX,
    VFIO_REGION_INFO_CAP_MSIX_MAPPABLE,
    VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
    offsetofend,
    vfio_device_feature,
    vfio_device_info,
    vfio_device_ioeventfd,
    vfio_device_low_power_entry_with_wakeup,
    vfio_iommu_type1_info,
    vfio_irq_info,
    vfio_irq_set,
    vfio_pci_dependent_device,
    vfio_pci_hot_reset,
    vfio_pci_hot_reset_info,
    vfio_region_info,
)
from ..uapi.caps import CapChain
from .pci import (
    PCI_BASE_ADDRESS_0,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_CAP_FLAGS,
    PCI_CAP_ID_EXP,
    PCI_CAP_ID_MSI,
    PCI_CAP_ID_PM,
    PCI_CAP_ID_VNDR,
    PCI_CAP_LIST_NEXT,
    PCI_CAPABILITY_LIST,
    PCI_CFG_SPACE_SIZE,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_IO,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_D3HOT,
    PCI_DEVICE_ID,
    PCI_EXP_DEVCAP,
    PCI_EXP_DEVCAP_FLR,
    PCI_EXP_DEVCTL,
    PCI_EXP_DEVCTL2,
    PCI_EXP_DEVCTL_BCR_FLR,
    PCI_EXP_DEVCTL_PHANTOM,
    PCI_EXP_FLAGS,
    PCI_EXP_FLAGS_TYPE,
    PCI_EXP_TYPE_RC_END,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
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
    PCI_MSI_PENDING_32,
    PCI_MSI_PENDING_64,
    PCI_MSIX_FLAGS,
    PCI_PM_CAP_PME_MASK,
    PCI_PM_CTRL,
    PCI_PM_CTRL_STATE_MASK,
    PCI_PM_PMC,
    PCI_ROM_ADDRESS,
    PCI_ROM_ADDRESS_ENABLE,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_STATUS_INTERRUPT,
    PCI_STD_HEADER_SIZEOF,
    PCI_STD_NUM_BARS,
    PCI_VENDOR_ID,
    PciDevice,
    SharedMemory,
)

log = logging.getLogger(__name__)

#: vfio-pci's region layout (vfio_pci_core.h): region index in the top bits of the file offset
VFIO_PCI_OFFSET_SHIFT = 40
VFIO_PCI_OFFSET_MASK = (1 << VFIO_PCI_OFFSET_SHIFT) - 1
#: most ioeventfds one device takes (vfio_pci_priv.h)
VFIO_PCI_IOEVENTFD_MAX = 1000
PAGE_SIZE = 4096
U32_MAX = 0xFFFFFFFF


def VFIO_PCI_INDEX_TO_OFFSET(index: int) -> int:
    return index << VFIO_PCI_OFFSET_SHIFT


# =============================================================================
# Config space virtualization (vfio_pci_config.c)
# =============================================================================
PCI_CAP_ID_BASIC = 0          # the fake capability id of the standard header
PCI_CAP_ID_INVALID = 0xFF     # bytes no capability claims: raw access
PCI_CAP_ID_INVALID_VIRT = 0xFE
PCI_CAP_ID_MAX = 0x14         # PCI_CAP_ID_EA
PCI_EXT_CAP_ID_MAX = 0x2E     # PCI_EXT_CAP_ID_DOE (6.1)
VAR = 0xFF                    # variable length, computed from the capability

# Lengths of the capabilities vfio-pci shows; 0 (or absent) hides one from the chain.
PCI_CAP_LENGTH = {
    PCI_CAP_ID_BASIC: PCI_STD_HEADER_SIZEOF, PCI_CAP_ID_PM: 8, 0x02: 12, 0x03: 8, PCI_CAP_ID_MSI: VAR,
    0x07: VAR, 0x08: VAR, PCI_CAP_ID_VNDR: VAR, PCI_CAP_ID_EXP: VAR, 0x11: 12, 0x12: VAR, 0x13: 6,
}
PCI_EXT_CAP_LENGTH = {
    0x01: 0x2C, 0x02: VAR, 0x03: 12, 0x04: 16, 0x08: VAR, 0x09: VAR, 0x0B: VAR, 0x0D: VAR,
    0x0E: 8, 0x0F: 8, 0x10: 0x40, 0x12: 40, 0x13: 0x10, 0x15: VAR, 0x16: VAR, 0x17: VAR,
    0x18: 8, 0x23: VAR,
}


def _is_bar(offset: int) -> bool:
    return PCI_BASE_ADDRESS_0 <= offset < PCI_BASE_ADDRESS_0 + 24 or PCI_ROM_ADDRESS <= offset < PCI_ROM_ADDRESS + 4


class _Perm:
    """``struct perm_bits``: per byte, which bits are virtual and which are writable."""

    def __init__(self, size: int = 0, read: str = "default", write: Optional[str] = "default"):
        size = (size + 3) & ~3
        self.virt = bytearray(size)
        self.write = bytearray(size)
        self.readfn = read
        self.writefn = write

    def set(self, offset: int, size: int, virt: int, write: int) -> "_Perm":
        self.virt[offset:offset + size] = (virt & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        self.write[offset:offset + size] = (write & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        return self

    def masks(self, offset: int, count: int):
        virt = int.from_bytes(self.virt[offset:offset + count].ljust(count, b"\0"), "little")
        write = int.from_bytes(self.write[offset:offset + count].ljust(count, b"\0"), "little")
        return virt, write


ALL = 0xFFFFFFFF


def _basic_perm() -> _Perm:
    p = _Perm(PCI_STD_HEADER_SIZEOF, read="basic", write="basic")
    p.set(PCI_VENDOR_ID, 2, ALL, 0).set(PCI_DEVICE_ID, 2, ALL, 0)
    # INTx disable is virtual: vfio-pci masks INTx with it itself
    p.set(PCI_COMMAND, 2, PCI_COMMAND_INTX_DISABLE, ALL)
    p.set(PCI_STATUS, 2, PCI_STATUS_CAP_LIST, 0)
    for reg in (0x0C, 0x0D, 0x0F):  # cache line size, latency timer, BIST: no harm
        p.set(reg, 1, 0, ALL)
    for reg in range(PCI_BASE_ADDRESS_0, PCI_BASE_ADDRESS_0 + 24, 4):
        p.set(reg, 4, ALL, ALL)
    p.set(PCI_ROM_ADDRESS, 4, ALL, ALL)
    p.set(PCI_CAPABILITY_LIST, 1, ALL, 0)
    p.set(PCI_INTERRUPT_LINE, 1, ALL, ALL)
    p.set(PCI_INTERRUPT_PIN, 1, ALL, 0)
    return p


def _pm_perm() -> _Perm:
    p = _Perm(8, write="pm").set(PCI_CAP_LIST_NEXT, 1, ALL, 0)
    p.set(PCI_PM_PMC, 2, PCI_PM_CAP_PME_MASK, 0)
    pme = 0x0100 | 0x8000  # PME_Enable, PME_Status
    return p.set(PCI_PM_CTRL, 4, pme, ~(pme | PCI_PM_CTRL_STATE_MASK))


def _pcix_perm() -> _Perm:
    return _Perm(24).set(PCI_CAP_LIST_NEXT, 1, ALL, 0).set(2, 2, 0, ALL).set(8, 4, 0, ALL)


def _exp_perm() -> _Perm:
    p = _Perm(0x3C, write="exp").set(PCI_CAP_LIST_NEXT, 1, ALL, 0)
    # devctl: FLR, MPS and MRRS virtual; phantom functions never writable; ARI (devctl2) set at probe
    p.set(PCI_EXP_DEVCTL, 2, PCI_EXP_DEVCTL_BCR_FLR | 0x00E0 | 0x7000, ~PCI_EXP_DEVCTL_PHANTOM)
    return p.set(PCI_EXP_DEVCTL2, 2, 0, ~0x0020)


def _msi_perm(length: int, flags: int) -> _Perm:
    p = _Perm(length, read="msi", write="msi").set(PCI_CAP_LIST_NEXT, 1, ALL, 0)
    p.set(PCI_MSI_FLAGS, 1, ALL, ALL)  # the upper byte of the control register is reserved
    p.set(PCI_MSI_ADDRESS_LO, 4, ALL, ALL)
    if flags & PCI_MSI_FLAGS_64BIT:
        p.set(PCI_MSI_ADDRESS_HI, 4, ALL, ALL).set(PCI_MSI_DATA_64, 2, ALL, ALL)
        if flags & PCI_MSI_FLAGS_MASKBIT:
            p.set(PCI_MSI_MASK_64, 4, 0, ALL).set(PCI_MSI_PENDING_64, 4, 0, ALL)
    else:
        p.set(PCI_MSI_DATA_32, 2, ALL, ALL)
        if flags & PCI_MSI_FLAGS_MASKBIT:
            p.set(PCI_MSI_MASK_32, 4, 0, ALL).set(PCI_MSI_PENDING_32, 4, 0, ALL)
    return p


def _err_perm() -> _Perm:
    p = _Perm(0x2C).set(0, 4, ALL, 0)
    # UND, DLP, SURPDN, POISON_TLP, FCP, COMP_TIME, COMP_ABORT, UNX_COMP, RX_OVER, MALF_TLP,
    # ECRC, UNSUP, ACSV, INTN, MCBTLP, ATOMEG, TLPPRE
    unc = 0x00000001 | 0x00000010 | 0x00000020 | 0x00001000 | 0x00002000 | 0x00004000 | 0x00008000 | \
        0x00010000 | 0x00020000 | 0x00040000 | 0x00080000 | 0x00100000 | 0x00200000 | 0x00400000 | \
        0x00800000 | 0x01000000 | 0x02000000
    for reg in (0x04, 0x08, 0x0C):
        p.set(reg, 4, 0, unc)
    cor = 0x0001 | 0x0040 | 0x0080 | 0x0100 | 0x1000 | 0x2000 | 0x4000 | 0x8000
    p.set(0x10, 4, 0, cor).set(0x14, 4, 0, cor)
    return p.set(0x18, 4, 0, 0x0020 | 0x0080)


def _pwr_perm() -> _Perm:
    return _Perm(16).set(0, 4, ALL, 0).set(4, 1, 0, ALL)


_DIRECT_RO = _Perm(read="direct", write=None)
_UNASSIGNED = _Perm(read="raw", write="raw")
_VIRT = _Perm(read="virt", write="virt")
_CAP_PERMS: Dict[int, _Perm] = {
    PCI_CAP_ID_BASIC: _basic_perm(), PCI_CAP_ID_PM: _pm_perm(), 0x07: _pcix_perm(),
    PCI_CAP_ID_VNDR: _Perm(read="direct", write="raw"), PCI_CAP_ID_EXP: _exp_perm(),
}
_ECAP_PERMS: Dict[int, _Perm] = {
    0x01: _err_perm(), 0x04: _pwr_perm(),
    0x0B: _Perm(read="direct", write="raw"), 0x23: _Perm(read="direct", write="raw"),
}


class VirtualConfig:
    """The config space user space sees: ``vconfig``, the capability map, and the rules."""

    def __init__(self, vdev: "VfioPciDevice"):
        self.vdev = vdev
        fn = vdev.function
        self.size = fn.config.size
        self.vconfig = bytearray(fn.config.size)
        self.map = [PCI_CAP_ID_INVALID] * self.size
        self.msi_perm: Optional[_Perm] = None
        self.extended_caps = False
        self.bardirty = True
        for i in range(PCI_STD_HEADER_SIZEOF):
            self.map[i] = PCI_CAP_ID_BASIC
        self._fill(0, PCI_STD_HEADER_SIZEOF)
        if not fn.interrupt_pin:
            self.vconfig[PCI_INTERRUPT_PIN] = 0
        self._cap_init()
        self._ecap_init()

    # -- the "physical" function, as pci_user_{read,write}_config_* reach it
    def _phys_read(self, pos: int, count: int) -> int:
        return self.vdev.function.config_read(pos, count)

    def _phys_write(self, pos: int, count: int, value: int) -> None:
        self.vdev.function.config_write(pos, count, value)

    def _fill(self, pos: int, length: int) -> None:
        self.vconfig[pos:pos + length] = self.vdev.function.config.data[pos:pos + length]

    def _vget(self, pos: int, count: int) -> int:
        return int.from_bytes(self.vconfig[pos:pos + count], "little")

    def _vset(self, pos: int, count: int, value: int) -> None:
        self.vconfig[pos:pos + count] = (value & ((1 << 8 * count) - 1)).to_bytes(count, "little")

    # -- building the map (vfio_cap_init / vfio_ecap_init) -------------------
    def _cap_len(self, cap: int, pos: int) -> int:
        length = PCI_CAP_LENGTH.get(cap, 0) if 0 < cap <= PCI_CAP_ID_MAX else 0
        if length != VAR:
            return length
        rd = self._phys_read
        if cap == PCI_CAP_ID_MSI:
            flags = rd(pos + PCI_MSI_FLAGS, 2)
            length = 10 + (4 if flags & PCI_MSI_FLAGS_64BIT else 0) + (10 if flags & PCI_MSI_FLAGS_MASKBIT else 0)
            if self.msi_perm is None:
                self.msi_perm = _msi_perm(length, flags)
            return length
        if cap == 0x07:  # PCI-X
            return 24 if (rd(pos + 2, 2) >> 12) & 3 else 8
        if cap == PCI_CAP_ID_VNDR:
            return rd(pos + PCI_CAP_FLAGS, 1)
        if cap == PCI_CAP_ID_EXP:
            if self.size > PCI_CFG_SPACE_SIZE:
                self.extended_caps = rd(PCI_CFG_SPACE_SIZE, 4) != 0
            flags = rd(pos + PCI_EXP_FLAGS, 2)
            rc_end = (flags & PCI_EXP_FLAGS_TYPE) >> 4 == PCI_EXP_TYPE_RC_END
            if flags & 0xF == 1:
                return 0xC if rc_end else 0x24
            return 0x2C if rc_end else 0x3C
        if cap == 0x08:  # HyperTransport
            return 24 if rd(pos + 3, 1) & 0xE0 else 28
        if cap == 0x12:  # SATA
            return 16 if rd(pos + 4, 1) & 0xF == 0xF else 8
        return 0

    def _ecap_len(self, ecap: int, epos: int) -> int:
        length = PCI_EXT_CAP_LENGTH.get(ecap, 0) if ecap <= PCI_EXT_CAP_ID_MAX else 0
        if length != VAR:
            return length
        rd = self._phys_read
        if ecap == 0x0B:  # vendor-specific: the length is in the VSEC header
            return rd(epos + 4, 4) >> 20
        if ecap in (0x02, 0x08, 0x09):  # VC, MFVC, VC9
            evcc = rd(epos + 4, 4) & 0x7
            cap2 = rd(epos + 8, 4)
            phases = 128 if cap2 & 0x8 else 64 if cap2 & 0x4 else 32 if cap2 & 0x2 else 0
            length = 0x10 + (1 + evcc) * 0xC
            if phases:
                length = ((length + 15) & ~15) + phases * 4 // 8
            return length
        if ecap == 0x0D:  # ACS
            if rd(epos + 4, 1) & 0x20:  # egress control: a bit vector follows
                bits = rd(epos + 5, 1)
                bits = ((bits + 31) & ~31) if bits else 256
                return 8 + bits // 8
            return 8
        if ecap == 0x15:  # resizable BAR
            return 4 + ((rd(epos + 8, 1) & 0xE0) >> 5) * 8
        if ecap == 0x16:  # DPA
            return 16 + (rd(epos + 4, 1) & 0x1F) + 1
        if ecap == 0x17:  # TPH
            cap = rd(epos + 4, 4)
            if cap & 0x600 == 0x200:
                return 12 + ((cap >> 16) & 0x7FF) * 2 + 2
            return 12
        if ecap == 0x23:  # DVSEC
            return (rd(epos + 4, 4) >> 20) & 0xFFF
        return 0

    def _cap_init(self) -> None:
        rd = self._phys_read
        if not rd(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST:
            return
        pos = rd(PCI_CAPABILITY_LIST, 1)
        prev = PCI_CAPABILITY_LIST
        caps = 0
        loops = (PCI_CFG_SPACE_SIZE - PCI_STD_HEADER_SIZEOF) // 4
        while pos and loops:
            loops -= 1
            cap, nxt = rd(pos, 1), rd(pos + PCI_CAP_LIST_NEXT, 1)
            length = self._cap_len(cap, pos) if cap else 0
            if not length:
                # Hidden: the previous pointer skips it (ID 0 is a NULL capability).
                self.vconfig[prev] = nxt
                pos = nxt
                continue
            for i in range(length):
                self.map[pos + i] = cap
            self._fill(pos, length)
            if cap == PCI_CAP_ID_PM:
                # The user cannot process PME: PME support, status and enable read as 0.
                self._vset(pos + PCI_PM_PMC, 2, self._vget(pos + PCI_PM_PMC, 2) & ~PCI_PM_CAP_PME_MASK)
                self._vset(pos + PCI_PM_CTRL, 2, self._vget(pos + PCI_PM_CTRL, 2) & ~0x8100)
            prev = pos + PCI_CAP_LIST_NEXT
            pos = nxt
            caps += 1
        if not caps:
            self._vset(PCI_STATUS, 2, self._vget(PCI_STATUS, 2) & ~PCI_STATUS_CAP_LIST)

    def _ecap_init(self) -> None:
        if not self.extended_caps:
            return
        epos = PCI_CFG_SPACE_SIZE
        prev: Optional[int] = None
        ecaps = 0
        loops = (self.size - PCI_CFG_SPACE_SIZE) // 4
        while loops and epos >= PCI_CFG_SPACE_SIZE:
            loops -= 1
            header = self._phys_read(epos, 4)
            ecap = header & 0xFFFF
            length = self._ecap_len(ecap, epos)
            hidden = False
            if not length:
                if prev is not None:
                    # Not the first: the previous header's next pointer skips it.
                    epos = (header >> 20) & 0xFFC
                    self._vset(prev, 4, (self._vget(prev, 4) & ~(0xFFC << 20)) | (epos << 20))
                    continue
                # The first anchors the list: keep a placeholder that only links onwards.
                length, hidden = 4, True
            for i in range(length):
                self.map[epos + i] = ecap
            self._fill(epos, length)
            if hidden:
                self._vset(epos, 4, self._vget(epos, 4) & (0xFFC << 20))
            else:
                ecaps += 1
            prev = epos
            epos = (header >> 20) & 0xFFC
        if not ecaps:
            self._vset(PCI_CFG_SPACE_SIZE, 4, 0)

    def _find_cap_start(self, pos: int) -> int:
        cap = self.map[pos]
        if cap == PCI_CAP_ID_BASIC and pos < PCI_STD_HEADER_SIZEOF:
            return 0
        base = PCI_CFG_SPACE_SIZE if pos >= PCI_CFG_SPACE_SIZE else PCI_STD_HEADER_SIZEOF
        while pos - 1 >= base and self.map[pos - 1] == cap:
            pos -= 1
        return pos

    # -- one access (vfio_config_do_rw) ----------------------------------------
    def access(self, pos: int, count: int, value: Optional[int]) -> tuple:
        """Do the first chunk of an access at ``pos``; returns (bytes done, value read)."""
        i = 1
        while (pos + i) % 4 and pos + i < self.size and self.map[pos + i] == self.map[pos]:
            i += 1
        count = min(count, i)
        count = 4 if count >= 4 and not pos % 4 else 2 if count >= 2 and not pos % 2 else 1
        cap = self.map[pos]
        if cap == PCI_CAP_ID_INVALID:
            perm, start = _UNASSIGNED, pos
        elif cap == PCI_CAP_ID_INVALID_VIRT:
            perm, start = _VIRT, pos
        elif pos >= PCI_CFG_SPACE_SIZE:
            perm = _DIRECT_RO if cap > PCI_EXT_CAP_ID_MAX else _ECAP_PERMS.get(cap, _DIRECT_RO)
            start = self._find_cap_start(pos)
        else:
            perm = self.msi_perm if cap == PCI_CAP_ID_MSI else _CAP_PERMS.get(cap, _DIRECT_RO)
            start = self._find_cap_start(pos) if cap != PCI_CAP_ID_BASIC else 0
        offset = pos - start
        if value is not None:
            if perm.writefn is not None:
                getattr(self, "_write_" + perm.writefn)(pos, count, perm, offset, value & ((1 << 8 * count) - 1))
            return count, 0
        return count, getattr(self, "_read_" + perm.readfn)(pos, count, perm, offset)

    # -- read functions ----------------------------------------------------------
    def _read_default(self, pos, count, perm, offset) -> int:
        val = self._vget(pos, count)
        virt, _ = perm.masks(offset, count)
        if virt != (1 << 8 * count) - 1:
            val = (self._phys_read(pos, count) & ~virt) | (val & virt)
        return val

    def _read_direct(self, pos, count, perm, offset) -> int:
        val = self._phys_read(pos, count)
        if pos >= PCI_CFG_SPACE_SIZE:
            if offset < 4:  # extended header: ID and next pointer are virtual
                val = self._vget(pos, count)
        elif pos >= PCI_STD_HEADER_SIZEOF:
            if offset == 0 and count > 1:
                n = min(PCI_CAP_FLAGS, count)
                val = (val & ~((1 << 8 * n) - 1)) | self._vget(pos, n)
            elif offset == PCI_CAP_LIST_NEXT:
                val = (val & ~0xFF) | self.vconfig[pos]
        return val

    def _read_raw(self, pos, count, perm, offset) -> int:
        return self._phys_read(pos, count)

    def _read_virt(self, pos, count, perm, offset) -> int:
        return self._vget(pos, count)

    def _read_basic(self, pos, count, perm, offset) -> int:
        if _is_bar(offset):
            self._bar_fixup()
        return self._read_default(pos, count, perm, offset)

    def _read_msi(self, pos, count, perm, offset) -> int:
        # The kernel's vfio_msi_config_read rewrites QMASK in the 16 bits at the
        # *start* of the capability (ID and next), not in the flags; the ID byte
        # reads from the function, so the user sees the device's own
        # Multiple-Message-Capable field.  Nothing to emulate.
        return self._read_default(pos, count, perm, offset)

    # -- write functions ---------------------------------------------------------
    def _write_default(self, pos, count, perm, offset, val) -> None:
        virt, write = perm.masks(offset, count)
        if not write:
            return  # no writable bits: dropped
        if write & virt:
            v = self._vget(pos, count)
            self._vset(pos, count, (v & ~(write & virt)) | (val & write & virt))
        if write & ~virt:
            phys = self._phys_read(pos, count)
            phys = (phys & ~(write & ~virt)) | (val & write & ~virt)
            self._phys_write(pos, count, phys)

    def _write_raw(self, pos, count, perm, offset, val) -> None:
        self._phys_write(pos, count, val)

    def _write_virt(self, pos, count, perm, offset, val) -> None:
        self._vset(pos, count, val)

    def _write_basic(self, pos, count, perm, offset, val) -> None:
        vdev = self.vdev
        self._write_default(pos, count, perm, offset, val)
        if offset == PCI_COMMAND:
            # Remember the memory/IO enables the user asked for: BAR access is checked against them.
            mask = PCI_COMMAND_MEMORY | PCI_COMMAND_IO
            self._vset(PCI_COMMAND, 2, (self._vget(PCI_COMMAND, 2) & ~mask) | (val & mask))
        if PCI_COMMAND <= offset <= PCI_COMMAND + 1:
            virt_intx_disable = bool(self._vget(PCI_COMMAND, 2) & PCI_COMMAND_INTX_DISABLE)
            if virt_intx_disable and not vdev.virq_disabled:
                vdev.virq_disabled = True
                vdev._intx_mask()
            elif not virt_intx_disable and vdev.virq_disabled:
                vdev.virq_disabled = False
                vdev._intx_unmask()
        if _is_bar(offset):
            self.bardirty = True

    def _write_pm(self, pos, count, perm, offset, val) -> None:
        self._write_default(pos, count, perm, offset, val)
        if offset == PCI_PM_CTRL:
            # The state bits are not writable: the host changes the power state itself.
            self.vdev._set_power_state(pos - offset, val & PCI_PM_CTRL_STATE_MASK)

    def _write_exp(self, pos, count, perm, offset, val) -> None:
        start = pos - offset
        ctrl_at = start + PCI_EXP_DEVCTL
        readrq = self._vget(ctrl_at, 2) & 0x7000
        self._write_default(pos, count, perm, offset, val)
        ctrl = self._vget(ctrl_at, 2)
        if ctrl & PCI_EXP_DEVCTL_BCR_FLR:
            # Initiate-FLR always reads 0; it resets only when the function has FLR.
            self._vset(ctrl_at, 2, ctrl & ~PCI_EXP_DEVCTL_BCR_FLR)
            if self._phys_read(start + PCI_EXP_DEVCAP, 4) & PCI_EXP_DEVCAP_FLR:
                self.vdev._try_reset_function()
        if readrq != self._vget(ctrl_at, 2) & 0x7000:
            # MRRS goes to the function, but never below its MPS (pcie_set_readrq).
            want = 128 << ((self._vget(ctrl_at, 2) & 0x7000) >> 12)
            phys = self._phys_read(ctrl_at, 2)
            mps = 128 << ((phys & 0x00E0) >> 5)
            rq = max(want, mps).bit_length() - 8
            self._phys_write(ctrl_at, 2, (phys & ~0x7000) | (rq << 12))

    def _write_msi(self, pos, count, perm, offset, val) -> None:
        self._write_default(pos, count, perm, offset, val)
        if offset <= PCI_MSI_FLAGS <= offset + count:
            start = self._find_cap_start(pos)
            flags = self._vget(start + PCI_MSI_FLAGS, 2)
            if self.vdev.irq_type != VFIO_PCI_MSI_IRQ_INDEX:
                flags &= ~PCI_MSI_FLAGS_ENABLE  # MSI is enabled with SET_IRQS, not here
            if (flags & PCI_MSI_FLAGS_QSIZE) >> 4 > self.vdev.msi_qmax:
                flags = (flags & ~PCI_MSI_FLAGS_QSIZE) | (self.vdev.msi_qmax << 4)
            self._vset(start + PCI_MSI_FLAGS, 2, flags)
            self._phys_write(start + PCI_MSI_FLAGS, 2, flags)

    # -- BARs (vfio_bar_fixup) -----------------------------------------------------
    def _bar_fixup(self) -> None:
        """Make the virtual BARs read like hardware: size mask and type bits (BAR sizing)."""
        if not self.bardirty:
            return
        fn = self.vdev.function
        i = 0
        while i < PCI_STD_NUM_BARS:
            reg = PCI_BASE_ADDRESS_0 + 4 * i
            bar = fn.bars[i]
            if bar is None or not bar.address:
                self._vset(reg, 4, 0)  # unmapped by the host = unimplemented for the user
                i += 1
                continue
            mask = ~(bar.size - 1)
            vbar = (self._vget(reg, 4) & mask & 0xFFFFFFFF) | bar.type_bits()
            self._vset(reg, 4, vbar)
            if vbar & PCI_BASE_ADDRESS_MEM_TYPE_64:
                self._vset(reg + 4, 4, self._vget(reg + 4, 4) & (mask >> 32) & 0xFFFFFFFF)
                i += 1
            i += 1
        rom = fn.rom
        if rom is not None and rom.address:
            mask = (~(rom.size - 1) & 0xFFFFFFFF) | PCI_ROM_ADDRESS_ENABLE
            self._vset(PCI_ROM_ADDRESS, 4, self._vget(PCI_ROM_ADDRESS, 4) & mask)
        else:
            self._vset(PCI_ROM_ADDRESS, 4, 0)
        self.bardirty = False

    def memory_enabled(self) -> bool:
        """``__vfio_pci_memory_enabled``: the user's memory-enable bit, and not in D3hot."""
        return self.vdev.function.power_state < PCI_D3HOT and bool(self._vget(PCI_COMMAND, 2) & PCI_COMMAND_MEMORY)


# =============================================================================
# Interrupt contexts (vfio_pci_intrs.c)
# =============================================================================
class _IntxCtx:
    def __init__(self, trigger, masked: bool):
        self.trigger = trigger
        self.masked = masked
        self.unmask_watch: Optional[Callable[[], None]] = None


def _release_eventfd(efd) -> None:
    release = getattr(efd, "release", None)
    if release is not None:
        release()


class ModelFailure(VfioError):
    """EIO for one access, because the device model raised (the traceback is in the log)."""


class HotResetBus:
    """The devices one secondary-bus reset hits, for GET_PCI_HOT_RESET_INFO / PCI_HOT_RESET.

    Without one a device sits on a root bus, as QEMU's edu does on q35: no bus
    reset is possible and both ioctls fail with ENODEV, as on the kernel.
    """

    def __init__(self, segment: int = 0, bus: int = 1, resettable: bool = True):
        self.segment = segment
        self.bus = bus
        self.resettable = resettable
        #: (devfn, iommu group id or None, VfioPciDevice or None for a function not bound to vfio-pci)
        self.members: List[tuple] = []

    def add(self, devfn: int, group_id: Optional[int], vdev: Optional["VfioPciDevice"] = None) -> None:
        self.members.append((devfn, group_id, vdev))
        if vdev is not None:
            vdev.reset_bus = self


def _default_group_of_fd(caller, fd: int) -> int:
    file_object = caller.resolve_fd(fd)
    iommu_group = getattr(file_object, "iommu_group", None)
    if iommu_group is None:
        raise VfioError(errno.EINVAL, f"fd {fd} is not a VFIO group")
    return iommu_group.id


# =============================================================================
# The device
# =============================================================================
class VfioPciDevice:
    """A PCI function bound to vfio-pci: the DeviceOps the core calls."""

    def __init__(self, function: PciDevice, name: Optional[str] = None, *, dma_space=None,
                 reset_bus: Optional[HotResetBus] = None, io_width: int = 8,
                 group_of_fd: Callable[[object, int], int] = _default_group_of_fd):
        if io_width not in (1, 2, 4, 8):
            raise ValueError("io_width is 1, 2, 4 or 8")
        self.function = function
        self.name = name or function.name
        self.reset_bus = reset_bus
        self.io_width = io_width
        self.group_of_fd = group_of_fd
        self.lock = function.lock
        function.irq_sink = self
        function.dma._attach(dma_space)
        self.vconfig: Optional[VirtualConfig] = None
        self.irq_type: Optional[int] = None
        self.intx: Optional[_IntxCtx] = None
        self.msi_ctx: Dict[int, object] = {}
        self.msi_qmax = 0
        #: vectors enabled with the current MSI / MSI-X type (vdev->num_ctx)
        self.num_ctx = 0
        self.virq_disabled = False
        self.err_trigger = None
        self.req_trigger = None
        self.reset_works = False
        #: (bar, offset, data, size) -> (the fetched eventfd, the cancel of its watch)
        self.ioeventfds: Dict[tuple, tuple] = {}
        #: low-power mode the user asked for (VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY*)
        self.pm_runtime_engaged = False
        self.pm_wake_eventfd = None
        self._pm_suspended: Optional[tuple] = None
        self._saved_state: Optional[Dict[int, tuple]] = None
        self._ioctls = {
            VFIO_DEVICE_GET_INFO: self._get_info,
            VFIO_DEVICE_GET_REGION_INFO: self._get_region_info,
            VFIO_DEVICE_GET_IRQ_INFO: self._get_irq_info,
            VFIO_DEVICE_SET_IRQS: self._set_irqs,
            VFIO_DEVICE_RESET: self._reset,
            VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: self._get_pci_hot_reset_info,
            VFIO_DEVICE_PCI_HOT_RESET: self._pci_hot_reset,
            VFIO_DEVICE_IOEVENTFD: self._ioeventfd,
            VFIO_DEVICE_FEATURE: self._feature,
        }
        function.firmware_setup()  # the function was enumerated at boot...
        self._enable_device()  # ...and vfio-pci's probe enabled it
        self.vconfig = VirtualConfig(self)

    def __repr__(self) -> str:
        return f"VfioPciDevice({self.name!r}, {self.function!r})"

    def set_dma_space(self, dma_space) -> None:
        """Attach (or detach, with None) the IOMMU the function's DMA goes through."""
        self.function.dma._attach(dma_space)

    # -- DeviceOps: lifecycle ------------------------------------------------------
    def open(self) -> None:
        """First open of a device fd (vfio_pci_core_enable)."""
        with self.lock:
            self._power_up()
            self._clear_master()  # the saved state must not include bus mastering
            self._enable_device()
            # pci_try_reset_function at enable: whether it works decides VFIO_DEVICE_FLAGS_RESET
            self.reset_works = bool(self.reset_methods())
            self._guarded(self._try_reset_function)
            self._saved_state = self._save_state()
            self.vconfig = VirtualConfig(self)

    def release(self) -> None:
        """Last close (vfio_pci_core_disable + close_device): quiet the device, restore it."""
        with self.lock:
            # out of low-power mode and into D0 first: the reset below needs it
            self._pm_resume()
            self._pm_exit()
            self._power_up()
            self._clear_master()  # stop the device from further DMA
            if self.irq_type is not None:
                self._set_irqs_ioctl(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, self.irq_type, 0, 0, b"", None)
            for efd, cancel in self.ioeventfds.values():
                cancel()
                _release_eventfd(efd)
            self.ioeventfds.clear()
            self.virq_disabled = False
            # INTx and MSI off (and decoding) around the reset, as pci_reset_function does;
            # a function that cannot be reset keeps its own state, only config is restored.
            self.function.config_write(PCI_COMMAND, 2, PCI_COMMAND_INTX_DISABLE)
            if self.reset_works:
                try:
                    self._guarded(self.function.reset_function)
                except VfioError:
                    pass  # logged; closing goes on
            if self._saved_state is not None:
                self._restore_state(self._saved_state)
                self._saved_state = None
            self._clear_master()  # pci_disable_device
            for attr in ("err_trigger", "req_trigger"):
                if getattr(self, attr) is not None:
                    _release_eventfd(getattr(self, attr))
                    setattr(self, attr, None)
            self._revoke_mappings()

    def _revoke_mappings(self) -> None:
        """Cut off every client mapping of the BARs' memory (taken before this last close).

        In Linux a mapping holds the device file, so the device cannot be
        closed (nor its group opened by anyone else) while it exists.  Here a
        client's mapping is of a memfd, which outlives the device fd: each
        plain-memory BAR moves to a fresh memfd with the same bytes, and the
        earlier mappings keep only orphaned pages no model or later client sees.
        """
        for bar in self.function.bars:
            renew = getattr(bar, "renew_memory", None)
            if renew is None:
                continue
            try:
                renew()
            except OSError as e:
                # no memfd for the copy: the old memory stays, and so does the stale alias
                log.error("%s: cannot move a BAR to fresh memory at close (%s); earlier mappings still see it",
                          self.name, e)

    def request(self, count: int) -> None:
        """Hot removal is waiting for the user: ask through the REQ eventfd (vfio_pci_core_request)."""
        with self.lock:
            if self.req_trigger is not None:
                if count % 10 == 0:
                    log.info("%s: relaying device request to user (#%d)", self.name, count)
                self.req_trigger.signal()
            elif count == 0:
                log.warning("%s: no device request channel registered, blocked until released by user", self.name)

    def match(self, name: str) -> bool:
        """vfio_pci_core_match: "<bdf>", then optionally spaces and one "vf_token=<uuid>".

        No SR-IOV is emulated, so a well-formed token is still refused
        (vfio_pci_validate_vf_token: "not a PF or VF"), as 6.1 refuses it.
        """
        if not name.startswith(self.name):
            return False
        rest = name[len(self.name):]
        if rest and rest[0] != " ":
            return False
        vf_token = False
        rest = rest.lstrip(" ")
        while rest:
            if vf_token or not rest.startswith("vf_token="):
                raise VfioError(errno.EINVAL, f"{self.name}: unknown or repeated option in device name {name!r}")
            token = rest[len("vf_token="):][:36]
            try:
                uuid.UUID(token)
            except ValueError:
                raise VfioError(errno.EINVAL, f"{self.name}: {token!r} is not a vf_token UUID") from None
            if len(token) != 36:
                raise VfioError(errno.EINVAL, f"{self.name}: {token!r} is not a vf_token UUID")
            vf_token = True
            rest = rest[len("vf_token=") + 36:].lstrip(" ")
        if vf_token:
            raise VfioError(errno.EINVAL, f"{self.name}: a VF token was given, but the device is neither a PF "
                                          "nor a VF")
        return True

    def _enable_device(self) -> None:
        # pci_enable_device: decode on for the resource types the function has
        fn = self.function
        cmd = fn.command()
        if any(b is not None and b.io for b in fn.bars):
            cmd |= PCI_COMMAND_IO
        if any(b is not None and not b.io for b in fn.bars) or fn.rom is not None:
            cmd |= PCI_COMMAND_MEMORY
        fn.config_write(PCI_COMMAND, 2, cmd & ~PCI_COMMAND_INTX_DISABLE)

    def _clear_master(self) -> None:
        fn = self.function
        fn.config_write(PCI_COMMAND, 2, fn.command() & ~PCI_COMMAND_MASTER)

    def _save_state(self) -> Dict[int, tuple]:
        """pci_save_state: the header and the control registers of MSI, MSI-X and PCIe."""
        fn = self.function
        regs = {off: 4 for off in range(4, PCI_STD_HEADER_SIZEOF, 4)}
        if fn.msi is not None:
            regs[fn.msi.offset + PCI_MSI_FLAGS] = 2
        if fn.msix is not None:
            regs[fn.msix.offset + PCI_MSIX_FLAGS] = 2
        if fn.express is not None:
            regs[fn.express.offset + PCI_EXP_DEVCTL] = 2
            regs[fn.express.offset + PCI_EXP_DEVCTL2] = 2
        return {off: (size, fn.config_read(off, size)) for off, size in regs.items()}

    def _restore_state(self, saved: Dict[int, tuple]) -> None:
        fn = self.function
        for off in sorted(saved, reverse=True):
            size, value = saved[off]
            if fn.config_read(off, size) != value:
                fn.config_write(off, size, value)

    def reset_methods(self) -> List[str]:
        """The function's own reset methods, then ``bus`` when it is alone on a bus that can be reset.

        ``pci_parent_bus_reset`` refuses a root bus and a bus shared with
        other functions; QEMU's edu on q35 sits on the root bus, so the kernel
        finds no way to reset it.
        """
        methods = self.function.reset_methods()
        bus = self.reset_bus
        if bus is not None and bus.resettable and [m[2] for m in bus.members] == [self]:
            methods.append("bus")
        return methods

    def _try_reset_function(self) -> None:
        """pci_try_reset_function: config saved and restored around the function's reset."""
        if not self.reset_methods():
            return
        saved = self._save_state()
        try:
            self.function.reset_function()
        finally:
            self._restore_state(saved)

    def _power_up(self) -> None:
        """vfio_pci_set_power_state(vdev, PCI_D0)."""
        if self.function.pm is not None and self.function.power_state:
            self._set_power_state(self.function.pm.offset, 0)

    def _set_power_state(self, pm_offset: int, state: int) -> None:
        fn = self.function
        ctrl = fn.config_read(pm_offset + PCI_PM_CTRL, 2)
        fn.config_write(pm_offset + PCI_PM_CTRL, 2, (ctrl & ~PCI_PM_CTRL_STATE_MASK) | state)

    # -- DeviceOps: ioctl ----------------------------------------------------------
    def ioctl(self, cmd: int, arg) -> int:
        handler = self._ioctls.get(cmd)
        with self.lock:
            # vfio_device_fops_unl_ioctl wakes the device around every ioctl (runtime PM)
            self._pm_resume()
            try:
                if handler is None:
                    raise VfioError(errno.ENOTTY, f"{self.name}: vfio-pci has no ioctl 0x{cmd:x}")
                return handler(arg)
            except (VfioError, RetryRequest):
                raise  # vfio-pci's own rules (model code inside is run through _guarded)
            except Exception:
                log.exception("%s: ioctl 0x%x failed unexpectedly", self.name, cmd)
                raise VfioError(errno.EIO, f"{self.name}: ioctl failed (see the server log)") from None
            finally:
                self._pm_suspend()

    def _get_info(self, arg) -> int:
        """vfio_pci_ioctl_get_info: 16 bytes, or 20 (cap_offset 0) when argsz leaves room for it."""
        minsz = offsetofend(vfio_device_info, "num_irqs")
        info = arg.fetch_struct(vfio_device_info, minsz)
        # For backward compatibility the kernel cannot require cap_offset; it measures
        # "room for it" with vfio_iommu_type1_info's, which ends at the same 20 bytes.
        capsz = offsetofend(vfio_iommu_type1_info, "cap_offset")
        if info.argsz >= capsz:
            minsz = capsz
            info.cap_offset = 0  # no device capabilities (zPCI has some; nothing here)
        info.flags = VFIO_DEVICE_FLAGS_PCI | (VFIO_DEVICE_FLAGS_RESET if self.reset_works else 0)
        info.num_regions = VFIO_PCI_NUM_REGIONS
        info.num_irqs = VFIO_PCI_NUM_IRQS
        arg.write(0, bytes(info)[:minsz])
        return 0

    def _region(self, index: int):
        """(size, flags, msix_mappable) of a region, or None when the index is not a region of this device."""
        fn = self.function
        if index == VFIO_PCI_CONFIG_REGION_INDEX:
            return fn.config.size, VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE, False
        if index <= VFIO_PCI_BAR5_REGION_INDEX:
            bar = fn.bars[index]
            if bar is None:
                return 0, 0, False
            flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
            msix_mappable = False
            if self._mmap_supported(index):
                flags |= VFIO_REGION_INFO_FLAG_MMAP
                # vdev->msix_bar is the table's BIR (the PBA's BAR gets nothing)
                msix_mappable = fn.msix is not None and fn.msix.table_bar == index
            return bar.size, flags, msix_mappable
        if index == VFIO_PCI_ROM_REGION_INDEX:
            rom = fn.rom
            if rom is None or not rom.image_size():
                return 0, 0, False  # no ROM, or pci_map_rom finds no valid image
            return rom.size, VFIO_REGION_INFO_FLAG_READ, False
        return None  # VGA (this device has none) and anything beyond

    def _mmap_supported(self, index: int) -> bool:
        """vdev->bar_mmap_supported: a plain-memory BAR of at least a page, mapped whole.

        As 6.1 (since 4.16's "vfio-pci: Allow mapping MSIX BAR"), the MSI-X
        table and PBA are no holes: a client may map them with the rest.  Its
        stores there land in the BAR's memory, never in the emulated table
        (which pread/pwrite reach; vectors are routed by SET_IRQS), so they
        cannot steer interrupts, as MSIX_MAPPABLE promises.  A
        sub-page BAR is not offered (Linux pads it to a page with a dummy
        resource; a memfd of the BAR's size cannot be).
        """
        bar = self.function.bars[index]
        return bar is not None and bar.mmappable and not bar.io and bar.size >= PAGE_SIZE

    def _get_region_info(self, arg) -> int:
        """vfio_pci_ioctl_get_region_info (6.1): the only BAR capability is MSIX_MAPPABLE on the table's BAR."""
        minsz = offsetofend(vfio_region_info, "offset")
        info = arg.fetch_struct(vfio_region_info, minsz)
        region = self._region(info.index) if info.index < VFIO_PCI_NUM_REGIONS else None
        if region is None:
            raise VfioError(errno.EINVAL, f"{self.name}: no region {info.index}"
                            + (" (no VGA)" if info.index == VFIO_PCI_VGA_REGION_INDEX else ""))
        info.offset = VFIO_PCI_INDEX_TO_OFFSET(info.index)
        info.size, info.flags, msix_mappable = region
        # cap_offset goes back as the caller passed it unless a capability is placed
        if msix_mappable:
            chain = CapChain()
            chain.add(VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 1, b"")  # msix_mmappable_cap: a bare header
            caps = chain.place(info, VFIO_REGION_INFO_FLAG_CAPS)
            if caps:
                arg.write(ctypes.sizeof(vfio_region_info), caps)
        arg.write(0, bytes(info)[:minsz])
        return 0

    def _irq_count(self, index: int) -> int:
        """vfio_pci_get_irq_count."""
        fn = self.function
        if index == VFIO_PCI_INTX_IRQ_INDEX:
            return 1 if self.vconfig.vconfig[PCI_INTERRUPT_PIN] else 0
        if index == VFIO_PCI_MSI_IRQ_INDEX:
            return fn.msi.vectors if fn.msi is not None else 0
        if index == VFIO_PCI_MSIX_IRQ_INDEX:
            return fn.msix.vectors if fn.msix is not None else 0
        if index == VFIO_PCI_ERR_IRQ_INDEX:
            return 1 if fn.express is not None else 0
        if index == VFIO_PCI_REQ_IRQ_INDEX:
            return 1
        return 0

    def _get_irq_info(self, arg) -> int:
        minsz = offsetofend(vfio_irq_info, "count")
        info = arg.fetch_struct(vfio_irq_info, minsz)
        if info.index >= VFIO_PCI_NUM_IRQS:
            raise VfioError(errno.EINVAL, f"{self.name}: no irq index {info.index}")
        if info.index == VFIO_PCI_ERR_IRQ_INDEX and self.function.express is None:
            raise VfioError(errno.EINVAL, f"{self.name}: the ERR index exists only for PCI Express devices")
        info.flags = VFIO_IRQ_INFO_EVENTFD
        info.count = self._irq_count(info.index)
        if info.index == VFIO_PCI_INTX_IRQ_INDEX:
            info.flags |= VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED
        else:
            info.flags |= VFIO_IRQ_INFO_NORESIZE
        arg.write(0, bytes(info)[:minsz])
        return 0

    # -- SET_IRQS ------------------------------------------------------------------
    def _set_irqs(self, arg) -> int:
        minsz = offsetofend(vfio_irq_set, "count")
        hdr = arg.fetch_struct(vfio_irq_set, minsz)
        size = self._validate_irq_set(hdr, self._irq_count(hdr.index), minsz)
        data = arg.read(minsz, hdr.count * size) if size else b""
        return self._set_irqs_ioctl(hdr.flags, hdr.index, hdr.start, hdr.count, data, arg.caller)

    @staticmethod
    def _validate_irq_set(hdr, num_irqs: int, minsz: int) -> int:
        """vfio_set_irqs_validate_and_prepare: EINVAL for every malformed header; returns the data item size."""
        if hdr.argsz < minsz:
            raise VfioError(errno.EINVAL, "SET_IRQS: argsz smaller than minsz")
        if hdr.index >= VFIO_PCI_NUM_IRQS:
            raise VfioError(errno.EINVAL, f"SET_IRQS: no irq index {hdr.index}")
        if hdr.count >= U32_MAX - hdr.start:
            raise VfioError(errno.EINVAL, "SET_IRQS: start + count overflows")
        if hdr.flags & ~(VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK):
            raise VfioError(errno.EINVAL, f"SET_IRQS: unknown flags 0x{hdr.flags:x}")
        if hdr.start >= num_irqs or hdr.start + hdr.count > num_irqs:
            raise VfioError(errno.EINVAL, f"SET_IRQS: vectors {hdr.start}+{hdr.count} outside the {num_irqs} "
                                          f"of index {hdr.index}")
        data_type = hdr.flags & VFIO_IRQ_SET_DATA_TYPE_MASK
        sizes = {VFIO_IRQ_SET_DATA_NONE: 0, VFIO_IRQ_SET_DATA_BOOL: 1, VFIO_IRQ_SET_DATA_EVENTFD: 4}
        if data_type not in sizes:
            raise VfioError(errno.EINVAL, "SET_IRQS: exactly one DATA type must be given")
        size = sizes[data_type]
        if size and hdr.argsz - minsz < hdr.count * size:
            raise VfioError(errno.EINVAL, f"SET_IRQS: argsz leaves room for fewer than {hdr.count} data items")
        return size

    def _set_irqs_ioctl(self, flags: int, index: int, start: int, count: int, data: bytes, caller) -> int:
        """vfio_pci_set_irqs_ioctl: the action for this index, or ENOTTY."""
        action = flags & VFIO_IRQ_SET_ACTION_TYPE_MASK
        func = None
        if index == VFIO_PCI_INTX_IRQ_INDEX:
            func = {VFIO_IRQ_SET_ACTION_MASK: self._set_intx_mask, VFIO_IRQ_SET_ACTION_UNMASK: self._set_intx_unmask,
                    VFIO_IRQ_SET_ACTION_TRIGGER: self._set_intx_trigger}.get(action)
        elif index in (VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX):
            func = self._set_msi_trigger if action == VFIO_IRQ_SET_ACTION_TRIGGER else None  # no MSI masking
        elif index == VFIO_PCI_ERR_IRQ_INDEX:
            if action == VFIO_IRQ_SET_ACTION_TRIGGER and self.function.express is not None:
                func = self._set_err_trigger
        elif index == VFIO_PCI_REQ_IRQ_INDEX:
            func = self._set_req_trigger if action == VFIO_IRQ_SET_ACTION_TRIGGER else None
        if func is None:
            raise VfioError(errno.ENOTTY, f"{self.name}: action 0x{action:x} is not supported on irq index {index}")
        func(index, start, count, flags, data, caller)
        return 0

    @staticmethod
    def _eventfd(caller, fd: int):
        return caller.get_eventfd(fd)

    @staticmethod
    def _fd(data: bytes, i: int = 0) -> int:
        return int.from_bytes(data[4 * i:4 * i + 4], "little", signed=True)

    # INTx -----------------------------------------------------------------------
    # The function masks INTx with its own INTx-disable bit (a PCI 2.3 function:
    # pci_intx_mask_supported), so vfio-pci masks it there, as the kernel does:
    # the handler sets the bit when the function says the interrupt is its own
    # (pci_check_and_mask_intx), unmasking clears it unless another interrupt is
    # already pending (pci_check_and_unmask_intx), and while INTx is not in use
    # the bit follows the user's virtual INTx-disable.
    def _set_intx_unmask(self, index, start, count, flags, data, caller) -> None:
        if self.irq_type != VFIO_PCI_INTX_IRQ_INDEX or start != 0 or count != 1:
            raise VfioError(errno.EINVAL, "INTx UNMASK needs INTx enabled, start 0 and count 1")
        if flags & VFIO_IRQ_SET_DATA_NONE or (flags & VFIO_IRQ_SET_DATA_BOOL and data[0]):
            self._intx_unmask()
        elif flags & VFIO_IRQ_SET_DATA_EVENTFD:
            fd = self._fd(data)
            ctx = self.intx
            if fd >= 0:
                if ctx.unmask_watch is not None:
                    raise VfioError(errno.EBUSY, "an unmask eventfd is already set: de-assign it (-1) first")
                efd = self._eventfd(caller, fd)
                watch = getattr(efd, "watch", None)
                if watch is None:
                    raise VfioError(errno.EOPNOTSUPP, "this transport cannot watch an eventfd (unmask irqfd)")
                ctx.unmask_watch = watch(self._unmask_from_eventfd)
            elif ctx.unmask_watch is not None:
                ctx.unmask_watch()
                ctx.unmask_watch = None

    def _unmask_from_eventfd(self) -> None:
        with self.lock:
            self._intx_unmask()

    def _set_intx_mask(self, index, start, count, flags, data, caller) -> None:
        if self.irq_type != VFIO_PCI_INTX_IRQ_INDEX or start != 0 or count != 1:
            raise VfioError(errno.EINVAL, "INTx MASK needs INTx enabled, start 0 and count 1")
        if flags & VFIO_IRQ_SET_DATA_NONE or (flags & VFIO_IRQ_SET_DATA_BOOL and data[0]):
            self._intx_mask()
        elif flags & VFIO_IRQ_SET_DATA_EVENTFD:
            raise VfioError(errno.ENOTTY, "masking INTx from an eventfd is not implemented (nor in the kernel)")

    def _set_intx_trigger(self, index, start, count, flags, data, caller) -> None:
        if self.irq_type == VFIO_PCI_INTX_IRQ_INDEX and not count and flags & VFIO_IRQ_SET_DATA_NONE:
            self._intx_disable()
            return
        if self.irq_type not in (None, VFIO_PCI_INTX_IRQ_INDEX) or start != 0 or count != 1:
            raise VfioError(errno.EINVAL, "INTx TRIGGER needs no other interrupt type, start 0 and count 1")
        if flags & VFIO_IRQ_SET_DATA_EVENTFD:
            fd = self._fd(data)
            if self.irq_type == VFIO_PCI_INTX_IRQ_INDEX:
                self._intx_set_signal(fd, caller)
                return
            self._intx_enable()
            try:
                self._intx_set_signal(fd, caller)
            except VfioError:
                self._intx_disable()
                raise
            return
        if self.irq_type != VFIO_PCI_INTX_IRQ_INDEX:
            raise VfioError(errno.EINVAL, "INTx loopback needs INTx enabled")
        if flags & VFIO_IRQ_SET_DATA_NONE or (flags & VFIO_IRQ_SET_DATA_BOOL and data[0]):
            self._send_intx_eventfd()

    def _intx_enable(self) -> None:
        """vfio_intx_enable: the context, masked as the user's INTx-disable says."""
        self.intx = _IntxCtx(None, masked=self.virq_disabled)
        self._pci_intx(not self.intx.masked)
        self.irq_type = VFIO_PCI_INTX_IRQ_INDEX

    def _intx_set_signal(self, fd: int, caller) -> None:
        """vfio_intx_set_signal: drop the old eventfd (and handler), then install the new one."""
        ctx = self.intx
        if ctx.trigger is not None:
            old, ctx.trigger = ctx.trigger, None
            _release_eventfd(old)
        if fd < 0:
            return  # de-assigned: no handler, so nothing masks or signals until a new one
        ctx.trigger = self._eventfd(caller, fd)
        # request_irq on a level-triggered line already asserted runs the handler at once.
        if self.function.intx_asserted():
            self.intx_fire()

    def _intx_disable(self) -> None:
        ctx = self.intx
        if ctx is not None:
            if ctx.unmask_watch is not None:
                ctx.unmask_watch()
                ctx.unmask_watch = None
            if ctx.trigger is not None:
                _release_eventfd(ctx.trigger)
                ctx.trigger = None
        self.intx = None
        self.irq_type = None

    def _send_intx_eventfd(self) -> None:
        if self.irq_type == VFIO_PCI_INTX_IRQ_INDEX and not self.virq_disabled and self.intx.trigger is not None:
            self.intx.trigger.signal()

    def intx_fire(self) -> None:
        """The line went up (vfio_intx_handler): mask it in the function, tell the user once."""
        ctx = self.intx
        if self.irq_type != VFIO_PCI_INTX_IRQ_INDEX or ctx.trigger is None:
            return  # no handler registered
        if not ctx.masked and self._check_and_set_intx_mask(True):
            ctx.masked = True
            self._send_intx_eventfd()

    def _intx_mask(self) -> None:
        """vfio_pci_intx_mask."""
        if self.irq_type != VFIO_PCI_INTX_IRQ_INDEX:
            self._pci_intx(False)  # not in use: the function's bit follows the virtual one
        elif not self.intx.masked:
            self._pci_intx(False)
            self.intx.masked = True

    def _intx_unmask(self) -> None:
        """vfio_pci_intx_unmask: unmask, or re-send when the function still has an interrupt pending."""
        if self.irq_type != VFIO_PCI_INTX_IRQ_INDEX:
            self._pci_intx(True)
            return
        ctx = self.intx
        if not ctx.masked or self.virq_disabled:
            return
        if self._check_and_set_intx_mask(False):
            ctx.masked = False
        else:
            self._send_intx_eventfd()  # stays masked

    def _pci_intx(self, enable: bool) -> None:
        """pci_intx: set or clear the function's INTx-disable bit."""
        fn = self.function
        cmd = fn.command()
        new = (cmd & ~PCI_COMMAND_INTX_DISABLE) | (0 if enable else PCI_COMMAND_INTX_DISABLE)
        if new != cmd:
            fn.config_write(PCI_COMMAND, 2, new)

    def _check_and_set_intx_mask(self, mask: bool) -> bool:
        """pci_check_and_{mask,unmask}_intx: act only when the Interrupt Status bit agrees."""
        fn = self.function
        pending = bool(fn.config_read(PCI_STATUS, 2) & PCI_STATUS_INTERRUPT)
        if mask != pending:
            return False
        self._pci_intx(not mask)
        return True

    # MSI / MSI-X ----------------------------------------------------------------
    def _set_msi_trigger(self, index, start, count, flags, data, caller) -> None:
        msix = index == VFIO_PCI_MSIX_IRQ_INDEX
        if self.irq_type == index and not count and flags & VFIO_IRQ_SET_DATA_NONE:
            self._msi_disable(msix)
            return
        if self.irq_type not in (None, index):
            raise VfioError(errno.EINVAL, f"{self.name}: another interrupt type is enabled")
        if flags & VFIO_IRQ_SET_DATA_EVENTFD:
            fds = [self._fd(data, i) for i in range(count)]
            if self.irq_type == index:
                self._msi_set_block(start, fds, msix, caller)
                return
            self._msi_enable(start + count, msix)
            try:
                self._msi_set_block(start, fds, msix, caller)
            except VfioError:
                self._msi_disable(msix)
                raise
            return
        if self.irq_type != index or start + count > self.num_ctx:
            raise VfioError(errno.EINVAL, f"{self.name}: loopback on vectors {start}+{count} of irq index "
                                          f"{index}, which has {self.num_ctx} enabled")
        for i in range(start, start + count):
            trigger = self.msi_ctx.get(i)
            if trigger is None:
                continue
            if flags & VFIO_IRQ_SET_DATA_NONE or (flags & VFIO_IRQ_SET_DATA_BOOL and data[i - start]):
                trigger.signal()

    def _msi_enable(self, nvec: int, msix: bool) -> None:
        """vfio_msi_enable: the vector count is fixed here (NORESIZE) until disabled."""
        if nvec < 1:
            # pci_alloc_irq_vectors(pdev, 1, nvec): fewer than the one it needs
            raise VfioError(errno.ERANGE, f"{self.name}: enabling MSI needs at least one vector")
        fn = self.function
        # pci_intx_for_msi: INTx is off in the function while messages are on
        fn.config_write(PCI_COMMAND, 2, fn.command() | PCI_COMMAND_INTX_DISABLE)
        if msix:
            fn.msix.host_enable()
            self.irq_type = VFIO_PCI_MSIX_IRQ_INDEX
        else:
            fn.msi.host_enable(nvec)
            self.irq_type = VFIO_PCI_MSI_IRQ_INDEX
            # the virtual Multiple Message Enable may not exceed what was enabled
            self.msi_qmax = (nvec * 2 - 1).bit_length() - 1
        self.num_ctx = nvec

    def _msi_set_block(self, start: int, fds: List[int], msix: bool, caller) -> None:
        if start >= self.num_ctx or start + len(fds) > self.num_ctx:
            raise VfioError(errno.EINVAL, f"{self.name}: vectors {start}+{len(fds)} beyond the {self.num_ctx} "
                                          "enabled (disable with count 0 to change the count)")
        done = start
        try:
            for i, fd in enumerate(fds):
                done = start + i + 1
                self._msi_set_vector_signal(start + i, fd, msix, caller)
        except VfioError:
            for vector in range(start, done):
                self._msi_set_vector_signal(vector, -1, msix, caller)
            raise

    def _msi_set_vector_signal(self, vector: int, fd: int, msix: bool, caller) -> None:
        old = self.msi_ctx.pop(vector, None)
        if old is not None:
            if msix:
                self.function.msix.host_mask(vector, True)  # free_irq masks the entry
            _release_eventfd(old)
        if fd < 0:
            return
        self.msi_ctx[vector] = self._eventfd(caller, fd)
        if msix:
            self.function.msix.host_mask(vector, False)  # request_irq: a pending message is delivered now

    def _msi_disable(self, msix: bool) -> None:
        for vector in list(self.msi_ctx):
            self._msi_set_vector_signal(vector, -1, msix, None)
        fn = self.function
        if msix:
            fn.msix.host_disable()
        else:
            fn.msi.host_disable()
        fn.config_write(PCI_COMMAND, 2, fn.command() & ~PCI_COMMAND_INTX_DISABLE)
        self.irq_type = None
        self.num_ctx = 0

    # ERR / REQ --------------------------------------------------------------------
    def _set_err_trigger(self, index, start, count, flags, data, caller) -> None:
        self.err_trigger = self._set_single(self.err_trigger, start, count, flags, data, caller)

    def _set_req_trigger(self, index, start, count, flags, data, caller) -> None:
        self.req_trigger = self._set_single(self.req_trigger, start, count, flags, data, caller)

    def _set_single(self, current, start, count, flags, data, caller):
        """vfio_pci_set_ctx_trigger_single: DATA_NONE/BOOL loop back, EVENTFD (re)assigns; returns the new one."""
        if start != 0 or count > 1:
            raise VfioError(errno.EINVAL, "this index has one vector")
        if flags & VFIO_IRQ_SET_DATA_NONE:
            if current is not None:
                if count:
                    current.signal()
                    return current
                _release_eventfd(current)
                return None
        elif flags & VFIO_IRQ_SET_DATA_BOOL:
            if not count:
                raise VfioError(errno.EINVAL, "DATA_BOOL needs count 1")
            if data[0] and current is not None:
                current.signal()
            return current
        elif flags & VFIO_IRQ_SET_DATA_EVENTFD:
            if not count:
                raise VfioError(errno.EINVAL, "DATA_EVENTFD needs count 1")
            fd = self._fd(data)
            if fd == -1:
                if current is not None:
                    _release_eventfd(current)
                return None
            if fd >= 0:
                new = self._eventfd(caller, fd)
                if current is not None:
                    _release_eventfd(current)
                return new
            return current
        raise VfioError(errno.EINVAL, "nothing to trigger: no eventfd is set")

    # -- the function's interrupts arrive here (PciDevice.irq_sink) -----------------
    def intx_line(self, asserted: bool) -> None:
        if asserted:
            self.intx_fire()

    def msi_message(self, index: int, vector: int) -> None:
        if self.irq_type == index:
            trigger = self.msi_ctx.get(vector)
            if trigger is not None:
                trigger.signal()

    def error_signal(self) -> None:
        if self.err_trigger is not None:
            self.err_trigger.signal()

    # -- reset -------------------------------------------------------------------------
    def _reset(self, arg) -> int:
        if not self.reset_works:
            raise VfioError(errno.EINVAL, f"{self.name} cannot be reset on its own")
        self._power_up()
        self._guarded(self._try_reset_function)
        return 0

    def _bus_members(self) -> List[tuple]:
        bus = self.reset_bus
        if bus is None or not bus.resettable:
            raise VfioError(errno.ENODEV, f"{self.name} is on a bus that cannot be reset")
        return bus.members

    def _get_pci_hot_reset_info(self, arg) -> int:
        minsz = offsetofend(vfio_pci_hot_reset_info, "count")
        hdr = arg.fetch_struct(vfio_pci_hot_reset_info, minsz)
        hdr.flags = 0
        members = self._bus_members()
        dev_size = ctypes.sizeof(vfio_pci_dependent_device)
        if len(members) > (hdr.argsz - ctypes.sizeof(vfio_pci_hot_reset_info)) // dev_size:
            hdr.count = len(members)
            arg.write(0, bytes(hdr)[:minsz])
            raise VfioError(errno.ENOSPC, f"hot reset of {self.name} affects {len(members)} devices")
        devices = b""
        for devfn, group_id, _ in members:
            if group_id is None:
                # vfio_pci_fill_devs: the header still goes back (flags 0, the caller's count)
                arg.write(0, bytes(hdr)[:minsz])
                raise VfioError(errno.EPERM, "a device on the bus is in no IOMMU group: it cannot be reset")
            devices += bytes(vfio_pci_dependent_device(group_id=group_id, segment=self.reset_bus.segment,
                                                       bus=self.reset_bus.bus, devfn=devfn))
        hdr.count = len(members)
        arg.write(0, bytes(hdr)[:minsz])
        arg.write(ctypes.sizeof(vfio_pci_hot_reset_info), devices)
        return 0

    def _pci_hot_reset(self, arg) -> int:
        minsz = offsetofend(vfio_pci_hot_reset, "count")
        hdr = arg.fetch_struct(vfio_pci_hot_reset, minsz)
        if hdr.flags:
            raise VfioError(errno.EINVAL, "PCI_HOT_RESET: flags must be 0")
        members = self._bus_members()
        if not hdr.count or hdr.count > len(members):
            raise VfioError(errno.EINVAL, f"PCI_HOT_RESET: give 1..{len(members)} group fds")
        raw = arg.read(ctypes.sizeof(vfio_pci_hot_reset), 4 * hdr.count)
        groups = {self.group_of_fd(arg.caller, self._fd(raw, i)) for i in range(hdr.count)}
        # Every function on the bus must be a vfio-pci device, and the user must own all their groups.
        vdevs = []
        for devfn, group_id, vdev in members:
            if vdev is None:
                raise VfioError(errno.EINVAL, f"function {devfn:#x} on the bus is not bound to vfio-pci")
            if group_id not in groups:
                raise VfioError(errno.EINVAL, f"the group fds do not include group {group_id} of function {devfn:#x}")
            vdevs.append(vdev)
        for vdev in vdevs:
            with vdev.lock:
                saved = vdev._save_state()
                try:
                    vdev._guarded(vdev.function.reset_function)
                finally:
                    vdev._restore_state(saved)
        return 0

    # -- IOEVENTFD -----------------------------------------------------------------------
    def _ioeventfd(self, arg) -> int:
        minsz = offsetofend(vfio_device_ioeventfd, "fd")
        req = arg.fetch_struct(vfio_device_ioeventfd, minsz)
        if req.flags & ~VFIO_DEVICE_IOEVENTFD_SIZE_MASK:
            raise VfioError(errno.EINVAL, f"IOEVENTFD: unknown flags 0x{req.flags:x}")
        count = req.flags & VFIO_DEVICE_IOEVENTFD_SIZE_MASK
        if bin(count).count("1") != 1 or req.fd < -1:
            raise VfioError(errno.EINVAL, "IOEVENTFD: give exactly one access size and an fd >= -1")
        bar_index = req.offset >> VFIO_PCI_OFFSET_SHIFT
        pos = req.offset & VFIO_PCI_OFFSET_MASK
        if bar_index > VFIO_PCI_BAR5_REGION_INDEX:
            raise VfioError(errno.EINVAL, "IOEVENTFD: only into BARs")
        bar = self.function.bars[bar_index]
        if pos + count > (bar.size if bar is not None else 0):
            raise VfioError(errno.EINVAL, "IOEVENTFD: beyond the BAR")
        msix = self.function.msix
        if msix is not None and msix.table_bar == bar_index and \
                not (pos + count <= msix.table_offset or pos >= msix.table_offset + msix.table_size):
            raise VfioError(errno.EINVAL, "IOEVENTFD: would write the MSI-X table")
        key = (bar_index, pos, req.data, count)
        if key in self.ioeventfds:
            if req.fd == -1:
                # vfio_pci_ioctl_ioeventfd removal: the virqfd goes, and with it the eventfd reference
                efd, cancel = self.ioeventfds.pop(key)
                cancel()
                _release_eventfd(efd)
                return 0
            raise VfioError(errno.EEXIST, "IOEVENTFD: already registered")
        if req.fd < 0:
            raise VfioError(errno.ENODEV, "IOEVENTFD: nothing registered to remove")
        if len(self.ioeventfds) >= VFIO_PCI_IOEVENTFD_MAX:
            raise VfioError(errno.ENOSPC, "IOEVENTFD: too many")
        efd = self._eventfd(arg.caller, req.fd)
        watch = getattr(efd, "watch", None)
        if watch is None:
            _release_eventfd(efd)
            raise VfioError(errno.EOPNOTSUPP, "this transport cannot watch an eventfd (ioeventfd)")
        data = req.data.to_bytes(8, "little")[:count]
        try:
            cancel = watch(lambda: self._ioeventfd_write(data, req.offset))
        except BaseException:
            _release_eventfd(efd)
            raise
        self.ioeventfds[key] = (efd, cancel)
        return 0

    def _ioeventfd_write(self, data: bytes, offset: int) -> None:
        """vfio_pci_ioeventfd_handler: the write happens, or is dropped (memory disabled, model failure)."""
        try:
            self.write(data, offset)
        except VfioError as e:
            log.debug("%s: ioeventfd write at 0x%x dropped: %s", self.name, offset, e)

    # -- VFIO_DEVICE_FEATURE -------------------------------------------------------------
    def _feature(self, arg) -> int:
        """vfio_ioctl_device_feature, then vfio_pci_core_ioctl_feature (6.1).

        No migration (no mig_ops) and no SR-IOV VF token: those are ENOTTY,
        as is every feature number 6.1 does not know.  What vfio-pci itself
        implements for every device is low-power entry/exit (runtime PM).
        """
        minsz = offsetofend(vfio_device_feature, "flags")
        feature = arg.fetch_struct(vfio_device_feature, minsz)
        known = VFIO_DEVICE_FEATURE_MASK | VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_PROBE
        flags = feature.flags
        if flags & ~known:
            raise VfioError(errno.EINVAL, f"DEVICE_FEATURE: unknown flags 0x{flags:x}")
        if not flags & VFIO_DEVICE_FEATURE_PROBE and flags & VFIO_DEVICE_FEATURE_SET and \
                flags & VFIO_DEVICE_FEATURE_GET:
            raise VfioError(errno.EINVAL, "DEVICE_FEATURE: GET and SET together need PROBE")
        number = flags & VFIO_DEVICE_FEATURE_MASK
        argsz = feature.argsz - minsz
        if number == VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY:
            if self._check_feature(flags, argsz, VFIO_DEVICE_FEATURE_SET, 0):
                self._pm_entry(None)
            return 0
        if number == VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP:
            size = ctypes.sizeof(vfio_device_low_power_entry_with_wakeup)
            if self._check_feature(flags, argsz, VFIO_DEVICE_FEATURE_SET, size):
                entry = vfio_device_low_power_entry_with_wakeup.from_buffer_copy(arg.read(minsz, size))
                if entry.wakeup_eventfd < 0:
                    raise VfioError(errno.EINVAL, "LOW_POWER_ENTRY_WITH_WAKEUP: wakeup_eventfd must be an fd")
                self._pm_entry(self._eventfd(arg.caller, entry.wakeup_eventfd))
            return 0
        if number == VFIO_DEVICE_FEATURE_LOW_POWER_EXIT:
            if self._check_feature(flags, argsz, VFIO_DEVICE_FEATURE_SET, 0):
                self._pm_exit()
            return 0
        what = "migration" if number in (VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE) \
            else f"feature {number}"
        raise VfioError(errno.ENOTTY, f"{self.name}: {what} is not supported")

    @staticmethod
    def _check_feature(flags: int, argsz: int, supported: int, minsz: int) -> bool:
        """vfio_check_feature: False for a successful PROBE, True to go on, EINVAL otherwise."""
        if flags & (VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET) & ~supported:
            raise VfioError(errno.EINVAL, "DEVICE_FEATURE: this feature does not support "
                                          + ("GET" if supported == VFIO_DEVICE_FEATURE_SET else "SET"))
        if flags & VFIO_DEVICE_FEATURE_PROBE:
            return False
        if not flags & (VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET):
            raise VfioError(errno.EINVAL, "DEVICE_FEATURE: without PROBE, give GET or SET")
        if argsz < minsz:
            raise VfioError(errno.EINVAL, f"DEVICE_FEATURE: the feature needs {minsz} bytes of data")
        return True

    # -- runtime power management (the LOW_POWER features) -----------------------------
    # Once the user asked for low power, the device is runtime-suspended whenever no
    # access is in progress: every ioctl, read, write or mmap wakes it for its duration
    # (pm_runtime_resume_and_get), and a wake-up eventfd, if one was given, is signalled
    # on that first wake and ends low-power mode (vfio_pci_core_runtime_resume).
    def _pm_entry(self, wake_eventfd) -> None:
        if self.pm_runtime_engaged:
            if wake_eventfd is not None:
                _release_eventfd(wake_eventfd)
            raise VfioError(errno.EINVAL, f"{self.name} is already in low-power mode")
        self.pm_runtime_engaged = True
        self.pm_wake_eventfd = wake_eventfd

    def _pm_exit(self) -> None:
        """__vfio_pci_runtime_pm_exit."""
        self.pm_runtime_engaged = False
        if self.pm_wake_eventfd is not None:
            _release_eventfd(self.pm_wake_eventfd)
            self.pm_wake_eventfd = None

    def _pm_suspend(self) -> None:
        """vfio_pci_core_runtime_suspend, then the PCI core: INTx masked, state saved, D3hot."""
        if not self.pm_runtime_engaged or self._pm_suspended is not None:
            return
        intx_masked = self.irq_type == VFIO_PCI_INTX_IRQ_INDEX and not self.intx.masked
        if intx_masked:
            self._intx_mask()
        saved = self._save_state()
        if self.function.pm is not None:
            self._set_power_state(self.function.pm.offset, PCI_D3HOT)
        self._pm_suspended = (saved, intx_masked)

    def _pm_resume(self) -> None:
        """Wake a runtime-suspended device for an access (vfio_pci_core_runtime_resume)."""
        if self._pm_suspended is None:
            return
        saved, intx_masked = self._pm_suspended
        self._pm_suspended = None
        if self.function.pm is not None:
            self._set_power_state(self.function.pm.offset, 0)
        self._restore_state(saved)
        if self.pm_wake_eventfd is not None:
            self.pm_wake_eventfd.signal()
            self._pm_exit()
        if intx_masked:
            self._intx_unmask()

    # -- DeviceOps: read / write / mmap -----------------------------------------------------
    def read(self, size: int, offset: int) -> bytes:
        if size <= 0:
            return b""
        with self.lock:
            return self._rw(offset, size, None)

    def write(self, data: bytes, offset: int) -> int:
        if not data:
            return 0
        with self.lock:
            return self._rw(offset, len(data), bytes(data))

    def _rw(self, offset: int, count: int, data: Optional[bytes]):
        index = offset >> VFIO_PCI_OFFSET_SHIFT
        if index >= VFIO_PCI_NUM_REGIONS:
            raise VfioError(errno.EINVAL, f"{self.name}: offset 0x{offset:x} is in no region")
        self._pm_resume()  # vfio_pci_rw: pm_runtime_resume_and_get
        try:
            return self._region_rw(index, offset, count, data)
        finally:
            self._pm_suspend()

    def _region_rw(self, index: int, offset: int, count: int, data: Optional[bytes]):
        pos = offset & VFIO_PCI_OFFSET_MASK
        if index == VFIO_PCI_CONFIG_REGION_INDEX:
            return self._config_rw(pos, count, data)
        if index == VFIO_PCI_ROM_REGION_INDEX:
            if data is not None:
                raise VfioError(errno.EINVAL, f"{self.name}: the ROM is read-only")
            return self._rom_read(pos, count)
        if index == VFIO_PCI_VGA_REGION_INDEX:
            raise VfioError(errno.EINVAL, f"{self.name} has no VGA region")
        return self._bar_rw(index, pos, count, data)

    def _config_rw(self, pos: int, count: int, data: Optional[bytes]):
        vc = self.vconfig
        if pos < 0 or pos >= vc.size or pos + count > vc.size:
            raise VfioError(errno.EFAULT, f"{self.name}: config access of {count} bytes at 0x{pos:x} "
                                          f"is beyond the {vc.size}-byte config space")
        out = bytearray()
        done = 0
        while done < count:
            value = None if data is None else int.from_bytes(data[done:done + 4].ljust(4, b"\0"), "little")
            n, got = self._guarded(vc.access, pos + done, count - done, value)
            if data is None:
                out += got.to_bytes(n, "little")
            done += n
        return bytes(out) if data is None else done

    def _bar_rw(self, index: int, pos: int, count: int, data: Optional[bytes]):
        fn = self.function
        bar = fn.bars[index]
        if bar is None or not bar.address:
            raise VfioError(errno.EINVAL, f"{self.name}: BAR{index} is not implemented")
        if pos >= bar.size:
            raise VfioError(errno.EINVAL, f"{self.name}: 0x{pos:x} is beyond BAR{index}")
        count = min(count, bar.size - pos)
        x_start = x_end = 0
        msix = fn.msix
        if msix is not None and msix.table_bar == index:
            x_start, x_end = msix.table_offset, msix.table_offset + msix.table_size
        return self._io_rw(pos, count, data, x_start, x_end, self.io_width, test_mem=not bar.io,
                           read=lambda o, n: fn.bar_read(index, o, n),
                           write=lambda o, n, v: fn.bar_write(index, o, n, v))

    def _rom_read(self, pos: int, count: int) -> bytes:
        rom = self.function.rom
        if rom is None or not rom.address:
            raise VfioError(errno.EINVAL, f"{self.name} has no ROM")
        if pos >= rom.size:
            raise VfioError(errno.EINVAL, f"{self.name}: 0x{pos:x} is beyond the ROM BAR")
        image = rom.image_size()
        if not image:
            raise VfioError(errno.ENOMEM, f"{self.name}: the ROM has no valid image")
        count = min(count, rom.size - pos)
        # Bytes past the image read as 0xff; ROMs never see 8-byte accesses.
        return self._io_rw(pos, count, None, image, rom.size, 4, test_mem=True, read=self.function.rom_read)

    def _io_rw(self, pos, count, data, x_start, x_end, max_width, test_mem, read, write=None):
        """vfio_pci_core_do_io_rw: naturally aligned accesses, an excluded range, EIO when memory is off."""
        out = bytearray()
        done = 0
        while done < count:
            off = pos + done
            left = count - done
            fillable = min(left, x_start - off) if off < x_start else left if off >= x_end else 0
            if fillable:
                n = next(w for w in (8, 4, 2, 1) if w <= max_width and fillable >= w and off % w == 0)
                if test_mem and not self.vconfig.memory_enabled():
                    raise VfioError(errno.EIO, f"{self.name}: memory access with memory decode disabled")
                if data is None:
                    out += self._guarded(read, off, n).to_bytes(n, "little")
                else:
                    self._guarded(write, off, n, int.from_bytes(data[done:done + n], "little"))
            else:
                n = min(left, x_end - off)  # excluded: reads fill with 0xff, writes are dropped
                if data is None:
                    out += b"\xff" * n
            done += n
        return bytes(out) if data is None else done

    def _guarded(self, fn, *args):
        """Run device-model code (handlers, config hooks, reset) for one access.

        Whatever the model raises -- a bug, or a VfioError such as a DMA fault
        it did not handle -- fails this access with EIO, logged with its
        traceback; the device, its lock and the server carry on.
        """
        try:
            return fn(*args)
        except (ModelFailure, RetryRequest):
            raise
        except Exception:
            log.exception("%s: the device model failed an access; it keeps running", self.name)
            raise ModelFailure(errno.EIO, f"{self.name}: the device model failed (see the server log)") from None

    def region_memory(self, index: int) -> SharedMemory:
        """The shared memory behind a mappable region (a plain-memory BAR), for a transport.

        A transport sends ``region_memory(i).fileno()`` (a memfd) to the client,
        which maps any page-aligned part of the BAR at the same offset into the
        memfd as into the BAR.  EINVAL for a region that cannot be mapped
        (registers, I/O, config, ROM, VGA).
        """
        if not 0 <= index <= VFIO_PCI_BAR5_REGION_INDEX or not self._mmap_supported(index):
            raise VfioError(errno.EINVAL, f"{self.name}: region {index} cannot be mapped")
        return self.function.bars[index].memory

    def mmap(self, offset: int, length: int):
        """vfio_pci_core_mmap's checks for a client mapping ``length`` bytes at file ``offset``.

        Returns ``(memory, start)``: map ``memory.fileno()`` at ``start`` for
        ``length`` bytes.  Any whole pages of a mappable BAR, the MSI-X table
        and PBA included (6.1).
        """
        index = offset >> VFIO_PCI_OFFSET_SHIFT
        pos = offset & VFIO_PCI_OFFSET_MASK
        if index >= VFIO_PCI_ROM_REGION_INDEX:
            raise VfioError(errno.EINVAL, f"{self.name}: region {index} cannot be mapped")
        if pos % PAGE_SIZE or length <= 0:
            raise VfioError(errno.EINVAL, f"{self.name}: mmap must start on a page")
        with self.lock:
            self._pm_resume()
            if not self._mmap_supported(index):
                raise VfioError(errno.EINVAL, f"{self.name}: BAR{index} cannot be mapped")
            bar = self.function.bars[index]
            phys_len = (bar.size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
            if pos + length <= phys_len:
                return bar.memory, pos
        raise VfioError(errno.EINVAL, f"{self.name}: 0x{pos:x}+0x{length:x} of BAR{index} is not mappable")
