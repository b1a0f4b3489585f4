"""The structures of ``<linux/vfio.h>`` as ctypes layouts, named exactly as in C.

Little-endian x86-64 layouts with C's natural alignment (``__aligned_u64``
is an ordinary ``c_uint64`` here, which already has 8-byte alignment on
x86-64).  A flexible array member (``u8 data[]``) is a zero-length array
field, so ``sizeof`` and ``offsetof`` agree with the C compiler; the layout
test (``tests/test_uapi_layout.py``) compiles a C program against the
system header and compares every size and offset.

``offsetofend(struct, field)`` is the kernel macro the ``minsz`` of every
VFIO ioctl is written with.
"""

from __future__ import annotations

import ctypes
from ctypes import c_int32 as s32
from ctypes import c_uint8 as u8
from ctypes import c_uint16 as u16
from ctypes import c_uint32 as u32
from ctypes import c_uint64 as u64
from typing import Dict, Type


class _Struct(ctypes.LittleEndianStructure):
    """Base of every VFIO structure: repr and dict of its named fields."""

    def fields(self) -> Dict[str, object]:
        out: Dict[str, object] = {}
        for name, *_ in self._fields_:
            if name.startswith("_"):
                continue
            value = getattr(self, name)
            if isinstance(value, ctypes.Array):
                if len(value) == 0:
                    continue
                value = [v.fields() if isinstance(v, _Struct) else v for v in value]
            elif isinstance(value, _Struct):
                value = value.fields()
            out[name] = value
        return out

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.fields().items())
        return f"{type(self).__name__}({inner})"


def _flex(ctype) -> type:
    """A C flexible array member: occupies no space, aligns like its element."""
    return ctype * 0


def offsetofend(ctype: type, field: str) -> int:
    """The kernel's offsetofend(TYPE, MEMBER): where ``field`` ends."""
    f = getattr(ctype, field)
    return f.offset + f.size


# -- common -------------------------------------------------------------------
class vfio_info_cap_header(_Struct):
    _fields_ = [("id", u16), ("version", u16), ("next", u32)]


class vfio_group_status(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32)]


# -- device ------------------------------------------------------------------------
class vfio_device_info(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("num_regions", u32), ("num_irqs", u32),
                ("cap_offset", u32)]


class vfio_region_info(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("index", u32), ("cap_offset", u32),
                ("size", u64), ("offset", u64)]


class vfio_region_sparse_mmap_area(_Struct):
    _fields_ = [("offset", u64), ("size", u64)]


class vfio_region_info_cap_sparse_mmap(_Struct):
    _fields_ = [("header", vfio_info_cap_header), ("nr_areas", u32), ("reserved", u32),
                ("areas", _flex(vfio_region_sparse_mmap_area))]


class vfio_region_info_cap_type(_Struct):
    _fields_ = [("header", vfio_info_cap_header), ("type", u32), ("subtype", u32)]


class vfio_region_gfx_edid(_Struct):
    _fields_ = [("edid_offset", u32), ("edid_max_size", u32), ("edid_size", u32),
                ("max_xres", u32), ("max_yres", u32), ("link_state", u32)]


class vfio_device_migration_info(_Struct):
    _fields_ = [("device_state", u32), ("reserved", u32), ("pending_bytes", u64),
                ("data_offset", u64), ("data_size", u64)]


class vfio_region_info_cap_nvlink2_ssatgt(_Struct):
    _fields_ = [("header", vfio_info_cap_header), ("tgt", u64)]


class vfio_region_info_cap_nvlink2_lnkspd(_Struct):
    _fields_ = [("header", vfio_info_cap_header), ("link_speed", u32), ("__pad", u32)]


class vfio_irq_info(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("index", u32), ("count", u32)]


class vfio_irq_set(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("index", u32), ("start", u32),
                ("count", u32), ("data", _flex(u8))]


class vfio_pci_dependent_device(_Struct):
    _fields_ = [("group_id", u32), ("segment", u16), ("bus", u8), ("devfn", u8)]


class vfio_pci_hot_reset_info(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("count", u32),
                ("devices", _flex(vfio_pci_dependent_device))]


class vfio_pci_hot_reset(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("count", u32), ("group_fds", _flex(s32))]


class _gfx_plane_union(ctypes.Union):
    _fields_ = [("region_index", u32), ("dmabuf_id", u32)]


class vfio_device_gfx_plane_info(_Struct):
    _anonymous_ = ("_u",)
    _fields_ = [("argsz", u32), ("flags", u32), ("drm_plane_type", u32), ("drm_format", u32),
                ("drm_format_mod", u64), ("width", u32), ("height", u32), ("stride", u32),
                ("size", u32), ("x_pos", u32), ("y_pos", u32), ("x_hot", u32), ("y_hot", u32),
                ("_u", _gfx_plane_union)]

    def fields(self) -> Dict[str, object]:
        out = super().fields()
        out["region_index"] = self.region_index
        return out


