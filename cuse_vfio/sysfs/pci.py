"""What sysfs says about an emulated PCI function and its IOMMU group, in the kernel's formats.

Formats (checked against ``drivers/pci/pci-sysfs.c``, ``pci-driver.c``'s
uevent, ``drivers/pci/iov.c``, ``drivers/iommu/iommu.c``, a real 6.18 ``/sys``
on the dev machine and Debian's 6.1 in the vfio VM):

- ``vendor`` ``device`` ``subsystem_*`` ``"0x%04x\\n"``; ``class``
  ``"0x%06x\\n"``; ``revision`` ``"0x%02x\\n"``; ``irq`` ``"%u\\n"``;
  ``numa_node`` ``"-1\\n"``; ``power_state`` ``"D0\\n"`` or ``"D3hot\\n"`` (the PM
  control register's state, through ``config_reader``); ``modalias``
  ``"pci:v%08Xd%08Xsv%08Xsd%08Xbc%02Xsc%02Xi%02X\\n"``; ``uevent`` lines
  ``DRIVER=``, ``PCI_CLASS=%X``, ``PCI_ID=%04X:%04X``, ``PCI_SUBSYS_ID=``,
  ``PCI_SLOT_NAME=``, ``MODALIAS=``; ``local_cpus``/``local_cpulist``: the
  host's online CPUs (the kernel's answer for ``numa_node == -1``) as a
  ``%*pb`` mask and a ``%*pbl`` list.
- ``resource``: ``"0x%016x 0x%016x 0x%016x\\n"`` (start end flags), 13 lines
  for a type-0 device as on distribution kernels (6 BARs, the ROM, 6 SR-IOV
  BARs; a kernel without ``CONFIG_PCI_IOV``, like the dev machine's, prints 7).
  An emulated BAR has no host physical address and nothing can map it through
  sysfs (the view has no ``resourceN`` files; clients map BARs through the
  VFIO device fd), so a BAR is reported as the kernel reports one it could
  not place: start 0, end ``size - 1``, and the flags the kernel derives from
  the BAR register (see :func:`bar_resource`), unless the caller passes the
  address the model's BAR register holds.  DPDK, the one client known to
  parse it, takes only ``len = end - start + 1`` and the MEM flag from it.
- ``config``: the model's bytes, read through ``config_reader`` on every
  read so they are live; ``st_size`` 256 or 4096 like the kernel's bin
  attribute.  As in ``pci_read_config``, an opener without CAP_SYS_ADMIN
  sees only the first 64 bytes.
- SR-IOV: ``sriov_totalvfs``, ``sriov_numvfs``, ``sriov_offset``,
  ``sriov_stride``, ``sriov_vf_device``, ``sriov_drivers_autoprobe``,
  ``sriov_vf_total_msix`` exist only for a physical function, i.e. a device
  whose config space has an SR-IOV extended capability with TotalVFs > 0
  (``sriov_pf_attrs_are_visible``); every other device has none of them, and
  no device has ``max_vfs`` (igb_uio's, not the kernel's), so a client's
  ``access()`` gets ENOENT as from the kernel.
- IOMMU groups: ``type`` is ``"DMA-FQ\\n"`` by default (what the 6.1 VM shows
  for QEMU's intel-iommu); ``reserved_regions`` ``"0x%016x 0x%016x msi\\n"``
  for the x86 MSI window.  Both are per-group settings (:class:`SysfsGroup`).
  A noiommu group (``vfio_noiommu_group_alloc``) has type ``"unknown\\n"``
  (no default domain), an empty ``reserved_regions`` and a ``name`` file,
  ``"vfio-noiommu\\n"`` (``iommu_group_set_name``); its devices have no
  ``iommu`` link and the IOMMU unit does not list them.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

from .tree import SysfsViewError

DRIVER = "vfio-pci"

#: ``resource`` lines of a type-0 device: PCI_STD_RESOURCES (6) + ROM + 6 SR-IOV BARs.
RESOURCE_LINES = 13
#: What ``config`` shows an opener without CAP_SYS_ADMIN (``pci_read_config``, type 0 header).
UNPRIVILEGED_CONFIG_BYTES = 64
CAP_SYS_ADMIN = 21

# include/linux/ioport.h
IORESOURCE_IO = 0x00000100
IORESOURCE_MEM = 0x00000200
IORESOURCE_PREFETCH = 0x00002000
IORESOURCE_SIZEALIGN = 0x00040000
IORESOURCE_MEM_64 = 0x00100000

#: The x86 interrupt window every intel-iommu group reports.
MSI_WINDOW = (0xFEE00000, 0xFEEFFFFF, "msi")
RESERVED_REGION_TYPES = ("direct", "direct-relaxable", "reserved", "msi")
GROUP_TYPES = ("DMA", "DMA-FQ", "identity", "unmanaged", "blocked", "unknown")

BDF = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]$")

Resource = Tuple[int, int, int]

PCI_CFG_SPACE_SIZE = 256
# include/uapi/linux/pci_regs.h: the SR-IOV extended capability
PCI_EXT_CAP_ID_SRIOV = 0x10
PCI_SRIOV_CTRL = 0x08
PCI_SRIOV_CTRL_VFE = 0x01
PCI_SRIOV_TOTAL_VF = 0x0E
PCI_SRIOV_NUM_VF = 0x10
PCI_SRIOV_VF_OFFSET = 0x14
PCI_SRIOV_VF_STRIDE = 0x16
PCI_SRIOV_VF_DID = 0x1A
SRIOV_SIZE = 0x40


# the PCI power management capability
PCI_CAP_ID_PM = 0x01
PCI_PM_CTRL = 4
#: pci_power_names, from D0 (pci_power_name(state))
PCI_POWER_NAMES = ("D0", "D1", "D2", "D3hot")


def capability(cfg: bytes, cap_id: int) -> Optional[int]:
    """The offset of the first standard capability ``cap_id`` in ``cfg`` (None: absent)."""
    if len(cfg) < 0x40 or not cfg[0x06] & 0x10:  # PCI_STATUS_CAP_LIST
        return None
    pos, seen = cfg[0x34] & 0xFC, set()
    while 0x40 <= pos <= len(cfg) - 2 and pos not in seen:
        if cfg[pos] == cap_id:
            return pos
        seen.add(pos)
        pos = cfg[pos + 1] & 0xFC
    return None


def ext_capability(cfg: bytes, cap_id: int) -> Optional[int]:
    """The offset of the first extended capability ``cap_id`` in ``cfg`` (None: absent)."""
    pos, seen = PCI_CFG_SPACE_SIZE, set()
    while PCI_CFG_SPACE_SIZE <= pos <= len(cfg) - 4 and pos not in seen:
        header = int.from_bytes(cfg[pos:pos + 4], "little")
        if header == 0 or header == 0xFFFFFFFF:
            return None
        if header & 0xFFFF == cap_id:
            return pos
        seen.add(pos)
        pos = header >> 20 & 0xFFC
    return None


def bar_resource(size: int, *, io: bool = False, mem64: bool = False,
                 prefetchable: bool = False, start: int = 0) -> Resource:
    """One ``resource`` line for a BAR of ``size`` bytes, flagged as the kernel flags it.

    The kernel keeps the BAR register's low bits (I/O space bit, 64-bit type,
    prefetchable) in the resource flags and adds IORESOURCE_{IO,MEM},
    PREFETCH, MEM_64 and SIZEALIGN: a 1 MiB 32-bit MMIO BAR is ``0x40200``,
    a 64-bit one ``0x140204``, 64-bit prefetchable ``0x14220c``, I/O ``0x40101``.

    ``start`` is best the address the model's BAR register holds: ``lspci``
    prints a start of 0 as ``<unassigned>`` and a start that differs from
    the register as ``[virtual]``.
    """
    if size == 0:
        return (0, 0, 0)
    if size < 0 or size & (size - 1):
        raise ValueError(f"a BAR size is a power of two, not {size:#x}")
    if io:
        flags = IORESOURCE_SIZEALIGN | IORESOURCE_IO | 0x1
    else:
        flags = IORESOURCE_SIZEALIGN | IORESOURCE_MEM
        if mem64:
            flags |= IORESOURCE_MEM_64 | 0x4
        if prefetchable:
            flags |= IORESOURCE_PREFETCH | 0x8
    return (start, start + size - 1, flags)


@dataclass(frozen=True)
class SysfsDevice:
    """What sysfs says about one emulated PCI function: plain data and one live callback.

    ``config_reader`` returns the config space as the model reports it now
    (shorter answers are padded with zeros to ``config_size``); ``resources``
    are ``(start, end, flags)`` lines, at most 13, the rest print as zeros;
    ``is_enabled``, when given, feeds the ``enable`` attribute (vfio-pci
    enables a device while a device fd is open), otherwise it reads 0;
    ``sriov`` is the config offset of the SR-IOV capability of a physical
    function (None: not one; :meth:`from_config_space` finds it).
    """

    bdf: str
    group_id: int
    vendor: int
    device: int
    subsystem_vendor: int
    subsystem_device: int
    class_code: int
    revision: int
    irq: int
    config_reader: Callable[[], bytes] = field(repr=False, compare=False)
    resources: Sequence[Resource] = ()
    config_size: int = 256
    is_enabled: Optional[Callable[[], bool]] = field(default=None, repr=False, compare=False)
    sriov: Optional[int] = None
    #: behind the IOMMU (an ``iommu`` link, listed by the IOMMU unit); False for a noiommu device
    iommu: bool = True

    def __post_init__(self) -> None:
        where = f"sysfs device {self.bdf!r}"
        if not isinstance(self.bdf, str) or not BDF.match(self.bdf):
            raise SysfsViewError(f"{where}: a PCI address is written like 0000:00:02.0 (lower-case hex)")
        if not isinstance(self.group_id, int) or self.group_id < 0:
            raise SysfsViewError(f"{where}: IOMMU group {self.group_id!r} is not a number >= 0")
        for name, bits in (("vendor", 16), ("device", 16), ("subsystem_vendor", 16),
                           ("subsystem_device", 16), ("class_code", 24), ("revision", 8), ("irq", 32)):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < 1 << bits:
                raise SysfsViewError(f"{where}: {name} {value!r} does not fit in {bits} bits")
        if self.config_size not in (256, 4096):
            raise SysfsViewError(f"{where}: config_size is 256 (PCI) or 4096 (PCIe), not {self.config_size}")
        if not callable(self.config_reader):
            raise SysfsViewError(f"{where}: config_reader must be a callable returning the config bytes")
        if len(self.resources) > RESOURCE_LINES:
            raise SysfsViewError(f"{where}: a type-0 device has {RESOURCE_LINES} resources, "
                                 f"not {len(self.resources)}")
        for line in self.resources:
            if len(line) != 3 or not all(isinstance(v, int) and 0 <= v < 1 << 64 for v in line):
                raise SysfsViewError(f"{where}: resource {line!r} is not (start, end, flags) in 64 bits")
        if self.sriov is not None and not (isinstance(self.sriov, int)
                                           and PCI_CFG_SPACE_SIZE <= self.sriov <= self.config_size - SRIOV_SIZE):
            raise SysfsViewError(f"{where}: an SR-IOV capability lies in extended config space, "
                                 f"not at {self.sriov!r}")

    @classmethod
    def from_config_space(cls, bdf: str, group_id: int, config_reader: Callable[[], bytes], *,
                          irq: Optional[int] = None, resources: Sequence[Resource] = (),
                          config_size: Optional[int] = None,
                          is_enabled: Optional[Callable[[], bool]] = None, iommu: bool = True) -> "SysfsDevice":
        """Take the IDs from the model's config header (read once, now).

        ``irq`` defaults to the Interrupt Line register when the device has an
        interrupt pin, 0 otherwise; ``config_size`` to 4096 when the reader
        returns extended config space; ``sriov`` to the SR-IOV capability when
        the device is a physical function (one with TotalVFs > 0).
        """
        cfg = bytes(config_reader())
        if len(cfg) < 64:
            raise SysfsViewError(f"sysfs device {bdf!r}: the config reader returned {len(cfg)} bytes, "
                                 "less than the 64-byte header")

        def le(offset: int, size: int) -> int:
            return int.from_bytes(cfg[offset:offset + size], "little")

        if irq is None:
            irq = cfg[0x3C] if cfg[0x3D] else 0
        sriov = ext_capability(cfg, PCI_EXT_CAP_ID_SRIOV)
        if sriov is not None and not le(sriov + PCI_SRIOV_TOTAL_VF, 2):
            sriov = None  # sriov_init: a capability without VFs makes no physical function
        return cls(bdf=bdf, group_id=group_id, vendor=le(0x00, 2), device=le(0x02, 2),
                   subsystem_vendor=le(0x2C, 2), subsystem_device=le(0x2E, 2),
                   class_code=le(0x09, 3), revision=cfg[0x08], irq=irq,
                   config_reader=config_reader, resources=tuple(resources),
                   config_size=config_size or (4096 if len(cfg) > 256 else 256),
                   is_enabled=is_enabled, sriov=sriov, iommu=iommu)


@dataclass(frozen=True)
class SysfsGroup:
    """What ``/sys/kernel/iommu_groups/N`` says besides its devices."""

    id: int
    type: str = "DMA-FQ"
    reserved_regions: Sequence[Tuple[int, int, str]] = (MSI_WINDOW,)
    #: iommu_group_set_name's name, shown in a ``name`` file (None: the group has no such file)
    name: Optional[str] = None

    def __post_init__(self) -> None:
        if self.type not in GROUP_TYPES:
            raise SysfsViewError(f"IOMMU group {self.id}: type {self.type!r} is not one of {', '.join(GROUP_TYPES)}")
        for start, end, kind in self.reserved_regions:
            if kind not in RESERVED_REGION_TYPES or not 0 <= start <= end < 1 << 64:
                raise SysfsViewError(f"IOMMU group {self.id}: reserved region {(start, end, kind)!r} is not "
                                     f"(start, end, one of {', '.join(RESERVED_REGION_TYPES)})")


# -- attribute contents: one function per file, in the kernel's formats ------

def _modalias(d: SysfsDevice) -> str:
    return (f"pci:v{d.vendor:08X}d{d.device:08X}sv{d.subsystem_vendor:08X}sd{d.subsystem_device:08X}"
            f"bc{d.class_code >> 16 & 0xFF:02X}sc{d.class_code >> 8 & 0xFF:02X}i{d.class_code & 0xFF:02X}")


def _power_state(d: SysfsDevice) -> str:
    """``power_state``: pci_power_name(current_state), which follows the PM control register.

    A function without a PM capability stays in the D0 vfio-pci's probe set
    (``pci_target_state`` gives D0 when it runtime-suspends).
    """
    cfg = bytes(d.config_reader())
    pm = capability(cfg, PCI_CAP_ID_PM)
    if pm is None or pm + PCI_PM_CTRL >= len(cfg):
        return "D0\n"
    return PCI_POWER_NAMES[cfg[pm + PCI_PM_CTRL] & 3] + "\n"


def _resource(d: SysfsDevice) -> str:
    lines = list(d.resources) + [(0, 0, 0)] * (RESOURCE_LINES - len(d.resources))
    return "".join(f"0x{start:016x} 0x{end:016x} 0x{flags:016x}\n" for start, end, flags in lines)


def _uevent(d: SysfsDevice) -> str:
    return (f"DRIVER={DRIVER}\n"
            f"PCI_CLASS={d.class_code:X}\n"
            f"PCI_ID={d.vendor:04X}:{d.device:04X}\n"
            f"PCI_SUBSYS_ID={d.subsystem_vendor:04X}:{d.subsystem_device:04X}\n"
            f"PCI_SLOT_NAME={d.bdf}\n"
            f"MODALIAS={_modalias(d)}\n")


def _sriov_word(d: SysfsDevice, register: int) -> int:
    """A 16-bit register of the device's SR-IOV capability, read now."""
    at = (d.sriov or 0) + register
    return int.from_bytes(bytes(d.config_reader())[at:at + 2], "little")


