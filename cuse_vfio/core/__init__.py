"""The VFIO core as an in-process model of Linux's ``drivers/vfio/vfio.c`` ("0.3")."""

from ..uapi.abi import DEFAULT_KERNEL_ABI, KERNEL_ABIS, KernelAbi, Rule
from .bus import BusDevice, BusDriver, IommuGroup, NotifyAction, StubDriver, device_bind, device_unbind
from .container import Container
from .device import Device, DeviceFile
from .group import VFIO_DRIVER_WHITELIST, Group
from .ops import AddressSpace, Caller, DeviceOps, DmaSpace, ForeignFile, IommuData, IommuDriverOps, UserArg
from .vfio import Vfio, VfioBusDriver

__all__ = [
    "AddressSpace", "BusDevice", "DEFAULT_KERNEL_ABI", "KERNEL_ABIS", "KernelAbi", "Rule", "BusDriver", "Caller",
    "Container", "Device", "DeviceFile", "DeviceOps",
    "DmaSpace", "ForeignFile", "Group", "IommuData", "IommuDriverOps", "IommuGroup", "NotifyAction", "StubDriver",
    "UserArg", "VFIO_DRIVER_WHITELIST", "Vfio", "VfioBusDriver", "device_bind", "device_unbind",
]
