"""The decoder: one ioctl as a person reads it.

``decode(kind, cmd, arg_in, arg_out, result)`` turns what crossed the
boundary (the bytes the server copied in from the caller, the bytes it copied
out, the return value) into a record: the ioctl's C name, the fields of its
structure in and out with flag bits named, and the result or the errno name.
``--trace`` files are these records as JSON lines.
"""

from __future__ import annotations

import ctypes
import errno as _errno
from typing import Callable, Dict, List, Optional, Tuple, Union

from . import ioctls as _ioctls
from . import structs as _s
from .caps import parse_caps
from .ioctls import EXTENSION_NAMES, NodeKind, ioctl_name

Bytes = Union[bytes, bytearray]


def _flag_names(prefix: str) -> List[Tuple[int, str]]:
    """Single-bit constants whose C name starts with ``prefix``, lowest bit first."""
    found: Dict[int, str] = {}
    for name, value in vars(_ioctls).items():
        if name.startswith(prefix) and isinstance(value, int) and value and value & (value - 1) == 0:
            found.setdefault(value, name)
    return sorted(found.items())


def _names_of(value: int, table: List[Tuple[int, str]]) -> List[str]:
    names = [name for bit, name in table if value & bit]
    rest = value & ~sum(bit for bit, _ in table)
    if rest:
        names.append(hex(rest))
    return names


class _Layout:
    """How one ioctl's argument reads: a struct, its flag names, what trails it."""

    def __init__(self, ctype=None, flags: str = "", trailing: Optional[Callable[[object, bytes], Dict]] = None,
                 value: Optional[Callable[[int], Dict]] = None):
        self.ctype = ctype
        self.flags = _flag_names(flags) if flags else []
        self.trailing = trailing
        self.value = value

    def fields(self, data: Optional[Bytes]) -> Optional[Dict[str, object]]:
        if data is None or self.ctype is None:
            return None
        size = ctypes.sizeof(self.ctype)
        obj = self.ctype.from_buffer_copy(bytes(data[:size]).ljust(size, b"\0"))
        out = obj.fields()
        if len(data) < size:
            # Only the first len(data) bytes crossed: say so, and drop fields that did not.
            out = {k: v for k, v in out.items()
                   if getattr(self.ctype, k, None) is None or getattr(self.ctype, k).offset < len(data)}
            out["truncated"] = len(data)
        if self.flags and "flags" in out:
            out["flags_names"] = _names_of(out["flags"], self.flags)
        if self.trailing is not None and len(data) > size:
            out.update(self.trailing(obj, bytes(data)))
        return out


def _irq_set_data(obj, data: bytes) -> Dict:
    body = data[ctypes.sizeof(obj):]
    if obj.flags & _ioctls.VFIO_IRQ_SET_DATA_EVENTFD:
        return {"fds": [int.from_bytes(body[i:i + 4], "little", signed=True)
                        for i in range(0, len(body) - len(body) % 4, 4)]}
    if obj.flags & _ioctls.VFIO_IRQ_SET_DATA_BOOL:
        return {"bools": list(body)}
    return {}


def _array_of(ctype, key: str):
    def trailing(obj, data: bytes) -> Dict:
        body = data[ctypes.sizeof(obj):]
        size = ctypes.sizeof(ctype)
        return {key: [ctype.from_buffer_copy(body, i).fields() for i in range(0, len(body) - size + 1, size)]}
    return trailing


def _group_fds(obj, data: bytes) -> Dict:
    body = data[ctypes.sizeof(obj):]
    return {"group_fds": [int.from_bytes(body[i:i + 4], "little", signed=True)
                          for i in range(0, len(body) - len(body) % 4, 4)]}


def _caps(obj, data: bytes) -> Dict:
    if not getattr(obj, "cap_offset", 0):
        return {}
    try:
        return {"caps": [{"id": c.id, "version": c.version, "offset": c.offset, "body": c.body.hex()}
                         for c in parse_caps(data, obj.cap_offset)]}
    except ValueError as e:
        return {"caps_error": str(e)}


_FEATURES = {value: name for name, value in vars(_ioctls).items()
             if name.startswith("VFIO_DEVICE_FEATURE_") and isinstance(value, int)
             and value <= _ioctls.VFIO_DEVICE_FEATURE_MASK and name != "VFIO_DEVICE_FEATURE_MASK"}
_FEATURE_OPS = [(_ioctls.VFIO_DEVICE_FEATURE_GET, "VFIO_DEVICE_FEATURE_GET"),
                (_ioctls.VFIO_DEVICE_FEATURE_SET, "VFIO_DEVICE_FEATURE_SET"),
                (_ioctls.VFIO_DEVICE_FEATURE_PROBE, "VFIO_DEVICE_FEATURE_PROBE")]


class _FeatureLayout(_Layout):
    """VFIO_DEVICE_FEATURE: the low 16 bits of flags are a feature number, not bits."""

    def fields(self, data: Optional[Bytes]) -> Optional[Dict[str, object]]:
        out = super().fields(data)
        flags = out.get("flags") if out is not None else None
        if out is not None and isinstance(flags, int):
            feature = flags & _ioctls.VFIO_DEVICE_FEATURE_MASK
            name = _FEATURES.get(feature, str(feature))
            out["feature"] = name
            out["flags_names"] = [name] + _names_of(flags & ~_ioctls.VFIO_DEVICE_FEATURE_MASK, _FEATURE_OPS)
        return out


def _feature(obj, data: bytes) -> Dict:
    body = data[ctypes.sizeof(obj):]
    return {"data": body.hex()} if body else {}


def _extension(value: int) -> Dict:
    return {"arg": value, "extension": EXTENSION_NAMES.get(value, str(value))}


