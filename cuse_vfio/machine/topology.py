"""Topology files: which emulated devices exist, in which IOMMU groups, with which node owners.

    # one QEMU edu device where q35 with an intel-iommu puts it
    kernel_abi = "6.1" # optional: the Linux release the VFIO nodes behave as (6.1, 6.12)

    [[device]]
    bdf = "0000:00:02.0"
    model = "edu"
    group = 2

    [group.2]          # optional: the node /dev/vfio/2
    owner = "root"     # user name or uid
    group = "root"     # group name or gid
    mode = "0600"

    [module.vfio_iommu_type1]   # module parameters, as on the kernel command line (see params.py)
    dma_entry_limit = 262144

    [iommu]                     # QEMU's intel-iommu: aw-bits, intremap, and extra reserved regions
    aw_bits = 48
    intremap = true
    reserved = [["0xd0000000", "0xd00fffff"]]

Devices on a bus other than 00 sit behind a PCI Express root port, which the
file names; that bus, unlike the root bus, can be reset (VFIO_DEVICE_PCI_HOT_RESET)::

    [[root_port]]              # QEMU: -device pcie-root-port,addr=04.0 (firmware gives it bus 1)
    bdf = "0000:00:04.0"
    secondary = 1

    [[device]]                 # a link leads to one device: 0000:01:00.0 to 0000:01:00.7
    bdf = "0000:01:00.0"
    model = "edu"
    group = 6

A function other than 0 needs function 0 of its device (the kernel's scan
stops at a missing function 0), which then says it is multi-function in its
header type, as QEMU's ``multifunction=on`` does.

A device with ``iommu = false`` sits behind no IOMMU: it gets a noiommu
group (``/dev/vfio/noiommu-N``), which needs ``[module.vfio]
enable_unsafe_noiommu_mode = true`` (or ``--noiommu``).

A bad file is reported as one sentence naming the file and line, never a traceback.
"""

from __future__ import annotations

import grp
import pwd
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NoReturn, Optional, Tuple

from ..dispatch import GroupNode
from ..errors import VfioError
from ..iommu import iova_ranges
from ..uapi.abi import KERNEL_ABIS
from . import params as _params

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

BDF = re.compile(r"^([0-9a-f]{4}):([0-9a-f]{2}):([0-1][0-9a-f])\.([0-7])$")

DEFAULT_TOPOLOGY = """\
# The built-in default: one QEMU edu device at 0000:00:02.0 in IOMMU group 2,
# where QEMU puts it on q35 with an intel-iommu, so real and emulated runs compare.
[[device]]
bdf = "0000:00:02.0"
model = "edu"
group = 2
"""


class TopologyError(ValueError):
    """A topology file is wrong; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class DeviceSpec:
    bdf: str
    model: str
    group: int
    options: Dict[str, object] = field(default_factory=dict)
    #: False: no IOMMU in front of it, a noiommu group
    iommu: bool = True


@dataclass(frozen=True)
class RootPortSpec:
    """A PCI Express root port on bus 00 and the bus number of its link (``secondary``)."""

    bdf: str
    secondary: int


def bus_of(bdf: str) -> int:
    return int(bdf[5:7], 16)


def devfn_of(bdf: str) -> int:
    return int(bdf[8:10], 16) << 3 | int(bdf[11], 16)


#: QEMU's intel-iommu address widths (aw-bits), and the window every x86 IOMMU reserves for MSIs
AW_BITS = (39, 48)
MSI_WINDOW = (0xFEE00000, 0xFEEFFFFF)


@dataclass(frozen=True)
class IommuSpec:
    """The ``[iommu]`` table: the emulated VT-d unit's geometry."""

    aw_bits: int = 39
    intremap: bool = True
    #: reserved IOVA ranges besides the MSI window, inclusive
    reserved: Tuple[Tuple[int, int], ...] = ()

    @property
    def aperture(self) -> Tuple[int, int]:
        """``__DOMAIN_MAX_ADDR(aw)``: the domain's inclusive IOVA bounds."""
        return (0, (1 << self.aw_bits) - 1)

    @property
    def reserved_regions(self) -> Tuple[Tuple[int, int], ...]:
        return (MSI_WINDOW,) + self.reserved


