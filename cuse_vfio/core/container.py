"""Containers: what opening ``/dev/vfio/vfio`` creates (``struct vfio_container``).

A container is an unprivileged object until a group joins it; only then may
an IOMMU driver be set, and detaching the last group takes it away again.
Its lifetime is reference counted because it must survive the container,
group and device files being closed in any order.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, List, Optional

from ..errors import VfioError
from ..uapi.ioctls import VFIO_API_VERSION, VFIO_CHECK_EXTENSION
from .ops import IommuData, IommuDriverOps, UserArg

if TYPE_CHECKING:
    from .group import Group
    from .vfio import Vfio

log = logging.getLogger(__name__)


class Container:
    def __init__(self, vfio: "Vfio"):
        self.vfio = vfio
        self.groups: List["Group"] = []
        self.iommu_driver: Optional[IommuDriverOps] = None
        self.iommu_data: Optional[IommuData] = None
        #: set by the first group: noiommu and real groups never share a container
        self.noiommu = False
        self._refs = 1  # the file's own reference
        self.released = False

    # -- lifecycle -------------------------------------------------------
    def get(self) -> None:
        self._refs += 1

    def put(self) -> None:
        self._refs -= 1
        if self._refs == 0:
            self.released = True

    def release(self) -> None:
        """The container file was closed; groups still holding it keep it alive."""
        with self.vfio.lock:
            self.put()

    # -- ioctls ----------------------------------------------------------
    def get_api_version(self) -> int:
        return VFIO_API_VERSION

    def _driver_allowed(self, driver: IommuDriverOps) -> bool:
        # vfio_iommu_driver_allowed: a noiommu container takes only the noiommu
        # driver, a real one anything but.
        return bool(getattr(driver, "noiommu", False)) == self.noiommu

    def check_extension(self, ext: int) -> int:
        """VFIO_CHECK_EXTENSION: with no driver set, the first registered driver that says yes."""
        with self.vfio.lock:
            if self.iommu_data is not None:
                # the driver reads only .value of CHECK_EXTENSION's argument, which is never memory
                return self.iommu_data.ioctl(VFIO_CHECK_EXTENSION, _IntArg(ext))  # type: ignore[arg-type]
            ret = 0
            for driver in self.vfio.iommu_drivers():
                if self.groups and not self._driver_allowed(driver):
                    continue
                ret = driver.check_extension(ext)
                if ret > 0:
                    break
            return ret

    def set_iommu(self, iommu_type: int, caller=None) -> int:
        """VFIO_SET_IOMMU: the first driver that supports ``iommu_type`` and accepts every group."""
        with self.vfio.lock:
            # Only adding a group privileges a container to allocate IOMMU state.
            if not self.groups:
                raise VfioError(errno.EINVAL, "SET_IOMMU on a container with no group: set a group's container first")
            if self.iommu_driver is not None:
                raise VfioError(errno.EINVAL, "SET_IOMMU on a container whose IOMMU is already set")
            err: VfioError = VfioError(errno.ENODEV, f"no IOMMU driver supports type {iommu_type}")
            for driver in self.vfio.iommu_drivers():
                if not self._driver_allowed(driver):
                    continue
                # The SET_IOMMU argument is the same magic as CHECK_EXTENSION's.
                if driver.check_extension(iommu_type) <= 0:
                    continue
                try:
                    # a driver that asks who opens it (noiommu: CAP_SYS_RAWIO) is told
                    open_as = getattr(driver, "open_as", None)
                    data = open_as(iommu_type, caller) if open_as is not None else driver.open(iommu_type)
                except VfioError as e:
                    err = e
                    continue
                try:
                    self._attach_groups(data)
                except VfioError as e:
                    data.release()
                    err = e
                    continue
                self.iommu_driver, self.iommu_data = driver, data
                log.debug("container %x: IOMMU driver %s (type %d)", id(self), driver.name, iommu_type)
                return 0
            raise err

    def _attach_groups(self, data: IommuData) -> None:
        attached: List["Group"] = []
        try:
            for group in self.groups:
                data.attach_group(group.iommu_group)
                attached.append(group)
        except BaseException:
            for group in reversed(attached):
                data.detach_group(group.iommu_group)
            raise

    def ioctl(self, cmd: int, arg: UserArg) -> int:
        """Every other container ioctl goes to the IOMMU driver, once there is one."""
        with self.vfio.lock:
            if self.iommu_data is None:
                raise VfioError(errno.EINVAL, f"container ioctl 0x{cmd:x} before SET_IOMMU")
            return self.iommu_data.ioctl(cmd, arg)

    # Once an IOMMU driver is set, read/write/mmap reach it: management
    # interfaces beyond ioctl.  Without one (or without the op) they fail.
    def read(self, size: int, offset: int) -> bytes:
        return self._driver_op("read", size, offset)

    def write(self, data: bytes, offset: int) -> int:
        return self._driver_op("write", data, offset)

    def mmap(self, *args) -> object:
        return self._driver_op("mmap", *args)

    def _driver_op(self, name: str, *args):
        with self.vfio.lock:
            op = getattr(self.iommu_data, name, None) if self.iommu_data is not None else None
            if op is None:
                raise VfioError(errno.EINVAL, f"container {name} needs an IOMMU driver that implements it")
            return op(*args)

    # -- groups (called by Group with vfio.lock held) --------------------
    def attach_group(self, group: "Group") -> None:
        # Real groups and fake (noiommu) groups cannot mix.
        if self.groups and self.noiommu != group.iommu_group.noiommu:
            raise VfioError(errno.EPERM, "noiommu and IOMMU-backed groups cannot share a container")
        if self.iommu_data is not None:
            self.iommu_data.attach_group(group.iommu_group)
        self.groups.append(group)
        self.noiommu = group.iommu_group.noiommu
        self.get()

    def detach_group(self, group: "Group") -> None:
        if self.iommu_data is not None:
            self.iommu_data.detach_group(group.iommu_group)
        self.groups.remove(group)
        # Detaching the last group deprivileges a container: remove the IOMMU.
        if not self.groups and self.iommu_data is not None:
            self.iommu_data.release()
            self.iommu_driver = self.iommu_data = None
        self.put()


class _IntArg:
    """CHECK_EXTENSION's argument, which is the value itself and never memory."""

    def __init__(self, value: int):
        self.value = value
