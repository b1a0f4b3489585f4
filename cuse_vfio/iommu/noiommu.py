"""The noiommu driver (``vfio_noiommu_ops`` in ``drivers/vfio/container.c``, 6.1).

With ``enable_unsafe_noiommu_mode`` a device without an IOMMU still gets a
(fake) group and can be used through VFIO, with no protection whatever: the
device DMAs to the physical addresses the user programs into it.  The driver
therefore only says "yes" to VFIO_NOIOMMU_IOMMU and has no MAP_DMA.

Devices of a noiommu container get no DMA space.  The client would program
host physical addresses (found in ``/proc/self/pagemap``); nothing in user
space maps those back to a process and a vaddr, so a model's DMA faults with
"no-iommu-domain" in its DmaPort instead of writing somewhere arbitrary.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, List

from ..errors import VfioError
from ..uapi import VFIO_CHECK_EXTENSION, VFIO_NOIOMMU_IOMMU

if TYPE_CHECKING:
    from ..core.bus import IommuGroup


class NoIommuDriver:
    """The noiommu IOMMU driver; off until ``enable_unsafe_noiommu_mode`` is set (a module switch in Linux)."""

    name = "vfio-noiommu"
    #: the core keeps noiommu containers and this driver for each other
    noiommu = True

    def __init__(self, enable_unsafe_noiommu_mode: bool = False):
        self.enable_unsafe_noiommu_mode = enable_unsafe_noiommu_mode

    def __repr__(self) -> str:
        return f"NoIommuDriver(enabled={self.enable_unsafe_noiommu_mode})"

    def check_extension(self, ext: int) -> int:
        """``vfio_noiommu_ioctl(NULL, VFIO_CHECK_EXTENSION, ext)``."""
        return int(self.enable_unsafe_noiommu_mode and ext == VFIO_NOIOMMU_IOMMU)

    def open(self, arg: int) -> "NoIommu":
        """``vfio_noiommu_open``.  (The kernel also wants CAP_SYS_RAWIO of the caller, which
        ``open`` is not told about here; the server runs as root.)"""
        if not self.enable_unsafe_noiommu_mode:
            raise VfioError(errno.ENODEV, "noiommu mode is off: set enable_unsafe_noiommu_mode to use it")
        if arg != VFIO_NOIOMMU_IOMMU:
            raise VfioError(errno.EINVAL, f"{self.name} only opens VFIO_NOIOMMU_IOMMU, not type {arg}")
        return NoIommu(self)


class NoIommu:
    """A noiommu container's IOMMU state: the groups, and nothing else."""

    def __init__(self, driver: NoIommuDriver):
        self.driver = driver
        self.groups: List[IommuGroup] = []

    def __repr__(self) -> str:
        return f"NoIommu(groups={[g.id for g in self.groups]})"

    def release(self) -> None:
        self.groups = []

    def attach_group(self, group) -> None:
        # The core never mixes group kinds; refuse here too, in case.
        if not getattr(group, "noiommu", False):
            raise VfioError(errno.EINVAL, f"IOMMU group {group.id} has an IOMMU: use a type1 container")
        if any(g is group for g in self.groups):
            raise VfioError(errno.EINVAL, f"IOMMU group {group.id} is already attached to this container")
        self.groups.append(group)

    def detach_group(self, group) -> None:
        self.groups = [g for g in self.groups if g is not group]

    def ioctl(self, cmd: int, arg) -> int:
        if cmd == VFIO_CHECK_EXTENSION:
            return self.driver.check_extension(arg.value)
        raise VfioError(errno.ENOTTY, f"{self.driver.name}: no container ioctl 0x{cmd:x} (a noiommu container "
                                      "has no DMA mappings)")
