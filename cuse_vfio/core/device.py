"""Devices: a bus device bound to a vfio driver (``struct vfio_device``), and its fds.

A Device lives from ``Vfio.add_group_dev`` (the vfio driver's probe) until
``Vfio.del_group_dev`` (its remove), which waits for every fd to be closed.
Each device fd is a DeviceFile; the driver's ``open``/``release`` see the
first open and the last close (``open_device``/``close_device`` of 6.1).
"""

from __future__ import annotations

import contextlib
import errno
from typing import TYPE_CHECKING, Any, Callable, Tuple

from ..errors import VfioError
from ..uapi import VFIO_DEVICE_FEATURE, device_feature_header
from .bus import BusDevice
from .ops import DeviceOps, UserArg

if TYPE_CHECKING:
    from .group import Group


class Device:
    def __init__(self, group: "Group", dev: BusDevice, ops: DeviceOps):
        self.group = group
        self.dev = dev
        self.ops = ops
        self._refs = 1  # the vfio driver's reference, dropped by del_group_dev
        self.open_count = 0

    @property
    def name(self) -> str:
        return self.dev.name

    def __repr__(self) -> str:
        return f"Device({self.name!r}, group={self.group.id})"

    # -- lifecycle (vfio.lock held) --------------------------------------
    def get(self) -> None:
        # A device reference always implies a group reference.
        self.group.get()
        self._refs += 1

    def put(self) -> None:
        group = self.group
        self._refs -= 1
        if self._refs == 0:
            group.devices.remove(self)
            # del_group_dev may be waiting for this device to go.
            group.vfio.release_q.notify_all()
        group.put()

    def open_file(self) -> "DeviceFile":
        if self.open_count == 0:
            self.ops.open()
        self.open_count += 1
        self.get()
        return DeviceFile(self)


class DeviceFile:
    """One device fd: what GET_DEVICE_FD hands to the client."""

    def __init__(self, device: Device):
        self.device = device
        self.closed = False
        # The driver's region access, looked up once: every pread/pwrite of the fd comes here.
        self._read = getattr(device.ops, "read", None)
        self._write = getattr(device.ops, "write", None)

    def __repr__(self) -> str:
        return f"DeviceFile({self.device.name!r})"

    def release(self) -> None:
        device = self.device
        with device.group.vfio.lock:
            if self.closed:
                return
            self.closed = True
            device.open_count -= 1
            if device.open_count == 0:
                device.ops.release()
            device.group.try_dissolve_container()
            device.put()

    def _ops(self, name: str):
        if self.closed:
            raise VfioError(errno.EBADF, f"device fd of {self.device.name} is closed")
        op = getattr(self.device.ops, name, None)
        if op is None:
            raise VfioError(errno.EINVAL, f"device {self.device.name} does not implement {name}")
        return op

    def ioctl(self, cmd: int, arg: UserArg) -> int:
        """vfio_device_fops_unl_ioctl: DEVICE_FEATURE's header is the core's, the rest the driver's.

        A driver with features gets VFIO_DEVICE_FEATURE as
        ``device_feature(flags, arg, argsz)`` once the header passed the
        checks every driver shares, inside its ``awake()`` (the runtime-PM
        wake the kernel takes around every device ioctl) when it has one.
        """
        ioctl = self._ops("ioctl")
        ops = self.device.ops
        feature = getattr(ops, "device_feature", None)
        if cmd != VFIO_DEVICE_FEATURE or feature is None:
            return ioctl(cmd, arg)
        awake = getattr(ops, "awake", None)
        with awake() if awake is not None else contextlib.nullcontext():
            flags, argsz = device_feature_header(arg)
            return feature(flags, arg, argsz)

    def region_ops(self) -> Tuple[Callable[[int, int], bytes], Callable[[bytes, int], int]]:
        """``(read, write)`` for a transport to bind when it opens this fd: the driver's region
        access itself, or this file's read and write where the driver has none (they say why).
        Bound for as long as the open lasts, which ends before ``release`` closes the file."""
        return self._read or self.read, self._write or self.write

    def read(self, size: int, offset: int) -> bytes:
        read = self._read
        if read is None or self.closed:
            read = self._ops("read")  # says why
        return read(size, offset)

    def write(self, data: bytes, offset: int) -> int:
        write = self._write
        if write is None or self.closed:
            write = self._ops("write")  # says why
        return write(data, offset)

    def mmap(self, offset: int, length: int, shared: bool = True) -> Tuple[Any, int]:
        """vfio_device_fops_mmap: the driver's mmap of ``length`` bytes at ``offset`` (whole pages).

        Device memory is only ever mapped shared: vfio-pci (as every vfio
        driver that maps) refuses a mapping without VM_SHARED, before it
        looks at the range.  The driver decides the rest; vfio-pci answers
        ``(memory, start)``.
        """
        op = self._ops("mmap")
        if not shared:
            raise VfioError(errno.EINVAL, f"device fd of {self.device.name}: a mapping must be MAP_SHARED")
        return op(offset, length)
