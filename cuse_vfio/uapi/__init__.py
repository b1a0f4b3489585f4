"""The VFIO user ABI: ioctl numbers, ctypes layouts, capability chains, a decoder.

Everything is named as in ``<linux/vfio.h>`` so kernel and QEMU sources read
the same here: ``from cuse_vfio.uapi import VFIO_IOMMU_MAP_DMA,
vfio_iommu_type1_dma_map``.  This package knows no file descriptor.
"""

from .caps import Cap, CapChain, parse_caps  # noqa: F401  (re-exported)
from .decode import decode  # noqa: F401  (re-exported)
from .headers import DEVICE_FEATURE_MINSZ, check_feature, device_feature_header, set_irqs_validate_and_prepare  # noqa: F401  (re-exported)
from .ioctls import *  # noqa: F401,F403  (every C name)
from .ioctls import EXTENSION_NAMES, IOCTL_ALIASES, IOCTLS, NodeKind, ioctl_name, ioctl_names  # noqa: F401  (re-exported)
from .structs import *  # noqa: F401,F403  (every struct, by its C name)
from .structs import NEWER_THAN_6_1, STRUCTS, offsetofend  # noqa: F401  (re-exported)
