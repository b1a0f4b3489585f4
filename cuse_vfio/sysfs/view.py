"""The view's tree: devices, groups, the driver, modules and the IOMMU unit, and where each goes in /sys."""

from __future__ import annotations

import errno
import functools
import os
import time
from typing import Dict, Iterable, List, Optional

from ..mounts import MountPointError, refuse_mount_point
from .iommu import INTEL_IOMMU_ATTRIBUTES, SysfsIommu
from .modules import SysfsModule
from .mount import SysfsMount
from .pci import (
    DEVICE_ATTRIBUTES,
    DRIVER,
    DRIVER_CONTROLS,
    SRIOV_ATTRIBUTES,
    SysfsDevice,
    SysfsGroup,
    reserved_regions,
)
from .tree import Config, Control, Dir, Link, SysfsViewError, Text

#: Each real sysfs directory the view replaces for its PCI functions, and where it is under the view's root.
BIND_DIRS = (
    ("/sys/bus/pci/devices", "bus/pci/devices"),
    ("/sys/kernel/iommu_groups", "kernel/iommu_groups"),
    ("/sys/bus/pci/drivers/" + DRIVER, "bus/pci/drivers/" + DRIVER),
)
#: ... for an IOMMU unit (the view holds every unit of the machine, so it replaces the class too)
IOMMU_BIND_DIRS = (
    ("/sys/devices/virtual/iommu", "devices/virtual/iommu"),
    ("/sys/class/iommu", "class/iommu"),
)

# Relative link targets, from a device directory (four levels below the root)
# and from the group's and the driver's directories (four levels too).
_TO_ROOT = "../../../.."