@dataclass(frozen=True)
class Topology:
    devices: List[DeviceSpec]
    groups: Dict[int, GroupNode]
    source: str = "<default>"
    #: module -> parameter -> value, only what the file sets
    modules: Dict[str, Dict[str, object]] = field(default_factory=dict)
    iommu: IommuSpec = IommuSpec()
    #: the kernel release the file asks for (None: the command line's, else 6.1)
    kernel_abi: Optional[str] = None
    #: the root ports whose secondary buses hold the devices not on bus 00
    root_ports: List[RootPortSpec] = field(default_factory=list)

    def root_port_of(self, bus: int) -> Optional[RootPortSpec]:
        return next((rp for rp in self.root_ports if rp.secondary == bus), None)


def load(path: Optional[str] = None, known_models=None) -> Topology:
    """Read ``path`` (the built-in default when None) and check it."""
    if path is None:
        return parse(DEFAULT_TOPOLOGY, "<default topology>", known_models)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise TopologyError(f"{path}: cannot read the topology file: {e.strerror}") from None
    return parse(text, path, known_models)


def parse(text: str, source: str, known_models=None) -> Topology:
    lines = text.splitlines()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TopologyError(f"{source}: not valid TOML: {e}") from None

    def fail(msg: str, table: str, index: int = 0, key: Optional[str] = None) -> NoReturn:
        line = _line_of(lines, table, index, key)
        where = f"{source}, line {line}" if line else source
        raise TopologyError(f"{where}: {msg}")

    unknown = set(doc) - {"device", "root_port", "group", "module", "iommu", "kernel_abi"}
    if unknown:
        key = sorted(unknown)[0]
        fail(f"unknown section {key!r}: a topology has kernel_abi, [[device]] and [[root_port]] entries and "
             "[group.N], [module.NAME] and [iommu] tables", key)
    kernel_abi = doc.get("kernel_abi")
    if kernel_abi is not None and kernel_abi not in KERNEL_ABIS:
        line = next((n + 1 for n, t in enumerate(lines) if re.match(r"\s*kernel_abi\s*=", t)), 0)
        raise TopologyError(f"{source}{f', line {line}' if line else ''}: kernel_abi {kernel_abi!r} is not "
                            f"a kernel cuse-vfio can be: write one of " + ", ".join(f'"{v}"' for v in KERNEL_ABIS))
    raw_devices = doc.get("device", [])
    if not isinstance(raw_devices, list) or not raw_devices:
        fail("no [[device]] entry: a topology needs at least one device", "device")

    devices: List[DeviceSpec] = []
    seen: Dict[str, int] = {}
    for i, entry in enumerate(raw_devices):
        for key in ("bdf", "model", "group"):
            if key not in entry:
                fail(f"device #{i + 1} has no {key!r}", "device", i)
        bdf = _bdf(entry["bdf"], "0000:00:02.0", lambda msg: fail(msg, "device", i, "bdf"))
        if bdf in seen:
            fail(f"bdf {bdf} appears twice (device #{seen[bdf] + 1} and #{i + 1})", "device", i, "bdf")
        seen[bdf] = i
        model = entry["model"]
        if not isinstance(model, str) or (known_models is not None and model not in known_models):
            choices = ", ".join(sorted(known_models)) if known_models else "a registered model"
            fail(f"unknown device model {model!r}: choose one of {choices}", "device", i, "model")
        group = entry["group"]
        if not isinstance(group, int) or isinstance(group, bool) or not 0 <= group < 1 << 20:
            fail(f"group {group!r} is not an IOMMU group number (0 .. 1048575)", "device", i, "group")
        iommu = entry.get("iommu", True)
        if not isinstance(iommu, bool):
            fail(f"iommu {iommu!r} is true (behind the IOMMU) or false (a noiommu device)", "device", i, "iommu")
        options = {k: v for k, v in entry.items() if k not in ("bdf", "model", "group", "iommu")}
        devices.append(DeviceSpec(bdf, model, group, options, iommu))
    root_ports = _root_ports(doc.get("root_port", []), seen, fail)
    _check_buses(devices, root_ports, fail)
    for i, d in enumerate(devices):
        # vfio_noiommu_group_alloc makes one group per device without an IOMMU
        others = [o for o in devices if o.group == d.group and o is not d]
        if not d.iommu and others:
            fail(f"device {d.bdf} has no IOMMU, so it is alone in its noiommu group; {others[0].bdf} is "
                 f"also in group {d.group}", "device", i, "group")

    groups: Dict[int, GroupNode] = {}
    used = {d.group for d in devices}
    noiommu = {d.group for d in devices if not d.iommu}
    raw_groups = doc.get("group", {})
    if not isinstance(raw_groups, dict):
        fail("group must be tables like [group.2]", "group")
    for name, entry in raw_groups.items():
        table = f"group.{name}"
        if not name.isdigit() or int(name) not in used:
            fail(f"[{table}] names no group of any device", table)
        extra = set(entry) - {"owner", "group", "mode"}
        if extra:
            fail(f"[{table}] has unknown key {sorted(extra)[0]!r} (owner, group, mode)", table)
        uid = _id(entry.get("owner", 0), pwd.getpwnam, "pw_uid", "user", lambda m: fail(m, table, 0, "owner"))
        gid = _id(entry.get("group", 0), grp.getgrnam, "gr_gid", "group", lambda m: fail(m, table, 0, "group"))
        mode = entry.get("mode", "0600")
        if not isinstance(mode, str) or not re.fullmatch(r"0?[0-7]{3}", mode):
            fail(f"mode {mode!r} is not an octal string like \"0660\"", table, 0, "mode")
        groups[int(name)] = GroupNode(int(name), uid, gid, int(mode, 8), int(name) in noiommu)
    for gid_ in sorted(used):
        groups.setdefault(gid_, GroupNode(gid_, noiommu=gid_ in noiommu))
    modules = _modules(doc.get("module", {}), fail)
    return Topology(devices, groups, source, modules, _iommu(doc.get("iommu", {}), fail), kernel_abi, root_ports)