class vfio_device_ioeventfd(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("offset", u64), ("data", u64), ("fd", s32)]


class vfio_device_feature(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("data", _flex(u8))]


class vfio_device_feature_migration(_Struct):
    _fields_ = [("flags", u64)]


class vfio_device_feature_mig_state(_Struct):
    _fields_ = [("device_state", u32), ("data_fd", s32)]


class vfio_device_low_power_entry_with_wakeup(_Struct):
    _fields_ = [("wakeup_eventfd", s32), ("reserved", u32)]


class vfio_device_feature_dma_logging_control(_Struct):
    _fields_ = [("page_size", u64), ("num_ranges", u32), ("__reserved", u32), ("ranges", u64)]


class vfio_device_feature_dma_logging_range(_Struct):
    _fields_ = [("iova", u64), ("length", u64)]


class vfio_device_feature_dma_logging_report(_Struct):
    _fields_ = [("iova", u64), ("length", u64), ("page_size", u64), ("bitmap", u64)]


# Newer than Linux 6.1 (the iommufd device cdev, Linux 6.6 and later).
class vfio_device_bind_iommufd(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("iommufd", s32), ("out_devid", u32),
                ("token_uuid_ptr", u64)]


class vfio_device_attach_iommufd_pt(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("pt_id", u32), ("pasid", u32)]


class vfio_device_detach_iommufd_pt(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("pasid", u32)]


# -- type1 IOMMU -----------------------------------------------------------------------
class vfio_iommu_type1_info(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("iova_pgsizes", u64), ("cap_offset", u32)]


class vfio_iova_range(_Struct):
    _fields_ = [("start", u64), ("end", u64)]


class vfio_iommu_type1_info_cap_iova_range(_Struct):
    _fields_ = [("header", vfio_info_cap_header), ("nr_iovas", u32), ("reserved", u32),
                ("iova_ranges", _flex(vfio_iova_range))]


class vfio_iommu_type1_info_cap_migration(_Struct):
    _fields_ = [("header", vfio_info_cap_header), ("flags", u32), ("pgsize_bitmap", u64),
                ("max_dirty_bitmap_size", u64)]


class vfio_iommu_type1_info_dma_avail(_Struct):
    _fields_ = [("header", vfio_info_cap_header), ("avail", u32)]


class vfio_iommu_type1_dma_map(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("vaddr", u64), ("iova", u64), ("size", u64)]


class vfio_bitmap(_Struct):
    _fields_ = [("pgsize", u64), ("size", u64), ("data", u64)]  # data: __u64 __user *


class vfio_iommu_type1_dma_unmap(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("iova", u64), ("size", u64), ("data", _flex(u8))]


class vfio_iommu_type1_dirty_bitmap(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("data", _flex(u8))]


class vfio_iommu_type1_dirty_bitmap_get(_Struct):
    _fields_ = [("iova", u64), ("size", u64), ("bitmap", vfio_bitmap)]


# -- SPAPR TCE IOMMU and EEH (POWER) -----------------------------------------------------
class vfio_iommu_spapr_tce_ddw_info(_Struct):
    _fields_ = [("pgsizes", u64), ("max_dynamic_windows_supported", u32), ("levels", u32)]


class vfio_iommu_spapr_tce_info(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("dma32_window_start", u32),
                ("dma32_window_size", u32), ("ddw", vfio_iommu_spapr_tce_ddw_info)]


class vfio_eeh_pe_err(_Struct):
    _fields_ = [("type", u32), ("func", u32), ("addr", u64), ("mask", u64)]


class _eeh_pe_op_union(ctypes.Union):
    _fields_ = [("err", vfio_eeh_pe_err)]


class vfio_eeh_pe_op(_Struct):
    _anonymous_ = ("_u",)
    _fields_ = [("argsz", u32), ("flags", u32), ("op", u32), ("_u", _eeh_pe_op_union)]


class vfio_iommu_spapr_register_memory(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("vaddr", u64), ("size", u64)]


class vfio_iommu_spapr_tce_create(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("page_shift", u32), ("__resv1", u32),
                ("window_size", u64), ("levels", u32), ("__resv2", u32), ("start_addr", u64)]


class vfio_iommu_spapr_tce_remove(_Struct):
    _fields_ = [("argsz", u32), ("flags", u32), ("start_addr", u64)]


#: every structure by its C name (the layout test walks this).
STRUCTS: Dict[str, Type[_Struct]] = {
    name: obj for name, obj in list(globals().items())
    if isinstance(obj, type) and issubclass(obj, _Struct) and obj is not _Struct
}

#: structures newer than the Linux 6.1 header, with the ioctl whose #define says the header has them
NEWER_THAN_6_1: Dict[str, str] = {
    "vfio_device_bind_iommufd": "VFIO_DEVICE_BIND_IOMMUFD",
    "vfio_device_attach_iommufd_pt": "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
    "vfio_device_detach_iommufd_pt": "VFIO_DEVICE_DETACH_IOMMUFD_PT",
}