class SysfsView:
    """The tree for a set of devices; :meth:`mount` serves it, the rest reads it in-process.

    ``modules`` (see :func:`~.modules.vfio_modules`) and ``iommu`` (the unit
    every device sits behind, see :func:`~.iommu.qemu_vtd`) are what the
    emulated kernel shows besides its devices; a view without them has only
    ``bus/`` and ``kernel/``.
    """

    def __init__(self, devices: Iterable[SysfsDevice], groups: Iterable[SysfsGroup] = (),
                 modules: Iterable[SysfsModule] = (), iommu: Optional[SysfsIommu] = None):
        self.devices: Dict[str, SysfsDevice] = {}
        for dev in devices:
            if dev.bdf in self.devices:
                raise SysfsViewError(f"sysfs device {dev.bdf!r} is listed twice")
            self.devices[dev.bdf] = dev
        self.groups: Dict[int, SysfsGroup] = {g.id: g for g in groups}
        for dev in self.devices.values():
            self.groups.setdefault(dev.group_id, SysfsGroup(dev.group_id))
        self.modules: Dict[str, SysfsModule] = {}
        for module in modules:
            if module.name in self.modules:
                raise SysfsViewError(f"module {module.name} is listed twice")
            self.modules[module.name] = module
        for module in self.modules.values():
            for holder in module.holders:
                if holder not in self.modules:
                    raise SysfsViewError(f"module {module.name} is held by {holder}, which is not listed")
        self.iommu = iommu
        self.created_ns = time.time_ns()
        self._root = Dir()
        self._build()

    def _put(self, path: str, node: object) -> None:
        *parents, name = path.split("/")
        where = self._root
        for part in parents:
            child = where.children.setdefault(part, Dir())
            if not isinstance(child, Dir):
                raise SysfsViewError(f"sysfs view: {path} would be under a file")
            where = child
        where.children[name] = node

    def _build(self) -> None:
        drv = "bus/pci/drivers/" + DRIVER
        self._put("kernel/iommu_groups", Dir())
        for gid in sorted(self.groups):  # listed in numeric order, devices or not
            self._put(f"kernel/iommu_groups/{gid}/devices", Dir())
        self._put(drv, Dir())
        for bdf in sorted(self.devices):
            self._build_device(self.devices[bdf], drv)
        for gid in sorted(self.groups):
            group = self.groups[gid]
            here = f"kernel/iommu_groups/{gid}"
            self._put(f"{here}/reserved_regions", Text(functools.partial(reserved_regions, group),
                                                       0o444, f"group {gid} reserved_regions"))
            self._put(f"{here}/type", Text(functools.partial(_group_type, group), 0o644, f"group {gid} type"))
            if group.name is not None:
                self._put(f"{here}/name", Text(functools.partial(_group_name, group), 0o444, f"group {gid} name"))
        for name in DRIVER_CONTROLS:
            self._put(f"{drv}/{name}", Control(f"emulated devices stay bound to {DRIVER}"))
        for module in self.modules.values():
            self._build_module(module)
        if self.iommu is not None:
            self._build_iommu(self.iommu)

    def _build_device(self, dev: SysfsDevice, drv: str) -> None:
        bdf = dev.bdf
        here = f"bus/pci/devices/{bdf}"
        attributes = DEVICE_ATTRIBUTES + (SRIOV_ATTRIBUTES if dev.sriov is not None else ())
        for name, mode, render in sorted(attributes):
            self._put(f"{here}/{name}", Text(functools.partial(render, dev), mode, f"{bdf} {name}"))
        self._put(f"{here}/config", Config(dev))
        self._put(f"{here}/driver", Link(f"{_TO_ROOT}/{drv}"))
        self._put(f"{here}/iommu_group", Link(f"{_TO_ROOT}/kernel/iommu_groups/{dev.group_id}"))
        self._put(f"{here}/subsystem", Link(f"{_TO_ROOT}/bus/pci"))
        if self.iommu is not None and dev.iommu:
            self._put(f"{here}/iommu", Link(f"{_TO_ROOT}/devices/virtual/iommu/{self.iommu.name}"))
        self._put(f"kernel/iommu_groups/{dev.group_id}/devices/{bdf}", Link(f"{_TO_ROOT}/{here}"))
        self._put(f"{drv}/{bdf}", Link(f"{_TO_ROOT}/{here}"))

    def _build_module(self, module: SysfsModule) -> None:
        here = f"module/{module.name}"
        self._put(f"{here}/holders", Dir())
        for holder in module.holders:
            self._put(f"{here}/holders/{holder}", Link(f"../../{holder}"))
        self._put(f"{here}/initstate", Text(lambda: "live\n", 0o444, f"module {module.name} initstate"))
        self._put(f"{here}/taint", Text(lambda: "\n", 0o444, f"module {module.name} taint"))
        self._put(f"{here}/uevent", Control("the emulated kernel sends no uevents"))
        if module.version is not None:
            self._put(f"{here}/version", Text(functools.partial(_line, module.version), 0o444,
                                              f"module {module.name} version"))
        if module.parameters:
            self._put(f"{here}/parameters", Dir())
        for p in module.parameters:
            self._put(f"{here}/parameters/{p.name}", Text(p.render, p.mode, f"module {module.name} {p.name}"))
        for bus, name in module.drivers:
            self._put(f"{here}/drivers/{bus}:{name}", Link(f"../../../bus/{bus}/drivers/{name}"))
            if bus == "pci" and name == DRIVER:  # the one driver directory the view has
                self._put(f"bus/pci/drivers/{DRIVER}/module", Link(f"{_TO_ROOT}/module/{module.name}"))

    def _build_iommu(self, unit: SysfsIommu) -> None:
        here = f"devices/virtual/iommu/{unit.name}"
        self._put(f"{here}/devices", Dir())
        for bdf in sorted(b for b, dev in self.devices.items() if dev.iommu):
            self._put(f"{here}/devices/{bdf}", Link(f"../{_TO_ROOT}/bus/pci/devices/{bdf}"))
        for name, render in INTEL_IOMMU_ATTRIBUTES:
            self._put(f"{here}/intel-iommu/{name}", Text(functools.partial(render, unit), 0o444,
                                                         f"{unit.name} {name}"))
        self._put(f"{here}/subsystem", Link(f"{_TO_ROOT}/class/iommu"))
        self._put(f"class/iommu/{unit.name}", Link(f"../../{here}"))

    def _lookup(self, path: str) -> Optional[object]:
        node: object = self._root
        for part in path.split("/"):
            if not part:
                continue
            if not isinstance(node, Dir) or part not in node.children:
                return None
            node = node.children[part]
        return node

    @staticmethod
    def paths(root: str = "") -> Dict[str, str]:
        """Each real sysfs directory the view replaces for its PCI functions -> its place under ``root``.

        If the host has no ``/sys/bus/pci/drivers/vfio-pci`` (vfio-pci not
        loaded) there is nothing to bind it over: a caller without ``run``'s
        namespace helper binds ``<root>/bus/pci/drivers`` over
        ``/sys/bus/pci/drivers`` instead (the view has only vfio-pci there).
        """
        return {real: os.path.join(root, rel) for real, rel in BIND_DIRS}

    def bind_dirs(self, root: str = "") -> Dict[str, str]:
        """Everything ``cuse-vfio run`` binds over /sys: :meth:`paths`, then one
        directory per module, then the IOMMU unit and its class."""
        binds = self.paths(root)
        for name in self.modules:
            binds[f"/sys/module/{name}"] = os.path.join(root, "module", name)
        if self.iommu is not None:
            binds.update((real, os.path.join(root, rel)) for real, rel in IOMMU_BIND_DIRS)
        return binds

    # -- in-process reads (what the mount serves) --------------------------
    def read(self, path: str) -> bytes:
        """The whole content of an attribute, as a privileged reader sees it."""
        node = self._lookup(path)
        if isinstance(node, Config):
            return self.read_config(node.device)
        if isinstance(node, Text):
            return node.render().encode()
        raise FileNotFoundError(errno.ENOENT, "no attribute in the sysfs view", path)

    def read_config(self, dev: SysfsDevice) -> bytes:
        data = bytes(dev.config_reader())[:dev.config_size]
        return data + bytes(dev.config_size - len(data))

    def listdir(self, path: str) -> List[str]:
        node = self._lookup(path)
        if not isinstance(node, Dir):
            raise FileNotFoundError(errno.ENOENT, "no directory in the sysfs view", path)
        return list(node.children)

    def readlink(self, path: str) -> str:
        node = self._lookup(path)
        if not isinstance(node, Link):
            raise FileNotFoundError(errno.ENOENT, "no link in the sysfs view", path)
        return node.target

    # -- serving -----------------------------------------------------------
    def mount(self, mountpoint: str, foreground: bool = False, timeout: float = 60.0) -> SysfsMount:
        """Serve the view on ``mountpoint`` (an existing directory).

        In the background (default) this returns once the kernel has the
        mount and the loop answers; with ``foreground=True`` it serves in the
        calling thread and returns when the view is unmounted (Ctrl-C,
        SIGTERM or ``fusermount3 -u`` from elsewhere).  The bound is generous:
        the wait ends as soon as the loop answers, and under TCG on a loaded
        machine the first start (importing libfuse's binding, the mount) has
        been seen to take over 10 s.
        """
        mnt = SysfsMount(self, os.path.abspath(mountpoint))
        if not os.path.isdir(mnt.mountpoint):
            raise SysfsViewError(f"{mnt.mountpoint}: the sysfs view's mount point is not a directory; "
                                 "create it first")
        try:
            refuse_mount_point(mnt.mountpoint, "the sysfs view's mount point")
        except MountPointError as e:
            raise SysfsViewError(str(e)) from None
        if foreground:
            mnt.serve_foreground()
        else:
            mnt._start(timeout)
        return mnt


def _group_type(group: SysfsGroup) -> str:
    return group.type + "\n"


def _group_name(group: SysfsGroup) -> str:
    return (group.name or "") + "\n"


def _line(text: str) -> str:
    return text + "\n"
