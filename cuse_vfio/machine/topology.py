"""Topology files: which emulated devices exist, in which IOMMU groups, with which node owners.

    # one QEMU edu device where q35 with an intel-iommu puts it
    [[device]]
    bdf = "0000:00:02.0"
    model = "edu"
    group = 2

    [group.2]          # optional: the node /dev/vfio/2
    owner = "root"     # user name or uid
    group = "root"     # group name or gid
    mode = "0600"

A bad file is reported as one sentence naming the file and line, never a traceback.
"""

from __future__ import annotations

import grp
import pwd
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NoReturn, Optional

from ..dispatch import GroupNode

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


@dataclass(frozen=True)
class Topology:
    devices: List[DeviceSpec]
    groups: Dict[int, GroupNode]
    source: str = "<default>"


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

    unknown = set(doc) - {"device", "group"}
    if unknown:
        key = sorted(unknown)[0]
        fail(f"unknown section {key!r}: a topology has [[device]] entries and [group.N] tables", key)
    raw_devices = doc.get("device", [])
    if not isinstance(raw_devices, list) or not raw_devices:
        fail("no [[device]] entry: a topology needs at least one device", "device")

    devices: List[DeviceSpec] = []
    seen: Dict[str, int] = {}
    for i, entry in enumerate(raw_devices):
        for key in ("bdf", "model", "group"):
            if key not in entry:
                fail(f"device #{i + 1} has no {key!r}", "device", i)
        bdf = entry["bdf"]
        if not isinstance(bdf, str) or not BDF.match(bdf.lower()):
            fail(f"bdf {bdf!r} is not a PCI address like \"0000:00:02.0\"", "device", i, "bdf")
        bdf = bdf.lower()
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
        options = {k: v for k, v in entry.items() if k not in ("bdf", "model", "group")}
        devices.append(DeviceSpec(bdf, model, group, options))

    groups: Dict[int, GroupNode] = {}
    used = {d.group for d in devices}
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
        groups[int(name)] = GroupNode(int(name), uid, gid, int(mode, 8))
    for gid_ in sorted(used):
        groups.setdefault(gid_, GroupNode(gid_))
    return Topology(devices, groups, source)


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
