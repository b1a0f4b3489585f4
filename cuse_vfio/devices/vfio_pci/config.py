"""vfio-pci's config space virtualization, rule for rule as ``vfio_pci_config.c`` (6.1) does it.

IDs and the capability pointers come from a virtual copy (``vconfig``); BARs
are entirely virtual (sizing works on the copy, the function's BARs never
change); the command register goes to the function except INTx-disable,
which is virtual and masks INTx; status writes are dropped (so RW1C bits
cannot be cleared from user space); interrupt line is virtual and writable,
pin virtual and read-only; MSI flags, address and data are virtual, and the
MSI Enable bit survives a write only while MSI is enabled through SET_IRQS
(the value is also written to the function); MSI-X control is read from the
function, so its Enable bit follows SET_IRQS; capabilities vfio-pci does not
know are hidden from the chain; PM state changes are done by "the host";
PCIe FLR and MRRS are virtualized; unassigned config bytes pass through.

What a config write sets off elsewhere goes back to the device that owns
this view: INTx masking to its interrupts (:mod:`.intrs`), a power state
change and a function reset to the device (:mod:`.core`).
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from ...errors import VfioError
from ...uapi import VFIO_PCI_MSI_IRQ_INDEX
from ..pci import (
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
    PCI_PM_CAP_PME_MASK,
    PCI_PM_CTRL,
    PCI_PM_CTRL_STATE_MASK,
    PCI_PM_PMC,
    PCI_ROM_ADDRESS,
    PCI_ROM_ADDRESS_ENABLE,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_STD_HEADER_SIZEOF,
    PCI_STD_NUM_BARS,
    PCI_VENDOR_ID,
)

if TYPE_CHECKING:
    from .core import VfioPciDevice

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
        #: the VirtualConfig methods that read and write through these bits (None: writes dropped)
        self.reader = "_read_" + read
        self.writer = None if write is None else "_write_" + write
        #: (offset << 3 | count) -> masks(offset, count), as far as asked
        self.known: Dict[int, Tuple[int, int]] = {}

    def set(self, offset: int, size: int, virt: int, write: int) -> "_Perm":
        self.virt[offset:offset + size] = (virt & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        self.write[offset:offset + size] = (write & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        self.known.clear()
        return self

    def masks(self, offset: int, count: int) -> Tuple[int, int]:
        """(virtual bits, writable bits) of ``count`` bytes at ``offset``; remembered, as the bits never
        change once the tables are built and every config access asks."""
        key = offset << 3 | count
        masks = self.known.get(key)
        if masks is None:
            virt = int.from_bytes(self.virt[offset:offset + count].ljust(count, b"\0"), "little")
            write = int.from_bytes(self.write[offset:offset + count].ljust(count, b"\0"), "little")
            masks = self.known[key] = (virt, write)
        return masks


ALL = 0xFFFFFFFF

#: size (1, 2, 4) -> unpack_from of a little-endian value that long
_UNPACK = {1: struct.Struct("<B").unpack_from, 2: struct.Struct("<H").unpack_from, 4: struct.Struct("<I").unpack_from}


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
        #: per offset, what an access there does (``_plan``), worked out at the first access
        self._plans: List[Optional[tuple]] = [None] * self.size
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

    # -- an access from user space (vfio_pci_config_rw) ---------------------------
    def rw(self, pos: int, count: int, data: Optional[bytes]):
        """Read ``count`` bytes at ``pos`` (``data`` None) or write ``data``, in the chunks access() takes."""
        if pos < 0 or pos >= self.size or pos + count > self.size:
            raise VfioError(errno.EFAULT, f"{self.vdev.name}: config access of {count} bytes at 0x{pos:x} "
                                          f"is beyond the {self.size}-byte config space")
        value = None if data is None else int.from_bytes(data[:4].ljust(4, b"\0"), "little")
        try:  # (vdev.guarded, spelled out for the first chunk)
            n, got = self.access(pos, count, value)
        except Exception as e:
            raise self.vdev.model_failure(e) from None
        if n == count:  # one chunk: a driver's register access
            return got.to_bytes(n, "little") if data is None else n
        out = bytearray(got.to_bytes(n, "little") if data is None else b"")
        done = n
        while done < count:
            value = None if data is None else int.from_bytes(data[done:done + 4].ljust(4, b"\0"), "little")
            n, got = self.vdev.guarded(self.access, pos + done, count - done, value)
            if data is None:
                out += got.to_bytes(n, "little")
            done += n
        return bytes(out) if data is None else done

    # -- one access (vfio_config_do_rw) ----------------------------------------
    def access(self, pos: int, count: int, value: Optional[int]) -> tuple:
        """Do the first chunk of an access at ``pos``; returns (bytes done, value read)."""
        plan = self._plans[pos]
        if plan is None:
            plan = self._plans[pos] = self._plan(pos)
        span, perm, offset, reader, writer = plan
        if count > span:
            count = span
        count = 4 if count >= 4 and not pos % 4 else 2 if count >= 2 and not pos % 2 else 1
        if value is not None:
            if writer is not None:
                writer(self, pos, count, perm, offset, value & ((1 << 8 * count) - 1))
            return count, 0
        return count, reader(self, pos, count, perm, offset)

    def _plan(self, pos: int) -> tuple:
        """What an access at ``pos`` does, the same for every access there (the map and the permissions
        are fixed once built): (bytes up to the dword's end that share its capability, the permission
        bits, the offset into the capability, the read function, the write function or None)."""
        i = 1
        while (pos + i) % 4 and pos + i < self.size and self.map[pos + i] == self.map[pos]:
            i += 1
        cap = self.map[pos]
        if cap == PCI_CAP_ID_INVALID:
            perm, start = _UNASSIGNED, pos
        elif cap == PCI_CAP_ID_INVALID_VIRT:
            perm, start = _VIRT, pos
        elif pos >= PCI_CFG_SPACE_SIZE:
            perm = _DIRECT_RO if cap > PCI_EXT_CAP_ID_MAX else _ECAP_PERMS.get(cap, _DIRECT_RO)
            start = self._find_cap_start(pos)
        else:
            perm = self.msi_perm if cap == PCI_CAP_ID_MSI and self.msi_perm is not None \
                else _CAP_PERMS.get(cap, _DIRECT_RO)
            start = self._find_cap_start(pos) if cap != PCI_CAP_ID_BASIC else 0
        offset = pos - start
        cls = type(self)
        reader = getattr(cls, perm.reader)
        if reader is VirtualConfig._read_msi or reader is VirtualConfig._read_basic and not _is_bar(offset):
            reader = cls._read_default  # what they come to there
        writer = getattr(cls, perm.writer) if perm.writer is not None else None
        return i, perm, offset, reader, writer

    # -- read functions ----------------------------------------------------------
    def _read_default(self, pos, count, perm, offset) -> int:
        # (_vget and perm.masks spelled out: the common read; count is 1, 2 or 4 here)
        val = _UNPACK[count](self.vconfig, pos)[0]
        virt, _ = perm.known.get(offset << 3 | count) or perm.masks(offset, count)
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
            vdev.irqs.set_virq_disabled(bool(self._vget(PCI_COMMAND, 2) & PCI_COMMAND_INTX_DISABLE))
        if _is_bar(offset):
            self.bardirty = True

    def _write_pm(self, pos, count, perm, offset, val) -> None:
        self._write_default(pos, count, perm, offset, val)
        if offset == PCI_PM_CTRL:
            # The state bits are not writable: the host changes the power state itself.
            self.vdev.set_power_state(pos - offset, val & PCI_PM_CTRL_STATE_MASK)

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
                self.vdev.try_reset_function()
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
            if self.vdev.irqs.irq_type != VFIO_PCI_MSI_IRQ_INDEX:
                flags &= ~PCI_MSI_FLAGS_ENABLE  # MSI is enabled with SET_IRQS, not here
            if (flags & PCI_MSI_FLAGS_QSIZE) >> 4 > self.vdev.irqs.msi_qmax:
                flags = (flags & ~PCI_MSI_FLAGS_QSIZE) | (self.vdev.irqs.msi_qmax << 4)
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
        # (_vget spelled out, and only the command register's low byte, which holds the bit: every BAR access asks)
        return self.vconfig[PCI_COMMAND] & PCI_COMMAND_MEMORY != 0 and self.vdev.function.power_state < PCI_D3HOT

