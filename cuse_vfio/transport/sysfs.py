"""The sysfs view: the emulated PCI topology where VFIO clients look for it.

Clients find their group through sysfs before they open anything: QEMU
readlinks ``<sysfsdev>/iommu_group`` and takes the basename; DPDK scans
``/sys/bus/pci/devices``, parses ``vendor``/``device``/``class``/``resource``
and compares ``basename(readlink(driver))`` with ``"vfio-pci"``; rust-vmm and
SPDK do the same.  This module serves, read-only and with the fusepy API
(mfusepy over libfuse3), a tree laid out like ``/sys`` so that ``cuse-vfio run``
can bind three of its directories over the real ones in a private mount
namespace (see :meth:`SysfsView.paths`)::

    <root>/bus/pci/devices/<bdf>/            vendor device subsystem_vendor ...
                                             config resource uevent modalias ...
                                             iommu_group -> ../../../../kernel/iommu_groups/N
                                             driver      -> ../../../../bus/pci/drivers/vfio-pci
                                             subsystem   -> ../../../../bus/pci
    <root>/kernel/iommu_groups/N/            type reserved_regions
    <root>/kernel/iommu_groups/N/devices/<bdf> -> ../../../../bus/pci/devices/<bdf>
    <root>/bus/pci/drivers/vfio-pci/         bind unbind new_id remove_id uevent
    <root>/bus/pci/drivers/vfio-pci/<bdf>    -> ../../../../bus/pci/devices/<bdf>

Links are relative and every device directory sits four levels below the
root, as ``/sys/devices/pci0000:00/<bdf>`` does on a real system (the kernel's
links are ``../../../kernel/iommu_groups/N`` from three levels down, and
``../../../../devices/pci0000:00/<bdf>`` from the group and driver
directories), so a link resolves the same way inside the view and, after
the binds, under ``/sys``.

Formats (checked against ``drivers/pci/pci-sysfs.c``, ``pci-driver.c``'s
uevent, ``drivers/iommu/iommu.c`` and a real 6.18 ``/sys`` on the dev machine):

- ``vendor`` ``device`` ``subsystem_*`` ``"0x%04x\\n"``; ``class``
  ``"0x%06x\\n"``; ``revision`` ``"0x%02x\\n"``; ``irq`` ``"%u\\n"``;
  ``numa_node`` ``"-1\\n"``; ``modalias``
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
- IOMMU groups: ``type`` is ``"DMA-FQ\\n"`` by default: x86 kernels default to
  ``CONFIG_IOMMU_DEFAULT_DMA_LAZY`` and QEMU's intel-iommu has no caching
  mode to force strict (read from the sources, not yet compared with the
  6.1 VM); ``reserved_regions`` ``"0x%016x 0x%016x msi\\n"`` for the x86
  MSI window.  Both are per-group settings (:class:`SysfsGroup`).

``lspci -O sysfs.path=<root>/bus/pci -vk`` reads the view as it reads /sys.

Attributes report ``st_size`` 4096 as sysfs does and ``read`` returns the real
content, then EOF.  The mount uses ``direct_io`` so the kernel neither caches
the (live) content nor trusts ``st_size``: ``cat``, stdio and ``read()`` loops
see exactly the text.

Writes.  The view does not change the emulated device, so it refuses them,
with the errno the kernel gives where it can: opening for writing a file
whose mode has no write bit is EACCES (kernfs refuses it even for root), and
every other change (``config``, ``numa_node``, ``enable``, chmod, mkdir, ...)
is EROFS; config writes go through the VFIO device fd's config region.  The
one exception is the driver's control files ``bind``, ``unbind``, ``new_id``,
``remove_id`` and ``uevent``: setup scripts written for real hardware run
``echo 1234 11e8 > new_id`` unconditionally, and an emulated device is
already bound to vfio-pci and can be bound to nothing else, so those writes
are accepted, logged and ignored.

The FUSE loop runs single-threaded in a daemon thread; ``config_reader``
callbacks are therefore called one at a time, from that thread.  A callback
that raises gives the reader EIO and a log line; the view keeps serving.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import logging
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

DRIVER = "vfio-pci"

#: Each real sysfs directory the view replaces, and where it is under the view's root.
BIND_DIRS = (
    ("/sys/bus/pci/devices", "bus/pci/devices"),
    ("/sys/kernel/iommu_groups", "kernel/iommu_groups"),
    ("/sys/bus/pci/drivers/" + DRIVER, "bus/pci/drivers/" + DRIVER),
)

# Relative link targets, from a device directory (four levels below the root)
# and from the group's and the driver's directories (four levels too).
_TO_ROOT = "../../../.."

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


class SysfsViewError(Exception):
    """The sysfs view cannot be built or mounted; the message says what and how to fix it."""


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
    enables a device while a device fd is open), otherwise it reads 0.
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

    @classmethod
    def from_config_space(cls, bdf: str, group_id: int, config_reader: Callable[[], bytes], *,
                          irq: Optional[int] = None, resources: Sequence[Resource] = (),
                          config_size: Optional[int] = None,
                          is_enabled: Optional[Callable[[], bool]] = None) -> "SysfsDevice":
        """Take the IDs from the model's config header (read once, now).

        ``irq`` defaults to the Interrupt Line register when the device has an
        interrupt pin, 0 otherwise; ``config_size`` to 4096 when the reader
        returns extended config space.
        """
        cfg = bytes(config_reader())
        if len(cfg) < 64:
            raise SysfsViewError(f"sysfs device {bdf!r}: the config reader returned {len(cfg)} bytes, "
                                 "less than the 64-byte header")

        def le(offset: int, size: int) -> int:
            return int.from_bytes(cfg[offset:offset + size], "little")

        if irq is None:
            irq = cfg[0x3C] if cfg[0x3D] else 0
        return cls(bdf=bdf, group_id=group_id, vendor=le(0x00, 2), device=le(0x02, 2),
                   subsystem_vendor=le(0x2C, 2), subsystem_device=le(0x2E, 2),
                   class_code=le(0x09, 3), revision=cfg[0x08], irq=irq,
                   config_reader=config_reader, resources=tuple(resources),
                   config_size=config_size or (4096 if len(cfg) > 256 else 256),
                   is_enabled=is_enabled)


@dataclass(frozen=True)
class SysfsGroup:
    """What ``/sys/kernel/iommu_groups/N`` says besides its devices."""

    id: int
    type: str = "DMA-FQ"
    reserved_regions: Sequence[Tuple[int, int, str]] = (MSI_WINDOW,)

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
    ("resource", 0o444, _resource),
    ("revision", 0o444, lambda d: f"0x{d.revision:02x}\n"),
    ("subsystem_device", 0o444, lambda d: f"0x{d.subsystem_device:04x}\n"),
    ("subsystem_vendor", 0o444, lambda d: f"0x{d.subsystem_vendor:04x}\n"),
    ("uevent", 0o644, _uevent),
    ("vendor", 0o444, lambda d: f"0x{d.vendor:04x}\n"),
)

#: The driver directory's write-only files (accepted and ignored, see the module doc).
DRIVER_CONTROLS = ("bind", "new_id", "remove_id", "uevent", "unbind")


# -- the tree ----------------------------------------------------------------

@dataclass
class _Dir:
    children: Dict[str, object] = field(default_factory=dict)
    mode: int = 0o755


@dataclass
class _Text:
    render: Callable[[], str]
    mode: int
    what: str


@dataclass
class _Config:
    device: SysfsDevice
    mode: int = 0o644


@dataclass
class _Link:
    target: str
    mode: int = 0o777


@dataclass
class _Control:
    mode: int = 0o200


class SysfsView:
    """The tree for a set of devices; :meth:`mount` serves it, the rest reads it in-process."""

    def __init__(self, devices: Iterable[SysfsDevice], groups: Iterable[SysfsGroup] = ()):
        self.devices: Dict[str, SysfsDevice] = {}
        for dev in devices:
            if dev.bdf in self.devices:
                raise SysfsViewError(f"sysfs device {dev.bdf!r} is listed twice")
            self.devices[dev.bdf] = dev
        self.groups: Dict[int, SysfsGroup] = {g.id: g for g in groups}
        for dev in self.devices.values():
            self.groups.setdefault(dev.group_id, SysfsGroup(dev.group_id))
        self.created_ns = time.time_ns()
        self._root = _Dir()
        self._build()

    def _put(self, path: str, node: object) -> None:
        *parents, name = path.split("/")
        where = self._root
        for part in parents:
            where = where.children.setdefault(part, _Dir())
        where.children[name] = node

    def _build(self) -> None:
        drv = "bus/pci/drivers/" + DRIVER
        self._put("kernel/iommu_groups", _Dir())
        for gid in sorted(self.groups):  # listed in numeric order, devices or not
            self._put(f"kernel/iommu_groups/{gid}/devices", _Dir())
        self._put(drv, _Dir())
        for bdf in sorted(self.devices):
            dev = self.devices[bdf]
            here = f"bus/pci/devices/{bdf}"
            for name, mode, render in DEVICE_ATTRIBUTES:
                self._put(f"{here}/{name}", _Text(functools.partial(render, dev), mode, f"{bdf} {name}"))
            self._put(f"{here}/config", _Config(dev))
            self._put(f"{here}/driver", _Link(f"{_TO_ROOT}/{drv}"))
            self._put(f"{here}/iommu_group", _Link(f"{_TO_ROOT}/kernel/iommu_groups/{dev.group_id}"))
            self._put(f"{here}/subsystem", _Link(f"{_TO_ROOT}/bus/pci"))
            self._put(f"kernel/iommu_groups/{dev.group_id}/devices/{bdf}", _Link(f"{_TO_ROOT}/{here}"))
            self._put(f"{drv}/{bdf}", _Link(f"{_TO_ROOT}/{here}"))
        for gid in sorted(self.groups):
            group = self.groups[gid]
            here = f"kernel/iommu_groups/{gid}"
            self._put(f"{here}/reserved_regions", _Text(functools.partial(_reserved_regions, group),
                                                        0o444, f"group {gid} reserved_regions"))
            self._put(f"{here}/type", _Text(lambda g=group: g.type + "\n", 0o644, f"group {gid} type"))
        for name in DRIVER_CONTROLS:
            self._put(f"{drv}/{name}", _Control())

    def _lookup(self, path: str) -> Optional[object]:
        node: object = self._root
        for part in path.split("/"):
            if not part:
                continue
            if not isinstance(node, _Dir) or part not in node.children:
                return None
            node = node.children[part]
        return node

    @staticmethod
    def paths(root: str = "") -> Dict[str, str]:
        """Each real sysfs directory the view replaces -> its place under ``root``.

        ``cuse-vfio run`` binds each value over its key.  If the host has no
        ``/sys/bus/pci/drivers/vfio-pci`` (vfio-pci not loaded) there is
        nothing to bind it over: bind ``<root>/bus/pci/drivers`` over
        ``/sys/bus/pci/drivers`` instead (the view has only vfio-pci there).
        """
        return {real: os.path.join(root, rel) for real, rel in BIND_DIRS}

    # -- in-process reads (what the mount serves) --------------------------
    def read(self, path: str) -> bytes:
        """The whole content of an attribute, as a privileged reader sees it."""
        node = self._lookup(path)
        if isinstance(node, _Config):
            return self.read_config(node.device)
        if isinstance(node, _Text):
            return node.render().encode()
        raise FileNotFoundError(errno.ENOENT, "no attribute in the sysfs view", path)

    def read_config(self, dev: SysfsDevice) -> bytes:
        data = bytes(dev.config_reader())[:dev.config_size]
        return data + bytes(dev.config_size - len(data))

    def listdir(self, path: str) -> List[str]:
        node = self._lookup(path)
        if not isinstance(node, _Dir):
            raise FileNotFoundError(errno.ENOENT, "no directory in the sysfs view", path)
        return list(node.children)

    def readlink(self, path: str) -> str:
        node = self._lookup(path)
        if not isinstance(node, _Link):
            raise FileNotFoundError(errno.ENOENT, "no link in the sysfs view", path)
        return node.target

    # -- serving -----------------------------------------------------------
    def mount(self, mountpoint: str, foreground: bool = False, timeout: float = 10.0) -> "SysfsMount":
        """Serve the view on ``mountpoint`` (an existing directory).

        In the background (default) this returns once the kernel has the
        mount and the loop answers; with ``foreground=True`` it serves in the
        calling thread and returns when the view is unmounted (Ctrl-C,
        SIGTERM or ``fusermount3 -u`` from elsewhere).
        """
        mnt = SysfsMount(self, os.path.abspath(mountpoint))
        if not os.path.isdir(mnt.mountpoint):
            raise SysfsViewError(f"{mnt.mountpoint}: the sysfs view's mount point is not a directory; "
                                 "create it first")
        if foreground:
            mnt._serve()
            mnt._unmounted = True
            if mnt._error is not None:
                raise SysfsViewError(f"cannot serve the sysfs view on {mnt.mountpoint}: {mnt._error}")
        else:
            mnt._start(timeout)
        return mnt


def _reserved_regions(group: SysfsGroup) -> str:
    return "".join(f"0x{start:016x} 0x{end:016x} {kind}\n" for start, end, kind in group.reserved_regions)


def _allow_other() -> bool:
    """allow_other lets other users' clients read the view; only root may always ask for it."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/etc/fuse.conf") as f:
            if any(line.strip() == "user_allow_other" for line in f):
                return True
    except OSError:
        pass
    log.warning("the sysfs view will be readable by this user only: run as root, or add "
                "user_allow_other to /etc/fuse.conf so other users' clients can read it")
    return False


