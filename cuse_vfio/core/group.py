"""Groups: ``/dev/vfio/N``, the unit of ownership (``struct vfio_group``).

A group is opened by one file at a time.  It joins a container with
SET_CONTAINER; every device fd it hands out is one more *container user*,
and the membership dissolves when the last user (group file or device fd)
goes away: the kernel's ``container_users`` count, kept here exactly so.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, List, Optional

from ..errors import VfioError
from ..uapi.abi import Rule
from ..uapi.ioctls import VFIO_GROUP_FLAGS_CONTAINER_SET, VFIO_GROUP_FLAGS_VIABLE
from .bus import BusDevice, IommuGroup, NotifyAction
from .container import Container
from .device import Device, DeviceFile
from .ops import CAP_SYS_RAWIO, capable

if TYPE_CHECKING:
    from .vfio import Vfio

log = logging.getLogger(__name__)

#: Drivers known to do no DMA (or to just sit on a device): a group whose
#: other devices are bound to them is still viable.
VFIO_DRIVER_WHITELIST = frozenset({"pci-stub", "pcieport"})

#: SET_CONTAINER with an fd that is not /dev/vfio/vfio.
SET_CONTAINER_NOT_A_CONTAINER = Rule(
    "group.set_container.not_a_container", errno.EINVAL, since={"6.2": errno.EBADFD},
    why="6.1's vfio_group_set_container fails with the -EINVAL it preset; since 'vfio-iommufd: Allow "
        "iommufd to be used in place of a container fd' (6.2) vfio_group_ioctl_set_container tries the "
        "fd as a container, then as an iommufd, and ends with -EBADFD: the FD passed is not recognized.")


class Group:
    def __init__(self, vfio: "Vfio", iommu_group: IommuGroup):
        self.vfio = vfio
        self.iommu_group = iommu_group
        self.devices: List[Device] = []
        #: devices being unbound from vfio: gone from ``devices``, not yet driverless
        self.unbound: List[BusDevice] = []
        self.container: Optional[Container] = None
        self.container_users = 0
        self.opened = False
        self._refs = 1
        iommu_group.register_notifier(self._on_notify)

    @property
    def id(self) -> int:
        return self.iommu_group.id

    def __repr__(self) -> str:
        return f"Group({self.id})"

    # -- lifecycle (vfio.lock held by callers) ---------------------------
    def get(self) -> None:
        self._refs += 1

    def put(self) -> None:
        self._refs -= 1
        if self._refs == 0:
            # vfio_group_release: nothing may remain on the group.
            assert not self.devices, f"group {self.id} released with devices"
            self.unbound.clear()
            self.iommu_group.unregister_notifier(self._on_notify)
            self.vfio._forget_group(self)

    # -- the group file --------------------------------------------------
    def open(self, caller=None) -> "Group":
        with self.vfio.lock:
            # vfio_group_fops_open: a noiommu group gives raw DMA to any physical
            # address, so only a CAP_SYS_RAWIO opener gets it (checked before EBUSY)
            if self.iommu_group.noiommu and not capable(caller, CAP_SYS_RAWIO):
                raise VfioError(errno.EPERM, f"noiommu group {self.id} needs CAP_SYS_RAWIO to open")
            # One open at a time; and a previous open's device fds still
            # holding the container count as that open still being there.
            if self.opened:
                raise VfioError(errno.EBUSY, f"group {self.id} is already open")
            if self.container is not None:
                raise VfioError(errno.EBUSY, f"group {self.id} is still in use by device fds of a previous open")
            self.opened = True
            self.get()
            return self

    def release(self) -> None:
        with self.vfio.lock:
            self.try_dissolve_container()
            self.opened = False
            self.put()

    # -- viability -------------------------------------------------------
    def _dev_viable(self, dev: BusDevice) -> bool:
        if dev in self.unbound:
            return True
        if dev.driver is None or dev.driver_name in VFIO_DRIVER_WHITELIST:
            return True
        return self.device_by_dev(dev) is not None

    @staticmethod
    def _driver_keeps_isolation(driver: object) -> bool:
        return getattr(driver, "is_vfio_driver", False) or getattr(driver, "name", None) in VFIO_DRIVER_WHITELIST

    def viable(self) -> bool:
        """Every device of the IOMMU group is bound to vfio, whitelisted, driverless or being unbound."""
        return all(self._dev_viable(dev) for dev in self.iommu_group.devices)

    def device_by_dev(self, dev: BusDevice) -> Optional[Device]:
        for device in self.devices:
            if device.dev is dev:
                return device
        return None

    # -- ioctls ----------------------------------------------------------
    def status_flags(self) -> int:
        with self.vfio.lock:
            flags = 0
            if self.viable():
                flags |= VFIO_GROUP_FLAGS_VIABLE
            if self.container is not None:
                flags |= VFIO_GROUP_FLAGS_CONTAINER_SET
            return flags

    def set_container(self, target: object) -> None:
        """VFIO_GROUP_SET_CONTAINER, ``target`` being what the fd argument refers to."""
        with self.vfio.lock:
            if self.container_users or self.container is not None:
                raise VfioError(errno.EINVAL, f"group {self.id} already has a container: unset it first")
            if not isinstance(target, Container):
                raise VfioError(SET_CONTAINER_NOT_A_CONTAINER.of(self.vfio.abi),
                                "SET_CONTAINER needs an fd of /dev/vfio/vfio")
            if not self.viable():
                raise VfioError(errno.EPERM, f"group {self.id} is not viable: bind all its devices to vfio-pci")
            target.attach_group(self)
            self.container = target
            self.container_users = 1

    def unset_container(self) -> None:
        """VFIO_GROUP_UNSET_CONTAINER: only the 1 -> 0 transition is valid here."""
        with self.vfio.lock:
            if self.container is None:
                raise VfioError(errno.EINVAL, f"group {self.id} has no container to unset")
            if self.container_users != 1:
                raise VfioError(errno.EBUSY, f"group {self.id} still has open device fds")
            self.container_users = 0
            self._detach_container()

    def try_dissolve_container(self) -> None:
        """Drop one container user; the last one takes the group out of its container."""
        if self.container_users > 0:
            self.container_users -= 1
            if self.container_users == 0:
                self._detach_container()

    def _detach_container(self) -> None:
        container, self.container = self.container, None
        if container is not None:
            container.detach_group(self)

    def _device_by_name(self, name: str) -> Optional[Device]:
        """vfio_device_get_from_name: the driver's ``match`` where it has one (vfio-pci takes
        "<bdf> [vf_token=<uuid>]"), else the exact name; a driver's error stops the search."""
        for device in self.devices:
            match = getattr(device.ops, "match", None)
            if match is not None:
                if match(name):  # raises VfioError for a malformed option
                    return device
            elif device.name == name:
                return device
        return None

    def get_device_fd(self, name: str) -> DeviceFile:
        """VFIO_GROUP_GET_DEVICE_FD: a new open of the device called ``name``."""
        with self.vfio.lock:
            # Kernel 6.1 order: the name is looked up before the container is checked.
            device = self._device_by_name(name)
            if device is None:
                raise VfioError(errno.ENODEV, f"group {self.id} has no device {name!r}")
            if not self.container_users or self.container is None or self.container.iommu_data is None:
                raise VfioError(errno.EINVAL,
                                f"group {self.id} needs a container with an IOMMU set (SET_CONTAINER, SET_IOMMU) first")
            if not self.viable():
                raise VfioError(errno.EINVAL, f"group {self.id} is not viable")
            devfile = device.open_file()
            self.container_users += 1
            if self.iommu_group.noiommu:
                log.warning("%s: vfio-noiommu device opened by user", device.name)
            return devfile

    # -- external users (KVM and friends) --------------------------------
    def get_external_user(self) -> "Group":
        with self.vfio.lock:
            if not self.container_users:
                raise VfioError(errno.EINVAL, f"group {self.id} has no container")
            self.container_users += 1
            if self.container is None or self.container.iommu_data is None or not self.viable():
                self.container_users -= 1
                raise VfioError(errno.EINVAL, f"group {self.id} has no IOMMU set or is not viable")
            self.get()
            return self

    def put_external_user(self) -> None:
        with self.vfio.lock:
            self.put()
            self.try_dissolve_container()

    # -- bus events (vfio_iommu_group_notifier) --------------------------
    def _on_notify(self, action: NotifyAction, dev: BusDevice) -> None:
        with self.vfio.lock:
            live = self.container_users > 0
            if action is NotifyAction.ADD_DEVICE:
                if live:
                    log.warning("device %s added to live group %d", dev.name, self.id)
            elif action is NotifyAction.BIND_DRIVER:
                # The 0.3 core BUG()s once a DMA-capable driver has bound inside
                # a live group; later kernels refuse such a probe (the group's
                # DMA is owned by user space).  Refuse it before it happens.
                if live and not self._driver_keeps_isolation(dev.driver):
                    raise VfioError(errno.EBUSY, f"binding {dev.name} to {dev.driver_name} would break "
                                    f"the isolation of group {self.id}, which user space is using")
            elif action is NotifyAction.BOUND_DRIVER:
                if live and not self._dev_viable(dev):
                    log.error("device %s bound to %s breaks isolation of live group %d",
                              dev.name, dev.driver_name, self.id)
            elif action is NotifyAction.UNBOUND_DRIVER:
                if dev in self.unbound:
                    self.unbound.remove(dev)