_LAYOUTS: Dict[str, _Layout] = {
    "VFIO_CHECK_EXTENSION": _Layout(value=_extension),
    "VFIO_SET_IOMMU": _Layout(value=_extension),
    "VFIO_GROUP_GET_STATUS": _Layout(_s.vfio_group_status, "VFIO_GROUP_FLAGS_"),
    "VFIO_DEVICE_GET_INFO": _Layout(_s.vfio_device_info, "VFIO_DEVICE_FLAGS_", _caps),
    "VFIO_DEVICE_GET_REGION_INFO": _Layout(_s.vfio_region_info, "VFIO_REGION_INFO_FLAG_", _caps),
    "VFIO_DEVICE_GET_IRQ_INFO": _Layout(_s.vfio_irq_info, "VFIO_IRQ_INFO_"),
    "VFIO_DEVICE_SET_IRQS": _Layout(_s.vfio_irq_set, "VFIO_IRQ_SET_", _irq_set_data),
    "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO": _Layout(_s.vfio_pci_hot_reset_info, "",
                                                  _array_of(_s.vfio_pci_dependent_device, "devices")),
    "VFIO_DEVICE_PCI_HOT_RESET": _Layout(_s.vfio_pci_hot_reset, "", _group_fds),
    "VFIO_DEVICE_QUERY_GFX_PLANE": _Layout(_s.vfio_device_gfx_plane_info, "VFIO_GFX_PLANE_TYPE_"),
    "VFIO_DEVICE_IOEVENTFD": _Layout(_s.vfio_device_ioeventfd, "VFIO_DEVICE_IOEVENTFD_"),
    "VFIO_DEVICE_FEATURE": _FeatureLayout(_s.vfio_device_feature, trailing=_feature),
    "VFIO_DEVICE_BIND_IOMMUFD": _Layout(_s.vfio_device_bind_iommufd, "VFIO_DEVICE_BIND_FLAG_"),
    "VFIO_DEVICE_ATTACH_IOMMUFD_PT": _Layout(_s.vfio_device_attach_iommufd_pt, "VFIO_DEVICE_ATTACH_"),
    "VFIO_DEVICE_DETACH_IOMMUFD_PT": _Layout(_s.vfio_device_detach_iommufd_pt, "VFIO_DEVICE_DETACH_"),
    "VFIO_IOMMU_GET_INFO": _Layout(_s.vfio_iommu_type1_info, "VFIO_IOMMU_INFO_", _caps),
    "VFIO_IOMMU_MAP_DMA": _Layout(_s.vfio_iommu_type1_dma_map, "VFIO_DMA_MAP_FLAG_"),
    "VFIO_IOMMU_UNMAP_DMA": _Layout(_s.vfio_iommu_type1_dma_unmap, "VFIO_DMA_UNMAP_FLAG_",
                                    _array_of(_s.vfio_bitmap, "bitmap")),
    "VFIO_IOMMU_DIRTY_PAGES": _Layout(_s.vfio_iommu_type1_dirty_bitmap, "VFIO_IOMMU_DIRTY_PAGES_FLAG_",
                                      _array_of(_s.vfio_iommu_type1_dirty_bitmap_get, "range")),
    "VFIO_EEH_PE_OP": _Layout(_s.vfio_eeh_pe_op),
    "VFIO_IOMMU_SPAPR_REGISTER_MEMORY": _Layout(_s.vfio_iommu_spapr_register_memory),
    "VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY": _Layout(_s.vfio_iommu_spapr_register_memory),
    "VFIO_IOMMU_SPAPR_TCE_CREATE": _Layout(_s.vfio_iommu_spapr_tce_create),
    "VFIO_IOMMU_SPAPR_TCE_REMOVE": _Layout(_s.vfio_iommu_spapr_tce_remove),
}


def _scalar(name: str, data: Optional[Bytes]) -> Optional[Dict]:
    """Arguments that are not a struct: an int at the pointer, or a string."""
    if data is None:
        return None
    if name == "VFIO_GROUP_SET_CONTAINER" and len(data) >= 4:
        return {"fd": int.from_bytes(bytes(data[:4]), "little", signed=True)}
    if name == "VFIO_GROUP_GET_DEVICE_FD":
        return {"name": bytes(data).split(b"\0", 1)[0].decode("utf-8", "replace")}
    return {"bytes": bytes(data).hex()}


def decode(kind: NodeKind, cmd: int, arg_in: Union[int, Bytes, None], arg_out: Optional[Bytes],
           result: int) -> Dict[str, object]:
    """A record of one ioctl: ``ioctl``, ``cmd``, ``in``, ``out``, ``result`` and, on failure, ``errno``.

    ``arg_in`` is the bytes copied in from the caller, or the raw argument
    when nothing was copied (an int such as SET_IOMMU's type); ``arg_out``
    the bytes copied back, or None.
    """
    name = ioctl_name(kind, cmd)
    record: Dict[str, object] = {"ioctl": name or f"{kind.value} ioctl 0x{cmd:x}", "cmd": cmd}
    layout = _LAYOUTS.get(name or "")
    if isinstance(arg_in, int):
        if layout is not None and layout.value is not None:
            record["in"] = layout.value(arg_in)
        elif arg_in:
            record["in"] = {"arg": arg_in}
    elif arg_in is not None:
        record["in"] = layout.fields(arg_in) if layout is not None and layout.ctype else _scalar(name or "", arg_in)
    if arg_out:
        record["out"] = layout.fields(arg_out) if layout is not None and layout.ctype else _scalar(name or "", arg_out)
    record["result"] = result
    if result < 0:
        record["errno"] = _errno.errorcode.get(-result, str(-result))
    return record
