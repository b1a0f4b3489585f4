"""IOMMU drivers: type1 (v1 and v2 semantics) and noiommu, plus the IOMMU fault log.

``register_default_drivers(vfio)`` registers them with a ``core.Vfio`` in the
order the kernel's modules load (noiommu with the vfio module, type1 after),
so the core asks type1 first.
"""

from __future__ import annotations

from typing import Tuple

from .dma import DmaList, DmaMapping
from .faults import (
    CLIENT_MEMORY,
    FAULT_LOG_SIZE,
    READ_NOT_PERMITTED,
    UNMAPPED,
    VADDR_INVALIDATED,
    WRITE_NOT_PERMITTED,
    Fault,
    FaultLog,
    IommuFault,
)
from .noiommu import NoIommu, NoIommuDriver
from .type1 import (
    DIRTY_BITMAP_SIZE_MAX,
    DMA_ENTRY_LIMIT,
    INTEL_VTD_PGSIZES,
    Q35_VTD_APERTURE,
    X86_MSI_WINDOW,
    Type1DmaSpace,
    Type1Driver,
    Type1Iommu,
    iova_ranges,
)


def register_default_drivers(vfio, noiommu: bool = False, **type1_options) -> Tuple[Type1Driver, NoIommuDriver]:
    """Register type1 and noiommu with ``vfio`` (a ``core.Vfio``) and return them.

    The noiommu driver is always registered, as with ``CONFIG_VFIO_NOIOMMU=y``
    (Debian's 6.1 leaves it unset: its vfio module shows no parameters in the
    vfio VM); ``noiommu`` is its ``enable_unsafe_noiommu_mode``
    switch.  ``type1_options`` go to ``Type1Driver`` (its ``abi`` is ``vfio.abi``
unless given).
    """
    type1_options.setdefault("abi", vfio.abi)
    type1 = Type1Driver(**type1_options)
    noiommu_driver = NoIommuDriver(enable_unsafe_noiommu_mode=noiommu, fault_log=type1.fault_log)
    vfio.register_iommu_driver(noiommu_driver)
    vfio.register_iommu_driver(type1)
    return type1, noiommu_driver


__all__ = [
    "CLIENT_MEMORY", "DIRTY_BITMAP_SIZE_MAX", "DMA_ENTRY_LIMIT", "DmaList", "DmaMapping", "FAULT_LOG_SIZE",
    "Fault", "FaultLog", "INTEL_VTD_PGSIZES", "IommuFault", "NoIommu", "NoIommuDriver", "Q35_VTD_APERTURE",
    "READ_NOT_PERMITTED", "Type1DmaSpace", "Type1Driver", "Type1Iommu", "UNMAPPED", "VADDR_INVALIDATED",
    "WRITE_NOT_PERMITTED", "X86_MSI_WINDOW", "iova_ranges", "register_default_drivers",
]
