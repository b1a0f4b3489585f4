"""Every number of ``<linux/vfio.h>``: ioctl commands, flags, indexes, extensions.

Names are the C names, so a line of kernel or QEMU source reads the same here.
The authority is Linux 6.1's header (the one installed on these machines and
the kernel of the qemu oracle); the few later additions are marked as such.

VFIO ioctls are ``_IO(';', 100 + n)``: no size and no direction bits, because
the structures grow and ``argsz`` says how big the caller's is.  So the number
alone does not say what an ioctl is: ``100 + 12 .. 100 + 21`` mean one thing
on a container and another on a device fd, and on a container the spapr IOMMU
reuses two type1 numbers.  ``IOCTLS`` and ``ioctl_name`` therefore take the
kind of node first.
"""

from __future__ import annotations

import enum
from typing import Dict, Optional, Tuple

from ioctl_opt import IO

VFIO_API_VERSION = 0

# -- extensions (VFIO_CHECK_EXTENSION / VFIO_SET_IOMMU arguments) -------------
VFIO_TYPE1_IOMMU = 1
VFIO_SPAPR_TCE_IOMMU = 2
VFIO_TYPE1v2_IOMMU = 3
VFIO_DMA_CC_IOMMU = 4
VFIO_EEH = 5
VFIO_TYPE1_NESTING_IOMMU = 6
VFIO_SPAPR_TCE_v2_IOMMU = 7
VFIO_NOIOMMU_IOMMU = 8
VFIO_UNMAP_ALL = 9
VFIO_UPDATE_VADDR = 10

VFIO_TYPE = ord(";")
VFIO_BASE = 100


def _vfio_io(n: int) -> int:
    return IO(VFIO_TYPE, VFIO_BASE + n)


# -- container (/dev/vfio/vfio) -----------------------------------------------
VFIO_GET_API_VERSION = _vfio_io(0)
VFIO_CHECK_EXTENSION = _vfio_io(1)
VFIO_SET_IOMMU = _vfio_io(2)

# -- group (/dev/vfio/$GROUP) -------------------------------------------------
VFIO_GROUP_GET_STATUS = _vfio_io(3)
VFIO_GROUP_SET_CONTAINER = _vfio_io(4)
VFIO_GROUP_UNSET_CONTAINER = _vfio_io(5)
VFIO_GROUP_GET_DEVICE_FD = _vfio_io(6)

VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

# -- device fd ------------------------------------------------------------------
VFIO_DEVICE_GET_INFO = _vfio_io(7)
VFIO_DEVICE_GET_REGION_INFO = _vfio_io(8)
VFIO_DEVICE_GET_IRQ_INFO = _vfio_io(9)
VFIO_DEVICE_SET_IRQS = _vfio_io(10)
VFIO_DEVICE_RESET = _vfio_io(11)
VFIO_DEVICE_GET_PCI_HOT_RESET_INFO = _vfio_io(12)
VFIO_DEVICE_PCI_HOT_RESET = _vfio_io(13)
VFIO_DEVICE_QUERY_GFX_PLANE = _vfio_io(14)
VFIO_DEVICE_GET_GFX_DMABUF = _vfio_io(15)
VFIO_DEVICE_IOEVENTFD = _vfio_io(16)
VFIO_DEVICE_FEATURE = _vfio_io(17)
# Newer than Linux 6.1 (the iommufd "cdev" device interface, Linux 6.6); taken
# from the current include/uapi/linux/vfio.h.
VFIO_DEVICE_BIND_IOMMUFD = _vfio_io(18)
VFIO_DEVICE_ATTACH_IOMMUFD_PT = _vfio_io(19)
VFIO_DEVICE_DETACH_IOMMUFD_PT = _vfio_io(20)

VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_DEVICE_FLAGS_PLATFORM = 1 << 2
VFIO_DEVICE_FLAGS_AMBA = 1 << 3
VFIO_DEVICE_FLAGS_CCW = 1 << 4
VFIO_DEVICE_FLAGS_AP = 1 << 5
VFIO_DEVICE_FLAGS_FSL_MC = 1 << 6
VFIO_DEVICE_FLAGS_CAPS = 1 << 7

VFIO_DEVICE_API_PCI_STRING = "vfio-pci"
VFIO_DEVICE_API_PLATFORM_STRING = "vfio-platform"
VFIO_DEVICE_API_AMBA_STRING = "vfio-amba"
VFIO_DEVICE_API_CCW_STRING = "vfio-ccw"
VFIO_DEVICE_API_AP_STRING = "vfio-ap"

