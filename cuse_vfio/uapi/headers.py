"""The header checks of device ioctls that every vfio driver shares, written once.

The kernel keeps them where the core and every driver see them
(``vfio_ioctl_device_feature`` in vfio_main.c, ``vfio_check_feature`` in
<linux/vfio.h>, ``vfio_set_irqs_validate_and_prepare``), so that no driver
writes them again.  Here they sit below both: the core's device route
(:meth:`cuse_vfio.core.DeviceFile.ioctl`) calls ``device_feature_header``
before it hands VFIO_DEVICE_FEATURE to the driver's ``device_feature``, and a
driver driven directly (in-process, as the device tests do) calls the same.
They only read the header they are given, through the argument's own
copy-in rules; nothing here knows a driver.
"""

from __future__ import annotations

import errno
from typing import Tuple

from ..errors import VfioError
from .ioctls import (
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
    VFIO_IRQ_SET_ACTION_TYPE_MASK,
    VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    VFIO_IRQ_SET_DATA_TYPE_MASK,
)
from .structs import offsetofend, vfio_device_feature

U32_MAX = 0xFFFFFFFF
#: the bytes of ``struct vfio_device_feature`` before its data
DEVICE_FEATURE_MINSZ = offsetofend(vfio_device_feature, "flags")
_FEATURE_FLAGS = VFIO_DEVICE_FEATURE_MASK | VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_GET | \
    VFIO_DEVICE_FEATURE_PROBE
_IRQ_DATA_SIZES = {VFIO_IRQ_SET_DATA_NONE: 0, VFIO_IRQ_SET_DATA_BOOL: 1, VFIO_IRQ_SET_DATA_EVENTFD: 4}


def device_feature_header(arg) -> Tuple[int, int]:
    """vfio_ioctl_device_feature's checks: ``(flags, argsz)``, argsz counting the bytes after the header.

    EFAULT when the header is not there, EINVAL for an argsz below it,
    unknown flags, or GET with SET without PROBE.  The feature number is
    the driver's to know (ENOTTY for one it has not).
    """
    feature = arg.fetch_struct(vfio_device_feature, DEVICE_FEATURE_MINSZ)
    flags = feature.flags
    if flags & ~_FEATURE_FLAGS:
        raise VfioError(errno.EINVAL, f"DEVICE_FEATURE: unknown flags 0x{flags:x}")
    if not flags & VFIO_DEVICE_FEATURE_PROBE and flags & VFIO_DEVICE_FEATURE_SET and \
            flags & VFIO_DEVICE_FEATURE_GET:
        raise VfioError(errno.EINVAL, "DEVICE_FEATURE: GET and SET together need PROBE")
    return flags, feature.argsz - DEVICE_FEATURE_MINSZ


def check_feature(flags: int, argsz: int, supported: int, minsz: int) -> bool:
    """vfio_check_feature: False for a successful PROBE, True to go on, EINVAL otherwise.

    ``supported`` is VFIO_DEVICE_FEATURE_GET and/or _SET; ``minsz`` the bytes
    the feature needs after the header.
    """
    if flags & (VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET) & ~supported:
        raise VfioError(errno.EINVAL, "DEVICE_FEATURE: this feature does not support "
                                      + ("GET" if supported == VFIO_DEVICE_FEATURE_SET else "SET"))
    if flags & VFIO_DEVICE_FEATURE_PROBE:
        return False
    if not flags & (VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET):
        raise VfioError(errno.EINVAL, "DEVICE_FEATURE: without PROBE, give GET or SET")
    if argsz < minsz:
        raise VfioError(errno.EINVAL, f"DEVICE_FEATURE: the feature needs {minsz} bytes of data")
    return True


def set_irqs_validate_and_prepare(hdr, num_irqs: int, max_irq_type: int, minsz: int) -> int:
    """vfio_set_irqs_validate_and_prepare: EINVAL for every malformed SET_IRQS header; the data item size."""
    if hdr.argsz < minsz:
        raise VfioError(errno.EINVAL, "SET_IRQS: argsz smaller than minsz")
    if hdr.index >= max_irq_type:
        raise VfioError(errno.EINVAL, f"SET_IRQS: no irq index {hdr.index}")
    if hdr.count >= U32_MAX - hdr.start:
        raise VfioError(errno.EINVAL, "SET_IRQS: start + count overflows")
    if hdr.flags & ~(VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK):
        raise VfioError(errno.EINVAL, f"SET_IRQS: unknown flags 0x{hdr.flags:x}")
    if hdr.start >= num_irqs or hdr.start + hdr.count > num_irqs:
        raise VfioError(errno.EINVAL, f"SET_IRQS: vectors {hdr.start}+{hdr.count} outside the {num_irqs} "
                                      f"of index {hdr.index}")
    data_type = hdr.flags & VFIO_IRQ_SET_DATA_TYPE_MASK
    if data_type not in _IRQ_DATA_SIZES:
        raise VfioError(errno.EINVAL, "SET_IRQS: exactly one DATA type must be given")
    size = _IRQ_DATA_SIZES[data_type]
    if size and hdr.argsz - minsz < hdr.count * size:
        raise VfioError(errno.EINVAL, f"SET_IRQS: argsz leaves room for fewer than {hdr.count} data items")
    return size