def _caller_has_sys_admin() -> bool:
    from mfusepy import fuse_get_context

    uid, _gid, pid = fuse_get_context()
    # The request carries a thread id; /proc/<tid>/status answers for threads too.
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return uid == 0


def _operations_class():
    """The FUSE translation layer, built on first mount so importing this module needs no libfuse."""
    from mfusepy import FuseOSError, Operations

    class SysfsOperations(Operations):
        use_ns = True

        def __init__(self, view: SysfsView, ready: threading.Event):
            self.view = view
            self.ready = ready
            self._config_limits: Dict[int, int] = {}
            self._fhs = itertools.count(1)

        def init(self, path):
            self.ready.set()

        def _node(self, path: str):
            node = self.view._lookup(path)
            if node is None:
                raise FuseOSError(errno.ENOENT)
            return node

        def getattr(self, path, fh=None):
            node = self._node(path)
            t = self.view.created_ns
            st = {"st_uid": 0, "st_gid": 0, "st_atime": t, "st_mtime": t, "st_ctime": t,
                  "st_blksize": 4096, "st_nlink": 1}
            if isinstance(node, _Dir):
                subdirs = sum(isinstance(c, _Dir) for c in node.children.values())
                st.update(st_mode=0o040000 | node.mode, st_nlink=2 + subdirs, st_size=0)
            elif isinstance(node, _Link):
                st.update(st_mode=0o120000 | node.mode, st_size=len(node.target))
            elif isinstance(node, _Config):
                st.update(st_mode=0o100000 | node.mode, st_size=node.device.config_size)
            else:  # text attributes and control files: sysfs says a page
                st.update(st_mode=0o100000 | node.mode, st_size=4096)
            return st

        def readdir(self, path, fh):
            node = self._node(path)
            if not isinstance(node, _Dir):
                raise FuseOSError(errno.ENOTDIR)
            return [".", "..", *node.children]

        def readlink(self, path):
            node = self._node(path)
            if not isinstance(node, _Link):
                raise FuseOSError(errno.EINVAL)
            return node.target

        def open(self, path, flags):
            node = self._node(path)
            access = flags & os.O_ACCMODE
            reading = access in (os.O_RDONLY, os.O_RDWR)
            writing = access in (os.O_WRONLY, os.O_RDWR) or bool(flags & os.O_TRUNC)
            # kernfs refuses an access the mode does not name, even to root.
            if (reading and not node.mode & 0o444) or (writing and not node.mode & 0o222):
                raise FuseOSError(errno.EACCES)
            if writing and not isinstance(node, _Control):
                raise FuseOSError(errno.EROFS)
            fh = next(self._fhs)
            if isinstance(node, _Config):
                # pci_read_config decides by the opener's CAP_SYS_ADMIN, once, at open.
                full = _caller_has_sys_admin()
                self._config_limits[fh] = node.device.config_size if full else UNPRIVILEGED_CONFIG_BYTES
            return fh

        def release(self, path, fh):
            self._config_limits.pop(fh, None)
            return 0

        def read(self, path, size, offset, fh):
            node = self._node(path)
            if isinstance(node, _Config):
                dev = node.device
                end = min(self._config_limits.get(fh, dev.config_size), dev.config_size)
                if offset >= end:
                    return b""
                try:
                    data = self.view.read_config(dev)
                except Exception:
                    log.exception("sysfs view: reading the config space of %s failed; the reader gets EIO",
                                  dev.bdf)
                    raise FuseOSError(errno.EIO) from None
                return data[offset:min(offset + size, end)]
            if isinstance(node, _Text):
                try:
                    data = node.render().encode()
                except Exception:
                    log.exception("sysfs view: rendering %s failed; the reader gets EIO", node.what)
                    raise FuseOSError(errno.EIO) from None
                return data[offset:offset + size]
            raise FuseOSError(errno.EISDIR if isinstance(node, _Dir) else errno.EACCES)

        def write(self, path, data, offset, fh):
            node = self._node(path)
            if not isinstance(node, _Control):
                raise FuseOSError(errno.EROFS)
            log.info("sysfs view: ignoring %r written to %s: emulated devices stay bound to %s",
                     data.decode(errors="replace").strip(), path.lstrip("/"), DRIVER)
            return len(data)

        def truncate(self, path, length, fh=None):
            node = self._node(path)
            if isinstance(node, _Control):
                return 0
            raise FuseOSError(errno.EROFS if node.mode & 0o222 else errno.EACCES)

        def _read_only(self, *args, **kwargs):
            raise FuseOSError(errno.EROFS)

        chmod = chown = utimens = mkdir = mknod = unlink = rmdir = _read_only
        symlink = rename = link = setxattr = removexattr = _read_only

        def create(self, path, mode, fi=None):
            raise FuseOSError(errno.EROFS)

    return SysfsOperations