def _root_ports(raw, devices: Dict[str, int], fail) -> List[RootPortSpec]:
    """The ``[[root_port]]`` entries: each on bus 00, at a free address, with a bus of its own."""
    if not isinstance(raw, list):
        fail("root_port entries are [[root_port]] tables", "root_port")
    ports: List[RootPortSpec] = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            fail(f"root port #{i + 1} must be a table", "root_port", i)
        extra = set(entry) - {"bdf", "secondary"}
        if extra:
            fail(f"root port #{i + 1} has unknown key {sorted(extra)[0]!r} (bdf, secondary)", "root_port", i,
                 sorted(extra)[0])
        for key in ("bdf", "secondary"):
            if key not in entry:
                fail(f"root port #{i + 1} has no {key!r}", "root_port", i)
        bdf = _bdf(entry["bdf"], "0000:00:04.0", lambda msg: fail(msg, "root_port", i, "bdf"))
        if bus_of(bdf) != 0:
            fail(f"root port {bdf} is not on bus 00: root ports sit on the root bus (a root port "
                 "behind a bridge is not modelled)", "root_port", i, "bdf")
        if bdf in devices or any(rp.bdf == bdf for rp in ports):
            fail(f"bdf {bdf} of root port #{i + 1} is already taken by another device or root port",
                 "root_port", i, "bdf")
        secondary = entry["secondary"]
        if not isinstance(secondary, int) or isinstance(secondary, bool) or not 1 <= secondary <= 255:
            fail(f"secondary {secondary!r} is not a bus number behind the root bus (1 .. 255)",
                 "root_port", i, "secondary")
        other = next((rp for rp in ports if rp.secondary == secondary), None)
        if other is not None:
            fail(f"bus {secondary:02x} is already the secondary bus of root port {other.bdf}",
                 "root_port", i, "secondary")
        ports.append(RootPortSpec(bdf, secondary))
    return ports


def _check_buses(devices: List[DeviceSpec], root_ports: List[RootPortSpec], fail) -> None:
    """Each device on a bus that exists, one device per link, function 0 present where others are."""
    secondaries = {rp.secondary: rp for rp in root_ports}
    present = {d.bdf for d in devices}
    for i, d in enumerate(devices):
        bus, devfn = bus_of(d.bdf), devfn_of(d.bdf)
        if bus and bus not in secondaries:
            fail(f"device {d.bdf} is on bus {bus:02x}, which no [[root_port]] leads to: add one with "
                 f"secondary = {bus} (or put the device on bus 00)", "device", i, "bdf")
        if bus and d.bdf[:4] != secondaries[bus].bdf[:4]:
            fail(f"device {d.bdf} is in PCI segment {d.bdf[:4]}, but the root port of bus {bus:02x} "
                 f"({secondaries[bus].bdf}) is in segment {secondaries[bus].bdf[:4]}", "device", i, "bdf")
        if bus and devfn >> 3:
            fail(f"device {d.bdf} is behind root port {secondaries[bus].bdf}, whose link leads to one "
                 f"device: its functions are {d.bdf[:8]}00.0 to {d.bdf[:8]}00.7", "device", i, "bdf")
        if devfn & 7 and d.bdf[:-1] + "0" not in present:
            fail(f"device {d.bdf} is function {devfn & 7} of a device without function 0 "
                 f"({d.bdf[:-1]}0): the kernel's scan does not look further", "device", i, "bdf")


