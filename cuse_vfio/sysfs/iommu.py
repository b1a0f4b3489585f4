"""The IOMMU hardware unit in front of the emulated devices: QEMU's intel-iommu as ``dmar0``.

The emulated type1 driver is QEMU's VT-d under ``-device intel-iommu,intremap=on``
(4 KiB pages with 2 MiB and 1 GiB superpages, a 39-bit aperture by default,
the MSI window reserved), and a kernel shows that unit in sysfs::

    /sys/devices/virtual/iommu/dmar0/intel-iommu/   address cap ecap version domains_supported
    /sys/devices/virtual/iommu/dmar0/devices/<bdf>  -> the PCI function
    /sys/devices/virtual/iommu/dmar0/subsystem      -> ../../../../class/iommu
    /sys/class/iommu/dmar0                          -> ../../devices/virtual/iommu/dmar0
    /sys/bus/pci/devices/<bdf>/iommu                -> ../../../devices/virtual/iommu/dmar0

DPDK reads ``<bdf>/iommu/intel-iommu/cap`` to learn the IOMMU's address
width (``pci_device_iommu_support_va``: MGAW, bits 16-21, plus one) and
limits its IOVAs to it; without the file it assumes no limit.

Formats (``drivers/iommu/intel/iommu.c``): ``address`` ``"%llx\\n"`` of the
register base, ``cap``/``ecap`` ``"%llx\\n"``, ``version`` ``"%d:%d\\n"``,
``domains_supported`` ``"%ld\\n"`` (``cap_ndoms``).  The registers are QEMU's
(``hw/i386/intel_iommu.c``, ``vtd_cap_init``), derived here from the
aperture and page sizes; Debian's 6.1 in the vfio VM (QEMU 7.2, the
defaults) shows ``cap`` d2008c22260206, ``ecap`` f00f4a, ``address``
fed90000, ``version`` 1:0.  ``domains_used`` (which domain ids the driver
has handed out) is not served: the emulation has no domain ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from .tree import SysfsViewError

SZ_2M, SZ_1G = 1 << 21, 1 << 30

#: Q35_HOST_BRIDGE_IOMMU_ADDR: where QEMU puts the VT-d registers
Q35_VTD_ADDRESS = 0xFED90000
#: VTD_VER_REG: version 1.0
VTD_VERSION = (1, 0)

# Capability register (VT-d spec 11.4.2) as QEMU fills it.
CAP_ND = 6                    # number of domains: 2^(4 + 2 * 6) = 65536 (16-bit domain ids)
CAP_SAGAW_SHIFT = 8           # bit 1: 39-bit (3-level), bit 2: 48-bit (4-level), bit 3: 57-bit tables
CAP_MGAW_SHIFT = 16           # maximum guest address width - 1
CAP_FRO_SHIFT = 24            # fault recording registers at 16 * FRO: QEMU's DMAR_FRCD_REG_OFFSET 0x220
VTD_FRCD_OFFSET = 0x220
CAP_SLLPS_SHIFT = 34          # bit 0: 2 MiB, bit 1: 1 GiB second-level pages
CAP_PSI = 1 << 39             # page-selective invalidation
CAP_NFR_SHIFT = 40            # fault recording registers - 1: QEMU has one
CAP_MAMV_SHIFT = 48           # maximum address mask value: QEMU's VTD_MAMV 18
VTD_MAMV = 18
CAP_DWD, CAP_DRD = 1 << 54, 1 << 55   # write and read draining (dma-drain=on, the default)

# Extended capability register as QEMU fills it with intremap=on (no x2apic, so no EIM).
ECAP_QI = 1 << 1              # queued invalidation
ECAP_IR = 1 << 3              # interrupt remapping
ECAP_PT = 1 << 6              # pass-through
ECAP_IRO_SHIFT = 8            # IOTLB registers at 16 * IRO: QEMU's DMAR_IOTLB_REG_OFFSET 0xf0
VTD_IOTLB_OFFSET = 0xF0
ECAP_MHMV_SHIFT = 20          # maximum handle mask value: 15
VTD_MHMV = 15

#: Address widths QEMU's intel-iommu offers (aw-bits)
VTD_ADDRESS_WIDTHS = (39, 48)


@dataclass(frozen=True)
class SysfsIommu:
    """One IOMMU unit as ``/sys/devices/virtual/iommu/<name>`` shows it."""

    name: str
    cap: int
    ecap: int
    address: int = Q35_VTD_ADDRESS
    version: Tuple[int, int] = VTD_VERSION

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise SysfsViewError(f"IOMMU unit {self.name!r}: the name is one path component, like dmar0")
        for what in ("cap", "ecap", "address"):
            value = getattr(self, what)
            if not isinstance(value, int) or not 0 <= value < 1 << 64:
                raise SysfsViewError(f"IOMMU unit {self.name}: {what} {value!r} is not a 64-bit register")

    @property
    def address_width(self) -> int:
        """MGAW + 1: what DPDK takes as its DMA mask."""
        return (self.cap >> CAP_MGAW_SHIFT & 0x3F) + 1

    @property
    def domains_supported(self) -> int:
        """``cap_ndoms``."""
        return 1 << (4 + 2 * (self.cap & 0x7))


def qemu_vtd(aperture: Tuple[int, int], pgsize_bitmap: int, name: str = "dmar0", *,
             intremap: bool = True) -> Optional[SysfsIommu]:
    """The VT-d unit QEMU would offer for this type1 domain, or None when QEMU has none like it.

    ``aperture`` is the domain's inclusive IOVA range, which ``aw-bits``
    fixes at ``[0, 2^aw - 1]``; ``pgsize_bitmap`` its page sizes, whose
    superpages are the capability's SLLPS; ``intremap`` QEMU's option of
    that name (ECAP.IR).
    """
    start, end = aperture
    width = (end + 1).bit_length() - 1
    if start != 0 or end + 1 != 1 << width or width not in VTD_ADDRESS_WIDTHS:
        return None
    sagaw = sum(1 << level for level, bits in ((1, 39), (2, 48), (3, 57)) if bits <= width)
    sllps = (1 if pgsize_bitmap & SZ_2M else 0) | (2 if pgsize_bitmap & SZ_1G else 0)
    cap = (CAP_ND | sagaw << CAP_SAGAW_SHIFT | (width - 1) << CAP_MGAW_SHIFT
           | (VTD_FRCD_OFFSET >> 4) << CAP_FRO_SHIFT | sllps << CAP_SLLPS_SHIFT | CAP_PSI
           | 0 << CAP_NFR_SHIFT | VTD_MAMV << CAP_MAMV_SHIFT | CAP_DWD | CAP_DRD)
    ecap = (ECAP_QI | (ECAP_IR if intremap else 0) | ECAP_PT | (VTD_IOTLB_OFFSET >> 4) << ECAP_IRO_SHIFT
            | VTD_MHMV << ECAP_MHMV_SHIFT)
    return SysfsIommu(name, cap=cap, ecap=ecap)


#: ``intel-iommu/`` attributes, in ``ls`` order: name -> content.
INTEL_IOMMU_ATTRIBUTES = (
    ("address", lambda u: f"{u.address:x}\n"),
    ("cap", lambda u: f"{u.cap:x}\n"),
    ("domains_supported", lambda u: f"{u.domains_supported}\n"),
    ("ecap", lambda u: f"{u.ecap:x}\n"),
    ("version", lambda u: f"{u.version[0]}:{u.version[1]}\n"),
)
