"""The data structures an NVMe controller returns: Identify (NVMe 1.4, 5.15.2) and log pages (5.14.1).

Each builder returns the bytes at the offsets of the spec's figures; the
controller transfers them to the host's buffer by its PRPs.
"""

from __future__ import annotations

import struct
import time
from typing import Iterable, List

from . import spec


class ControllerIdentity:
    """What Identify Controller reports, fixed when the model is built."""

    def __init__(self, *, vid: int, ssvid: int, serial: str, model: str, firmware: str, mdts: int,
                 namespaces: int, aerl: int, elpe: int, oui: bytes, wctemp: int, cctemp: int):
        self.vid, self.ssvid = vid, ssvid
        self.serial, self.model, self.firmware = serial, model, firmware
        self.mdts = mdts
        self.nn = namespaces
        self.aerl = aerl
        self.elpe = elpe
        self.oui = oui
        self.wctemp, self.cctemp = wctemp, cctemp
        self.cntlid = 0
        #: Optional NVM commands: Dataset Management, Write Zeroes, Timestamp
        self.oncs = (1 << 2) | (1 << 3) | (1 << 6)
        #: Volatile Write Cache present, Flush with the broadcast NSID supported
        self.vwc = 0x01 | (0x3 << 1)
        #: Log Page Attributes: SMART per namespace, extended data (NUMDU, LPO)
        self.lpa = (1 << 0) | (1 << 2)
        self.subnqn = f"nqn.2019-08.org.qemu:{serial}"

    def controller(self) -> bytes:
        d = bytearray(spec.IDENTIFY_SIZE)
        struct.pack_into("<HH20s40s8sB3sBBH", d, 0, self.vid, self.ssvid, _ascii(self.serial, 20),
                         _ascii(self.model, 40), _ascii(self.firmware, 8), 6, self.oui, 0, self.mdts, self.cntlid)
        struct.pack_into("<I", d, 80, spec.NVME_VS_1_4)                       # VER
        d[111] = 1                                                           # CNTRLTYPE: I/O controller
        struct.pack_into("<HBBBBBB", d, 256, 0, 3, self.aerl, 0x03, self.lpa, self.elpe, 0)  # OACS..NPSS
        struct.pack_into("<HH", d, 266, self.wctemp, self.cctemp)           # WCTEMP, CCTEMP
        d[512] = (spec.SQES << 4) | spec.SQES                               # SQES max | min
        d[513] = (spec.CQES << 4) | spec.CQES                               # CQES
        struct.pack_into("<HIHHBB", d, 514, 0, self.nn, self.oncs, 0, 0, self.vwc)  # MAXCMD NN ONCS FUSES FNA VWC
        struct.pack_into("<I", d, 536, 0)                                    # SGLS: not supported
        nqn = self.subnqn.encode()[:255]
        d[768:768 + len(nqn)] = nqn                                          # SUBNQN
        struct.pack_into("<HxxIIBBBB", d, 2048, 0x9C4, 0x10, 0x4, 0, 0, 0, 0)  # power state 0: 25 W
        return bytes(d)

    @staticmethod
    def nvm_controller() -> bytes:
        """Identify with CNS 06h and CSI 00h: the NVM command set's controller limits (none reported)."""
        return bytes(spec.IDENTIFY_SIZE)


def identify_namespace(ns, lba_formats: List[int]) -> bytes:
    d = bytearray(spec.IDENTIFY_SIZE)
    flbas = lba_formats.index(ns.lba_size)
    struct.pack_into("<QQQBBBBBBBBBB", d, 0, ns.nlbas, ns.nlbas, ns.nlbas,
                     0,                       # NSFEAT: no thin provisioning reported
                     len(lba_formats) - 1,    # NLBAF (0's based)
                     flbas, 0, 0, 0, 0, 0,    # FLBAS MC DPC DPS NMIC RESCAP
                     0,                       # FPI
                     0x09)                    # DLFEAT: deallocated blocks read as zeros; Write Zeroes may deallocate
    nvmcap = ns.nlbas * ns.lba_size
    struct.pack_into("<QQ", d, 48, nvmcap & (2 ** 64 - 1), nvmcap >> 64)
    d[104:120] = ns.nguid
    d[120:128] = ns.eui64
    for i, size in enumerate(lba_formats):
        struct.pack_into("<HBB", d, 128 + 4 * i, 0, size.bit_length() - 1, 0)  # MS, LBADS, RP (best)
    return bytes(d)


def active_namespace_list(nsids: Iterable[int], above: int) -> bytes:
    ids = [n for n in sorted(nsids) if n > above][:spec.IDENTIFY_SIZE // 4]
    return struct.pack(f"<{len(ids)}I", *ids).ljust(spec.IDENTIFY_SIZE, b"\0")


def namespace_descriptors(ns) -> bytes:
    out = bytearray()
    for nidt, value in ((spec.NIDT_EUI64, ns.eui64), (spec.NIDT_NGUID, ns.nguid), (spec.NIDT_UUID, ns.uuid)):
        out += struct.pack("<BBxx", nidt, len(value)) + value
    return bytes(out.ljust(spec.IDENTIFY_SIZE, b"\0"))


# -- log pages ----------------------------------------------------------------------
class Health:
    """What the SMART / Health Information log page counts, across controller resets."""

    def __init__(self, temperature: int):
        self.temperature = temperature
        self.started = time.monotonic()
        self.unsafe_shutdowns = 0

    def smart_log(self, namespaces, critical_warning: int, error_count: int) -> bytes:
        d = bytearray(512)
        read_units = sum(-(-ns.bytes_read // 512000) for ns in namespaces)
        written_units = sum(-(-ns.bytes_written // 512000) for ns in namespaces)
        struct.pack_into("<BHBBB", d, 0, critical_warning, self.temperature, 100, 10, 0)
        hours = int((time.monotonic() - self.started) // 3600)
        counters = (read_units, written_units, sum(ns.read_commands for ns in namespaces),
                    sum(ns.write_commands for ns in namespaces), 0, 1, hours, self.unsafe_shutdowns,
                    sum(ns.media_errors for ns in namespaces), error_count)
        for i, value in enumerate(counters):  # 128-bit little-endian counters from byte 32
            struct.pack_into("<QQ", d, 32 + 16 * i, value & (2 ** 64 - 1), value >> 64)
        return bytes(d)


def firmware_slot_log(firmware: str) -> bytes:
    d = bytearray(512)
    d[0] = 0x01                      # AFI: slot 1 active
    d[8:16] = _ascii(firmware, 8)    # FRS1
    return bytes(d)


class ErrorLog:
    """The Error Information log page: the newest ``entries`` errors, newest first (NVMe 1.4, 5.14.1.1)."""

    ENTRY = struct.Struct("<QHHHHQIBB2xQH22x")

    def __init__(self, entries: int):
        self.entries = entries
        self.count = 0
        self._log: List[bytes] = []

    def record(self, sqid: int, cid: int, status: int, nsid: int = 0, lba: int = 0, location: int = 0xFFFF) -> None:
        self.count += 1
        entry = self.ENTRY.pack(self.count, sqid, cid, (status & 0x7FFF) << 1, location, lba, nsid, 0, 0, 0, 0)
        self._log.insert(0, entry)
        del self._log[self.entries:]

    def page(self) -> bytes:
        return b"".join(self._log).ljust(self.entries * self.ENTRY.size, b"\0")


def _ascii(text: str, width: int) -> bytes:
    """An Identify string field: ASCII, space padded (NVMe 1.4, 1.5)."""
    return text.encode("ascii", "replace")[:width].ljust(width, b" ")