def _modules(raw, fail) -> Dict[str, Dict[str, object]]:
    if not isinstance(raw, dict):
        fail("module must be tables like [module.vfio_iommu_type1]", "module")
    modules: Dict[str, Dict[str, object]] = {}
    for name, entry in raw.items():
        table = f"module.{name}"
        if not isinstance(entry, dict):
            fail(f"[{table}] must be a table of parameters", table)
        for key, value in entry.items():
            try:
                _params.check(_params.module_name(name), key, value)
            except ValueError as e:
                fail(str(e), table, 0, key)
            modules.setdefault(_params.module_name(name), {})[key] = value
    return modules


def _iommu(raw, fail) -> IommuSpec:
    if not isinstance(raw, dict):
        fail("iommu must be a table: [iommu]", "iommu")
    extra = set(raw) - {"aw_bits", "intremap", "reserved"}
    if extra:
        fail(f"[iommu] has unknown key {sorted(extra)[0]!r} (aw_bits, intremap, reserved)", "iommu")
    aw_bits = raw.get("aw_bits", 39)
    if aw_bits not in AW_BITS or isinstance(aw_bits, bool):
        fail(f"aw_bits {aw_bits!r}: QEMU's intel-iommu offers {' or '.join(map(str, AW_BITS))}", "iommu", 0, "aw_bits")
    intremap = raw.get("intremap", True)
    if not isinstance(intremap, bool):
        fail(f"intremap {intremap!r} is true or false", "iommu", 0, "intremap")
    reserved = []
    regions = raw.get("reserved", [])
    if not isinstance(regions, list):
        fail("reserved is a list of [start, end] pairs", "iommu", 0, "reserved")
    for region in regions:
        try:
            start, end = (int(v, 0) if isinstance(v, str) else v for v in region)
            if isinstance(start, bool) or isinstance(end, bool) or not 0 <= start <= end < 1 << aw_bits:
                raise ValueError
        except (TypeError, ValueError):
            fail(f"reserved region {region!r} is not [start, end] inside the {aw_bits}-bit aperture",
                 "iommu", 0, "reserved")
        reserved.append((start, end))
    spec = IommuSpec(aw_bits, intremap, tuple(reserved))
    try:
        iova_ranges(spec.aperture, spec.reserved_regions)  # the exclusion the type1 driver does
    except VfioError:
        fail("the reserved regions cover the whole aperture: no IOVA would be left", "iommu", 0, "reserved")
    return spec


def _bdf(value, example: str, fail: Callable[[str], NoReturn]) -> str:
    """A topology's PCI address, lower case; ``fail`` says why it is none."""
    if not isinstance(value, str) or not BDF.match(value.lower()):
        fail(f"bdf {value!r} is not a PCI address like \"{example}\"")
    return value.lower()


def _id(value, lookup, attr: str, what: str, fail: Callable[[str], NoReturn]) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        try:
            return getattr(lookup(value), attr)
        except KeyError:
            fail(f"no {what} named {value!r} on this machine")
    fail(f"{what} {value!r} is neither a name nor a number")


def _line_of(lines: List[str], table: str, index: int, key: Optional[str]) -> int:
    """1-based line of ``key`` in the ``index``-th ``[[table]]`` / ``[table]`` (0 if not found)."""
    header = re.compile(r"^\s*\[\[?\s*" + re.escape(table) + r"\s*\]\]?\s*(#.*)?$")
    starts = [n for n, text in enumerate(lines) if header.match(text)]
    if index >= len(starts):
        return starts[0] + 1 if starts else 0
    start = starts[index]
    if key is None:
        return start + 1
    key_re = re.compile(r"^\s*" + re.escape(key) + r"\s*=")
    for n in range(start + 1, len(lines)):
        if lines[n].lstrip().startswith("["):
            break
        if key_re.match(lines[n]):
            return n + 1
    return start + 1