def _sriov_numvfs(d: SysfsDevice) -> str:
    """``num_VFs``: the VFs enabled now, 0 while VF Enable is clear."""
    enabled = _sriov_word(d, PCI_SRIOV_CTRL) & PCI_SRIOV_CTRL_VFE
    return f"{_sriov_word(d, PCI_SRIOV_NUM_VF) if enabled else 0}\n"


def _sriov_register(register: int, fmt: str) -> Callable[[SysfsDevice], str]:
    return lambda d: f"{_sriov_word(d, register):{fmt}}\n"


def _enable(d: SysfsDevice) -> str:
    return "1\n" if d.is_enabled is not None and d.is_enabled() else "0\n"


def _parse_cpulist(text: str) -> List[int]:
    cpus: List[int] = []
    for part in filter(None, text.strip().split(",")):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def _cpumask(cpus: Iterable[int], nbits: int) -> str:
    """``%*pb``: 32-bit hex chunks, most significant first, the first one as wide as its bits need."""
    value = sum(1 << cpu for cpu in set(cpus))
    chunks = []
    bits = nbits % 32 or 32
    for shift in range(-(-nbits // 32) * 32 - 32, -1, -32):
        chunks.append(f"{value >> shift & ((1 << bits) - 1):0{-(-bits // 4)}x}")
        bits = 32
    return ",".join(chunks)


@functools.lru_cache(maxsize=None)
def _host_cpus() -> Tuple[str, str]:
    """(local_cpus, local_cpulist) of a device with no NUMA node: the online CPUs."""
    try:
        with open("/sys/devices/system/cpu/online") as f:
            online = f.read().strip()
        with open("/sys/devices/system/cpu/possible") as f:
            nbits = max(_parse_cpulist(f.read())) + 1
    except (OSError, ValueError):
        count = os.cpu_count() or 1
        online, nbits = (f"0-{count - 1}" if count > 1 else "0"), count
    return _cpumask(_parse_cpulist(online), nbits), online


#: The device directory's text attributes, in ``ls`` order: name, mode, content.
DEVICE_ATTRIBUTES: Tuple[Tuple[str, int, Callable[[SysfsDevice], str]], ...] = (
    ("class", 0o444, lambda d: f"0x{d.class_code:06x}\n"),
    ("device", 0o444, lambda d: f"0x{d.device:04x}\n"),
    ("driver_override", 0o644, lambda d: f"{DRIVER}\n"),  # emulated devices bind to nothing else
    ("enable", 0o644, _enable),
    ("irq", 0o444, lambda d: f"{d.irq}\n"),
    ("local_cpulist", 0o444, lambda d: _host_cpus()[1] + "\n"),
    ("local_cpus", 0o444, lambda d: _host_cpus()[0] + "\n"),
    ("modalias", 0o444, lambda d: _modalias(d) + "\n"),
    ("numa_node", 0o644, lambda d: "-1\n"),
    ("power_state", 0o444, _power_state),
    ("resource", 0o444, _resource),
    ("revision", 0o444, lambda d: f"0x{d.revision:02x}\n"),
    ("subsystem_device", 0o444, lambda d: f"0x{d.subsystem_device:04x}\n"),
    ("subsystem_vendor", 0o444, lambda d: f"0x{d.subsystem_vendor:04x}\n"),
    ("uevent", 0o644, _uevent),
    ("vendor", 0o444, lambda d: f"0x{d.vendor:04x}\n"),
)

#: A physical function's SR-IOV attributes (``sriov_pf_dev_attrs``); the kernel reads
#: offset, stride and VF device ID from the capability, and vfio-pci sets no VF MSI-X budget.
SRIOV_ATTRIBUTES: Tuple[Tuple[str, int, Callable[[SysfsDevice], str]], ...] = (
    ("sriov_drivers_autoprobe", 0o644, lambda d: "1\n"),
    ("sriov_numvfs", 0o644, _sriov_numvfs),
    ("sriov_offset", 0o444, _sriov_register(PCI_SRIOV_VF_OFFSET, "d")),
    ("sriov_stride", 0o444, _sriov_register(PCI_SRIOV_VF_STRIDE, "d")),
    ("sriov_totalvfs", 0o444, _sriov_register(PCI_SRIOV_TOTAL_VF, "d")),
    ("sriov_vf_device", 0o444, _sriov_register(PCI_SRIOV_VF_DID, "x")),
    ("sriov_vf_total_msix", 0o444, lambda d: "0\n"),
)

#: The driver directory's write-only files (accepted and ignored, see the module doc).
DRIVER_CONTROLS = ("bind", "new_id", "remove_id", "uevent", "unbind")


def reserved_regions(group: SysfsGroup) -> str:
    return "".join(f"0x{start:016x} 0x{end:016x} {kind}\n" for start, end, kind in group.reserved_regions)
