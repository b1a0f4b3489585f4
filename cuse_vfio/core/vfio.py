"""The VFIO core itself: the IOMMU-driver registry, the groups, and the
entry points a vfio bus driver (vfio-pci) and an external user (KVM) call.

One ``Vfio`` object is one kernel's worth of VFIO state.  It never touches a
file descriptor: opening a node returns the object the file would hold as
``private_data`` (Container, Group, DeviceFile), and the transports keep the
mapping from their own handles to those objects.
"""

from __future__ import annotations

import errno
import logging
import threading
from typing import Dict, List, Optional

from ..errors import VfioError
from ..uapi.abi import KernelAbi
from .bus import BusDevice, IommuGroup
from .container import Container
from .device import Device
from .group import Group
from .ops import DeviceOps, IommuDriverOps

log = logging.getLogger(__name__)

#: How long del_group_dev waits between requests to the driver (the kernel's HZ * 10).
REQUEST_INTERVAL = 10.0


class Vfio:
    def __init__(self, request_interval: float = REQUEST_INTERVAL, abi: Optional[KernelAbi] = None):
        # One lock for the whole model: the kernel's group_lock, iommu_drivers_lock
        # and container locks collapse into it, since requests are served by one
        # loop and only hot removal and deferred replies come from other threads.
        self.lock = threading.RLock()
        self.release_q = threading.Condition(self.lock)
        self.request_interval = request_interval
        #: the kernel release this VFIO behaves as (core/abi.py: the rules consult it)
        self.abi = abi or KernelAbi()
        self._iommu_drivers: List[IommuDriverOps] = []
        self._groups: Dict[int, Group] = {}

    # -- IOMMU driver registry ------------------------------------------
    def register_iommu_driver(self, ops: IommuDriverOps) -> None:
        with self.lock:
            if any(d is ops for d in self._iommu_drivers):
                raise VfioError(errno.EINVAL, f"IOMMU driver {ops.name} is already registered")
            # list_add: the newest driver is asked first.
            self._iommu_drivers.insert(0, ops)

    def unregister_iommu_driver(self, ops: IommuDriverOps) -> None:
        with self.lock:
            self._iommu_drivers = [d for d in self._iommu_drivers if d is not ops]

    def iommu_drivers(self) -> List[IommuDriverOps]:
        return list(self._iommu_drivers)

    # -- nodes -----------------------------------------------------------
    def open_container(self) -> Container:
        """open("/dev/vfio/vfio")."""
        return Container(self)

    def group(self, group_id: int) -> Optional[Group]:
        with self.lock:
            return self._groups.get(group_id)

    def groups(self) -> List[Group]:
        with self.lock:
            return sorted(self._groups.values(), key=lambda g: g.id)

    def open_group(self, group_id: int, caller=None) -> Group:
        """open("/dev/vfio/<group_id>")."""
        with self.lock:
            group = self._groups.get(group_id)
            if group is None:
                raise VfioError(errno.ENODEV, f"no VFIO group {group_id}: "
                                f"no device of IOMMU group {group_id} is bound to a vfio driver")
            return group.open(caller)

    def _group_for(self, iommu_group: IommuGroup) -> Group:
        group = self._groups.get(iommu_group.id)
        if group is None:
            group = Group(self, iommu_group)
            self._groups[iommu_group.id] = group
        else:
            group.get()
        return group

    def _forget_group(self, group: Group) -> None:
        if self._groups.get(group.id) is group:
            del self._groups[group.id]

    # -- the vfio bus driver's side (vfio_add_group_dev / vfio_del_group_dev)
    def add_group_dev(self, dev: BusDevice, ops: DeviceOps) -> Device:
        """A vfio driver probed ``dev``: make it a VFIO device of its IOMMU group's group."""
        if dev.iommu_group is None:
            raise VfioError(errno.EINVAL, f"{dev.name} is in no IOMMU group")
        with self.lock:
            group = self._group_for(dev.iommu_group)
            if group.device_by_dev(dev) is not None:
                group.put()
                raise VfioError(errno.EBUSY, f"device {dev.name} already exists on group {group.id}")
            device = Device(group, dev, ops)
            group.devices.append(device)
            dev.drvdata = device
            # The device holds the group reference taken above.
            return device

    def del_group_dev(self, dev: BusDevice) -> DeviceOps:
        """The vfio driver is being unbound: drop its reference and wait until every fd is closed.

        While the device is in use the driver's ``request(count)`` is called
        every ``request_interval`` seconds with a growing count, so it can
        escalate (ask the user nicely, then less nicely).
        """
        with self.lock:
            device = dev.drvdata
            if not isinstance(device, Device):
                raise VfioError(errno.ENODEV, f"{dev.name} is not a VFIO device")
            group = device.group
            group.get()
            # Gone from the group but not yet driverless: keep the group viable
            # for external users that must re-find it to release it.
            group.unbound.append(dev)
            device.put()
            count = 0
            while device in group.devices:
                ops = device.ops
                request = getattr(ops, "request", None)
                if request is not None:
                    log.info("device %s is in use: request #%d to release it", dev.name, count)
                    request(count)
                count += 1
                self.release_q.wait_for(lambda: device not in group.devices, timeout=self.request_interval)
            dev.drvdata = None
            group.put()
            return device.ops

    # -- external users (vfio_group_get_external_user and friends) -------
    def group_get_external_user(self, file_object: object) -> Group:
        if not isinstance(file_object, Group):
            raise VfioError(errno.EINVAL, "not a VFIO group file")
        return file_object.get_external_user()

    @staticmethod
    def group_put_external_user(group: Group) -> None:
        group.put_external_user()

    @staticmethod
    def external_user_iommu_id(group: Group) -> int:
        return group.iommu_group.id

    @staticmethod
    def external_check_extension(group: Group, ext: int) -> int:
        if group.container is None:
            raise VfioError(errno.EINVAL, f"group {group.id} has no container")
        return group.container.check_extension(ext)


class VfioBusDriver:
    """A vfio bus driver such as vfio-pci: binding it hands the device to VFIO.

    ``ops_for(dev)`` builds the DeviceOps for a device being probed.  Unbinding
    blocks until user space has closed every fd of the device.
    """

    is_vfio_driver = True

    def __init__(self, vfio: Vfio, name: str, ops_for):
        self.vfio = vfio
        self.name = name
        self.ops_for = ops_for

    def probe(self, dev: BusDevice) -> None:
        self.vfio.add_group_dev(dev, self.ops_for(dev))

    def remove(self, dev: BusDevice) -> None:
        self.vfio.del_group_dev(dev)