# VFIO_DEVICE_GET_INFO capability ids (s390 zPCI; contents in vfio_zdev.h)
VFIO_DEVICE_INFO_CAP_ZPCI_BASE = 1
VFIO_DEVICE_INFO_CAP_ZPCI_GROUP = 2
VFIO_DEVICE_INFO_CAP_ZPCI_UTIL = 3
VFIO_DEVICE_INFO_CAP_ZPCI_PFIP = 4

# -- regions --------------------------------------------------------------------
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3

VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_TYPE = 2
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3
VFIO_REGION_INFO_CAP_NVLINK2_SSATGT = 4
VFIO_REGION_INFO_CAP_NVLINK2_LNKSPD = 5

VFIO_REGION_TYPE_PCI_VENDOR_TYPE = 1 << 31
VFIO_REGION_TYPE_PCI_VENDOR_MASK = 0xFFFF
VFIO_REGION_TYPE_GFX = 1
VFIO_REGION_TYPE_CCW = 2
VFIO_REGION_TYPE_MIGRATION_DEPRECATED = 3

VFIO_REGION_SUBTYPE_INTEL_IGD_OPREGION = 1
VFIO_REGION_SUBTYPE_INTEL_IGD_HOST_CFG = 2
VFIO_REGION_SUBTYPE_INTEL_IGD_LPC_CFG = 3
VFIO_REGION_SUBTYPE_NVIDIA_NVLINK2_RAM = 1
VFIO_REGION_SUBTYPE_IBM_NVLINK2_ATSD = 1
VFIO_REGION_SUBTYPE_GFX_EDID = 1
VFIO_REGION_SUBTYPE_CCW_ASYNC_CMD = 1
VFIO_REGION_SUBTYPE_CCW_SCHIB = 2
VFIO_REGION_SUBTYPE_CCW_CRW = 3
VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED = 1

VFIO_DEVICE_GFX_LINK_STATE_UP = 1
VFIO_DEVICE_GFX_LINK_STATE_DOWN = 2

# v1 migration region (deprecated; struct vfio_device_migration_info)
VFIO_DEVICE_STATE_V1_STOP = 0
VFIO_DEVICE_STATE_V1_RUNNING = 1 << 0
VFIO_DEVICE_STATE_V1_SAVING = 1 << 1
VFIO_DEVICE_STATE_V1_RESUMING = 1 << 2
VFIO_DEVICE_STATE_MASK = VFIO_DEVICE_STATE_V1_RUNNING | VFIO_DEVICE_STATE_V1_SAVING | VFIO_DEVICE_STATE_V1_RESUMING

# -- interrupts -----------------------------------------------------------------
VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3

VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
VFIO_IRQ_SET_DATA_TYPE_MASK = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_DATA_EVENTFD
VFIO_IRQ_SET_ACTION_TYPE_MASK = VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_ACTION_TRIGGER

# -- vfio-pci fixed indexes (C enums) ------------------------------------------------
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_BAR1_REGION_INDEX = 1
VFIO_PCI_BAR2_REGION_INDEX = 2
VFIO_PCI_BAR3_REGION_INDEX = 3
VFIO_PCI_BAR4_REGION_INDEX = 4
VFIO_PCI_BAR5_REGION_INDEX = 5
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_VGA_REGION_INDEX = 8
VFIO_PCI_NUM_REGIONS = 9  # fixed user ABI: indexes >= 9 are described by a region type cap

VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4
VFIO_PCI_NUM_IRQS = 5

# -- vfio-ccw fixed indexes (C enums) ------------------------------------------------
VFIO_CCW_CONFIG_REGION_INDEX = 0
VFIO_CCW_NUM_REGIONS = 1

VFIO_CCW_IO_IRQ_INDEX = 0
VFIO_CCW_CRW_IRQ_INDEX = 1
VFIO_CCW_REQ_IRQ_INDEX = 2
VFIO_CCW_NUM_IRQS = 3

# -- gfx plane, ioeventfd ------------------------------------------------------------
VFIO_GFX_PLANE_TYPE_PROBE = 1 << 0
VFIO_GFX_PLANE_TYPE_DMABUF = 1 << 1
VFIO_GFX_PLANE_TYPE_REGION = 1 << 2

VFIO_DEVICE_IOEVENTFD_8 = 1 << 0
VFIO_DEVICE_IOEVENTFD_16 = 1 << 1
VFIO_DEVICE_IOEVENTFD_32 = 1 << 2
VFIO_DEVICE_IOEVENTFD_64 = 1 << 3
VFIO_DEVICE_IOEVENTFD_SIZE_MASK = 0xF