def _mounted(mountpoint: str) -> bool:
    """Is a FUSE file system mounted exactly on ``mountpoint`` (in this mount namespace)?"""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields, _, rest = line.partition(" - ")
                where = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields.split()[4])
                if where == mountpoint and rest.startswith("fuse"):
                    return True
    except OSError:
        pass
    return False


class SysfsMount:
    """A served view: :meth:`unmount` (or leaving the ``with`` block) takes it down."""

    def __init__(self, view: SysfsView, mountpoint: str):
        self.view = view
        self.mountpoint = mountpoint
        self._ready = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._connection: Optional[int] = None
        self._unmounted = False

    def paths(self) -> Dict[str, str]:
        return SysfsView.paths(self.mountpoint)

    @property
    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _serve(self) -> None:
        from mfusepy import FUSE

        try:
            FUSE(_operations_class()(self.view, self._ready), self.mountpoint,
                 foreground=True, nothreads=True, allow_other=_allow_other(), default_permissions=True,
                 direct_io=True, fsname="cuse-vfio", subtype="cuse-vfio-sysfs")
        except BaseException as e:  # reported by mount(); the thread must not die noisily
            self._error = e

    def _start(self, timeout: float) -> None:
        # libfuse takes over SIGTERM and SIGHUP for its loop when they are at
        # their default (so a SIGTERM would only unmount the view).  Give them
        # back once the loop runs (its init callback comes after the takeover).
        cwd = os.getcwd()
        main = threading.current_thread() is threading.main_thread()
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)} if main else {}
        self._thread = threading.Thread(target=self._serve, name=f"sysfs view {self.mountpoint}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.02):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                break
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)
        # libfuse's fuse_main moves the whole process to "/" (fuse_daemonize does,
        # even in the foreground): relative paths the caller uses later must keep
        # meaning what they meant.
        os.chdir(cwd)
        if not self._ready.is_set():
            if self._thread.is_alive():
                self.unmount()
                raise SysfsViewError(f"the sysfs view on {self.mountpoint} did not start within {timeout:g} s")
            self._unmounted = True
            raise SysfsViewError(f"cannot mount the sysfs view on {self.mountpoint}: {self._error or 'libfuse failed'}"
                                 " (is /dev/fuse there, and may this user mount?)")
        try:
            dev = os.stat(self.mountpoint).st_dev
            self._connection = os.major(dev) << 20 | os.minor(dev)  # the kernel's dev_t, fusectl's name
        except OSError:
            pass
        log.info("sysfs view of %d device(s) mounted on %s", len(self.view.devices), self.mountpoint)

    def unmount(self, timeout: float = 10.0) -> None:
        """Unmount (``fusermount3 -u``, then lazily) and wait for the loop to end. Idempotent."""
        if self._unmounted:
            return
        self._unmounted = True
        mp = self.mountpoint
        for how in (["fusermount3", "-u", mp], ["fusermount3", "-u", "-z", mp], "umount2"):
            if not _mounted(mp):
                break
            if how == "umount2":
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.umount2(os.fsencode(mp), 2) != 0:  # MNT_DETACH
                    log.warning("sysfs view: lazy unmount of %s failed: %s", mp, os.strerror(ctypes.get_errno()))
                continue
            try:
                done = subprocess.run(how, capture_output=True, text=True, timeout=timeout)
                if done.returncode:
                    log.debug("sysfs view: %s: %s", " ".join(how), done.stderr.strip())
            except (OSError, subprocess.TimeoutExpired) as e:
                log.debug("sysfs view: %s: %s", " ".join(how), e)
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive() and self._connection is not None:
            # Detached but still busy (a file in it is open): end the connection.
            try:
                with open(f"/sys/fs/fuse/connections/{self._connection}/abort", "w") as f:
                    f.write("1")
            except OSError:
                pass
            self._thread.join(2.0)
        if self._thread.is_alive():
            log.warning("sysfs view on %s is detached but still served: a file in it is still open", mp)

    def __enter__(self) -> "SysfsMount":
        return self

    def __exit__(self, *exc) -> None:
        self.unmount()
