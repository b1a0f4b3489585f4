"""vfio-pci's resets: the function's own (with its config saved around it) and the bus (hot) reset.

``save_state``/``restore_state`` are the PCI core's pci_save_state and
pci_restore_state as far as a function here has state (the header and the
control registers of MSI, MSI-X and PCI Express).  A hot reset is
VFIO_DEVICE_GET_PCI_HOT_RESET_INFO / VFIO_DEVICE_PCI_HOT_RESET of
``vfio_pci_core.c`` (6.1, and 6.12 where the rules below say), over the
devices a :class:`HotResetBus` holds: every function on a root port's
secondary bus (the machine builds one per ``[[root_port]]``), in the order
the kernel's walk of that bus finds them.
"""

from __future__ import annotations

import ctypes
import errno
from typing import TYPE_CHECKING, Dict, List, Optional

from ...errors import VfioError
from ...uapi import offsetofend, vfio_pci_dependent_device, vfio_pci_hot_reset, vfio_pci_hot_reset_info
from ...uapi.abi import Rule
from ..pci import PCI_EXP_DEVCTL, PCI_EXP_DEVCTL2, PCI_MSI_FLAGS, PCI_MSIX_FLAGS, PCI_STD_HEADER_SIZEOF, PciDevice
from .intrs import fd_at

if TYPE_CHECKING:
    from .core import VfioPciDevice


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


def save_state(fn: PciDevice) -> Dict[int, tuple]:
    """pci_save_state: the header and the control registers of MSI, MSI-X and PCIe."""
    regs = {off: 4 for off in range(4, PCI_STD_HEADER_SIZEOF, 4)}
    if fn.msi is not None:
        regs[fn.msi.offset + PCI_MSI_FLAGS] = 2
    if fn.msix is not None:
        regs[fn.msix.offset + PCI_MSIX_FLAGS] = 2
    if fn.express is not None:
        regs[fn.express.offset + PCI_EXP_DEVCTL] = 2
        regs[fn.express.offset + PCI_EXP_DEVCTL2] = 2
    return {off: (size, fn.config_read(off, size)) for off, size in regs.items()}


def restore_state(fn: PciDevice, saved: Dict[int, tuple]) -> None:
    for off in sorted(saved, reverse=True):
        size, value = saved[off]
        if fn.config_read(off, size) != value:
            fn.config_write(off, size, value)


def _bus_members(vdev: "VfioPciDevice") -> List[tuple]:
    bus = vdev.reset_bus
    if bus is None or not bus.resettable:
        raise VfioError(errno.ENODEV, f"{vdev.name} is on a bus that cannot be reset")
    return bus.members


#: GET_PCI_HOT_RESET_INFO writes the header back even when filling the list fails.
HOT_RESET_INFO_HEADER_ON_FILL_ERROR = Rule(
    "vfio_pci.hot_reset_info.header_on_fill_error", True, since={"6.5": False},
    why="6.1's vfio_pci_ioctl_get_pci_hot_reset_info copies the header out on every path after the "
        "probe (reset_info_exit); since 'vfio/pci: Copy hot-reset device info to userspace in the devices "
        "loop' (6.5) a failing fill (-EPERM: a device in no IOMMU group) jumps past the header's copy.")


def get_pci_hot_reset_info(vdev: "VfioPciDevice", arg) -> int:
    minsz = offsetofend(vfio_pci_hot_reset_info, "count")
    hdr = arg.fetch_struct(vfio_pci_hot_reset_info, minsz)
    hdr.flags = 0
    members = _bus_members(vdev)
    bus = vdev.reset_bus
    assert bus is not None  # _bus_members said it exists
    dev_size = ctypes.sizeof(vfio_pci_dependent_device)
    if len(members) > (hdr.argsz - ctypes.sizeof(vfio_pci_hot_reset_info)) // dev_size:
        hdr.count = len(members)
        arg.write(0, bytes(hdr)[:minsz])
        raise VfioError(errno.ENOSPC, f"hot reset of {vdev.name} affects {len(members)} devices")
    devices = b""
    for devfn, group_id, _ in members:
        if group_id is None:
            # vfio_pci_fill_devs: on 6.1 the header still goes back (flags 0, the caller's count)
            if HOT_RESET_INFO_HEADER_ON_FILL_ERROR.of(vdev.abi):
                arg.write(0, bytes(hdr)[:minsz])
            raise VfioError(errno.EPERM, "a device on the bus is in no IOMMU group: it cannot be reset")
        devices += bytes(vfio_pci_dependent_device(group_id=group_id, segment=bus.segment,
                                                   bus=bus.bus, devfn=devfn))
    hdr.count = len(members)
    arg.write(0, bytes(hdr)[:minsz])
    arg.write(ctypes.sizeof(vfio_pci_hot_reset_info), devices)
    return 0


#: PCI_HOT_RESET with count 0 fails before the bus is probed for a reset.
HOT_RESET_COUNT_BEFORE_PROBE = Rule(
    "vfio_pci.hot_reset.zero_count_first", False, since={"6.5": True},
    why="6.1's vfio_pci_ioctl_pci_hot_reset probes the slot or bus first (-ENODEV when neither can be "
        "reset) and rejects count 0 only after; 'vfio/pci: Allow passing zero-length fd array in "
        "VFIO_DEVICE_PCI_HOT_RESET' (6.5) checks !!hdr.count against the cdev being open first: -EINVAL.")


def pci_hot_reset(vdev: "VfioPciDevice", arg) -> int:
    minsz = offsetofend(vfio_pci_hot_reset, "count")
    hdr = arg.fetch_struct(vfio_pci_hot_reset, minsz)
    if hdr.flags:
        raise VfioError(errno.EINVAL, "PCI_HOT_RESET: flags must be 0")
    if not hdr.count and HOT_RESET_COUNT_BEFORE_PROBE.of(vdev.abi):
        # a group (legacy) opened device must pass its group fds
        raise VfioError(errno.EINVAL, "PCI_HOT_RESET: count 0 is only for a device opened as a cdev")
    members = _bus_members(vdev)
    if not hdr.count or hdr.count > len(members):
        raise VfioError(errno.EINVAL, f"PCI_HOT_RESET: give 1..{len(members)} group fds")
    raw = arg.read(ctypes.sizeof(vfio_pci_hot_reset), 4 * hdr.count)
    groups = {vdev.group_of_fd(arg.caller, fd_at(raw, i)) for i in range(hdr.count)}
    # Every function on the bus must be a vfio-pci device, and the user must own all their groups.
    vdevs = []
    for devfn, group_id, member in members:
        if member is None:
            raise VfioError(errno.EINVAL, f"function {devfn:#x} on the bus is not bound to vfio-pci")
        if group_id not in groups:
            raise VfioError(errno.EINVAL, f"the group fds do not include group {group_id} of function {devfn:#x}")
        vdevs.append(member)
    # vfio_pci_dev_set_pm_runtime_get: a member may be runtime-suspended (idle, or in low power)
    for member in vdevs:
        with member.lock:
            member.runtime_pm.get()
    try:
        for member in vdevs:
            with member.lock:
                saved = member.save_state()
                try:
                    member.guarded(member.function.reset_function)
                finally:
                    member.restore_state(saved)
    finally:
        for member in vdevs:
            with member.lock:
                member.runtime_pm.put()
    return 0