# -- device features (VFIO_DEVICE_FEATURE) -------------------------------------------
VFIO_DEVICE_FEATURE_MASK = 0xFFFF  # the low 16 bits of flags select the feature
VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_SET = 1 << 17
VFIO_DEVICE_FEATURE_PROBE = 1 << 18

VFIO_DEVICE_FEATURE_PCI_VF_TOKEN = 0
VFIO_DEVICE_FEATURE_MIGRATION = 1
VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE = 2
VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY = 3
VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP = 4
VFIO_DEVICE_FEATURE_LOW_POWER_EXIT = 5
VFIO_DEVICE_FEATURE_DMA_LOGGING_START = 6
VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP = 7
VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT = 8

VFIO_MIGRATION_STOP_COPY = 1 << 0
VFIO_MIGRATION_P2P = 1 << 1

# enum vfio_device_mig_state
VFIO_DEVICE_STATE_ERROR = 0
VFIO_DEVICE_STATE_STOP = 1
VFIO_DEVICE_STATE_RUNNING = 2
VFIO_DEVICE_STATE_STOP_COPY = 3
VFIO_DEVICE_STATE_RESUMING = 4
VFIO_DEVICE_STATE_RUNNING_P2P = 5

# Newer than Linux 6.1: flags of the cdev ioctls (current include/uapi/linux/vfio.h).
VFIO_DEVICE_BIND_FLAG_TOKEN = 1 << 0
VFIO_DEVICE_ATTACH_PASID = 1 << 0
VFIO_DEVICE_DETACH_PASID = 1 << 0

# -- type1 IOMMU (container) ----------------------------------------------------------
VFIO_IOMMU_GET_INFO = _vfio_io(12)
VFIO_IOMMU_MAP_DMA = _vfio_io(13)
VFIO_IOMMU_UNMAP_DMA = _vfio_io(14)
VFIO_IOMMU_ENABLE = _vfio_io(15)
VFIO_IOMMU_DISABLE = _vfio_io(16)
VFIO_IOMMU_DIRTY_PAGES = _vfio_io(17)

VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1

VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION = 2
VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL = 3

VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_DMA_MAP_FLAG_VADDR = 1 << 2

VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
VFIO_DMA_UNMAP_FLAG_ALL = 1 << 1
VFIO_DMA_UNMAP_FLAG_VADDR = 1 << 2

VFIO_IOMMU_DIRTY_PAGES_FLAG_START = 1 << 0
VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP = 1 << 1
VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP = 1 << 2

# -- SPAPR TCE IOMMU and EEH (container; POWER only) --------------------------------------
VFIO_IOMMU_SPAPR_TCE_GET_INFO = _vfio_io(12)  # same number as VFIO_IOMMU_GET_INFO
VFIO_IOMMU_SPAPR_REGISTER_MEMORY = _vfio_io(17)  # same number as VFIO_IOMMU_DIRTY_PAGES
VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY = _vfio_io(18)
VFIO_IOMMU_SPAPR_TCE_CREATE = _vfio_io(19)
VFIO_IOMMU_SPAPR_TCE_REMOVE = _vfio_io(20)
VFIO_EEH_PE_OP = _vfio_io(21)

VFIO_IOMMU_SPAPR_INFO_DDW = 1 << 0

VFIO_EEH_PE_DISABLE = 0
VFIO_EEH_PE_ENABLE = 1
VFIO_EEH_PE_UNFREEZE_IO = 2
VFIO_EEH_PE_UNFREEZE_DMA = 3
VFIO_EEH_PE_GET_STATE = 4
VFIO_EEH_PE_STATE_NORMAL = 0  # results of VFIO_EEH_PE_GET_STATE
VFIO_EEH_PE_STATE_RESET = 1
VFIO_EEH_PE_STATE_STOPPED = 2
VFIO_EEH_PE_STATE_STOPPED_DMA = 4
VFIO_EEH_PE_STATE_UNAVAIL = 5
VFIO_EEH_PE_RESET_DEACTIVATE = 5
VFIO_EEH_PE_RESET_HOT = 6
VFIO_EEH_PE_RESET_FUNDAMENTAL = 7
VFIO_EEH_PE_CONFIGURE = 8
VFIO_EEH_PE_INJECT_ERR = 9


# -- who owns which number ------------------------------------------------------------------
class NodeKind(enum.Enum):
    """The three kinds of file a VFIO ioctl can arrive on."""

    CONTAINER = "container"
    GROUP = "group"
    DEVICE = "device"

    # Members are singletons that compare by identity; Enum's own __hash__ is
    # Python code, run at every table lookup by kind (a few per request).
    __hash__ = object.__hash__


# Ioctl names by the node that answers them.  Where two names share a number
# on one kind (type1 and spapr on a container), the first listed is the name
# ``ioctl_name`` gives: this project emulates x86, whose IOMMU driver is type1.
_OWNERS: Dict[NodeKind, Tuple[str, ...]] = {
    NodeKind.CONTAINER: (
        "VFIO_GET_API_VERSION", "VFIO_CHECK_EXTENSION", "VFIO_SET_IOMMU",
        "VFIO_IOMMU_GET_INFO", "VFIO_IOMMU_MAP_DMA", "VFIO_IOMMU_UNMAP_DMA",
        "VFIO_IOMMU_ENABLE", "VFIO_IOMMU_DISABLE", "VFIO_IOMMU_DIRTY_PAGES",
        "VFIO_IOMMU_SPAPR_TCE_GET_INFO", "VFIO_IOMMU_SPAPR_REGISTER_MEMORY",
        "VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY", "VFIO_IOMMU_SPAPR_TCE_CREATE",
        "VFIO_IOMMU_SPAPR_TCE_REMOVE", "VFIO_EEH_PE_OP",
    ),
    NodeKind.GROUP: (
        "VFIO_GROUP_GET_STATUS", "VFIO_GROUP_SET_CONTAINER",
        "VFIO_GROUP_UNSET_CONTAINER", "VFIO_GROUP_GET_DEVICE_FD",
    ),
    NodeKind.DEVICE: (
        "VFIO_DEVICE_GET_INFO", "VFIO_DEVICE_GET_REGION_INFO", "VFIO_DEVICE_GET_IRQ_INFO",
        "VFIO_DEVICE_SET_IRQS", "VFIO_DEVICE_RESET", "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO",
        "VFIO_DEVICE_PCI_HOT_RESET", "VFIO_DEVICE_QUERY_GFX_PLANE", "VFIO_DEVICE_GET_GFX_DMABUF",
        "VFIO_DEVICE_IOEVENTFD", "VFIO_DEVICE_FEATURE",
        "VFIO_DEVICE_BIND_IOMMUFD", "VFIO_DEVICE_ATTACH_IOMMUFD_PT", "VFIO_DEVICE_DETACH_IOMMUFD_PT",
    ),
}


def _by_number(names: Tuple[str, ...]) -> Tuple[Dict[int, str], Dict[int, Tuple[str, ...]]]:
    first: Dict[int, str] = {}
    every: Dict[int, Tuple[str, ...]] = {}
    for name in names:
        cmd = globals()[name]
        first.setdefault(cmd, name)
        every[cmd] = every.get(cmd, ()) + (name,)
    return first, every


#: kind -> {number: C name}; the name a trace shows.
IOCTLS: Dict[NodeKind, Dict[int, str]] = {}
#: kind -> {number: every C name with that number on that kind}.
IOCTL_ALIASES: Dict[NodeKind, Dict[int, Tuple[str, ...]]] = {}
for _kind, _names in _OWNERS.items():
    IOCTLS[_kind], IOCTL_ALIASES[_kind] = _by_number(_names)
del _kind, _names


def ioctl_name(kind: NodeKind, cmd: int) -> Optional[str]:
    """The C name of ``cmd`` on a node of ``kind``, or None when that node has no such ioctl."""
    table = IOCTLS.get(kind)
    return table.get(cmd) if table is not None else None


def ioctl_names(kind: NodeKind, cmd: int) -> Tuple[str, ...]:
    """Every C name ``cmd`` has on ``kind`` (two on a container for the spapr/type1 overlaps)."""
    table = IOCTL_ALIASES.get(kind)
    return table.get(cmd, ()) if table is not None else ()


#: VFIO_CHECK_EXTENSION / VFIO_SET_IOMMU argument -> C name.
EXTENSION_NAMES: Dict[int, str] = {
    globals()[name]: name
    for name in (
        "VFIO_TYPE1_IOMMU", "VFIO_SPAPR_TCE_IOMMU", "VFIO_TYPE1v2_IOMMU", "VFIO_DMA_CC_IOMMU",
        "VFIO_EEH", "VFIO_TYPE1_NESTING_IOMMU", "VFIO_SPAPR_TCE_v2_IOMMU", "VFIO_NOIOMMU_IOMMU",
        "VFIO_UNMAP_ALL", "VFIO_UPDATE_VADDR",
    )
}
