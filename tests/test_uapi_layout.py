"""The ctypes layouts and ioctl numbers against the C compiler and the system <linux/vfio.h>.

A C program is generated from the Python tables, compiled against the
installed header, and prints sizeof/offsetof of every struct and field and
the value of every ioctl number and constant; each line must match Python.
Structs newer than the installed header are compiled only when the header
defines their ioctl.
"""

import ctypes
import shutil
import subprocess

import pytest

from cuse_vfio import uapi
from cuse_vfio.uapi import ioctls

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to compile the layout probe")


def _struct_lines():
    lines, expected = [], {}
    for name, ctype in uapi.STRUCTS.items():
        guard = uapi.NEWER_THAN_6_1.get(name)
        body = [f'printf("sizeof {name} %zu\\n", sizeof(struct {name}));']
        expected[f"sizeof {name}"] = ctypes.sizeof(ctype)
        anonymous = getattr(ctype, "_anonymous_", ())
        for field, ftype in ctype._fields_:
            if field in anonymous:
                # C's anonymous union: its members are fields of the struct itself
                for member, _ in ftype._fields_:
                    body.append(f'printf("offsetof {name}.{member} %zu\\n", offsetof(struct {name}, {member}));')
                    expected[f"offsetof {name}.{member}"] = getattr(ctype, member).offset
                continue
            body.append(f'printf("offsetof {name}.{field} %zu\\n", offsetof(struct {name}, {field}));')
            expected[f"offsetof {name}.{field}"] = getattr(ctype, field).offset
        if guard:
            lines.append(f"#ifdef {guard}")
        lines.extend(body)
        if guard:
            lines.append("#endif")
    return lines, expected


def _constant_lines():
    lines, expected = [], {}
    for name, value in vars(ioctls).items():
        if not name.startswith("VFIO_") or not isinstance(value, int) or isinstance(value, bool):
            continue
        # enum members are not macros: those are printed by _ENUMS below
        lines += [f"#ifdef {name}", f'printf("const {name} %llu\\n", (unsigned long long)({name}));', "#endif"]
        expected[f"const {name}"] = value
    return lines, expected


_ENUMS = [n for n in vars(ioctls) if n.startswith(("VFIO_PCI_", "VFIO_CCW_")) and n.endswith(("_INDEX", "_REGIONS", "_IRQS"))]
_MIG_STATES = [n for n in vars(ioctls) if n.startswith("VFIO_DEVICE_STATE_") and "V1" not in n and n != "VFIO_DEVICE_STATE_MASK"]


def _run_probe(tmp_path):
    s_lines, s_expected = _struct_lines()
    c_lines, c_expected = _constant_lines()
    enum_lines = [f'printf("const {n} %lld\\n", (long long){n});' for n in _ENUMS + _MIG_STATES]
    src = "\n".join(["#include <stddef.h>", "#include <stdio.h>", "#include <linux/vfio.h>",
                     "int main(void) {", *s_lines, *c_lines, *enum_lines, "return 0; }"])
    (tmp_path / "probe.c").write_text(src)
    subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(tmp_path / "probe"), str(tmp_path / "probe.c")],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(tmp_path / "probe")], check=True, capture_output=True, text=True).stdout
    got = {}
    for line in out.splitlines():
        key, value = line.rsplit(" ", 1)
        got[key] = int(value)
    expected = {**s_expected, **c_expected}
    for n in _ENUMS + _MIG_STATES:
        expected[f"const {n}"] = getattr(ioctls, n)
    return got, expected


def test_every_struct_size_and_offset_matches_the_c_compiler(tmp_path):
    got, expected = _run_probe(tmp_path)
    checked = [k for k in got if not k.startswith("const ")]
    mismatches = {k: (expected[k], got[k]) for k in checked if expected[k] != got[k]}
    assert not mismatches, f"python layout != C layout (python, C): {mismatches}"
    # every struct of the 6.1 header was compiled, not skipped
    for name in uapi.STRUCTS:
        if name not in uapi.NEWER_THAN_6_1:
            assert f"sizeof {name}" in got, name
    assert len(checked) > 150


def test_every_constant_the_header_defines_has_the_same_value(tmp_path):
    got, expected = _run_probe(tmp_path)
    consts = [k for k in got if k.startswith("const ")]
    # (1 << 31) is a negative int in C, used as a __u32: compare 32-bit values as 32 bits
    mismatches = {k: (expected[k], got[k]) for k in consts
                  if expected[k] != (got[k] & 0xFFFFFFFF if expected[k] < 1 << 32 else got[k])}
    assert not mismatches, f"python value != C value (python, C): {mismatches}"
    # the ioctl numbers themselves are among what was compared
    for name in ("VFIO_GET_API_VERSION", "VFIO_IOMMU_MAP_DMA", "VFIO_DEVICE_FEATURE", "VFIO_EEH_PE_OP"):
        assert f"const {name}" in consts


def test_container_and_device_numbers_overlap_and_lookup_is_by_kind():
    assert uapi.VFIO_IOMMU_GET_INFO == uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO
    assert uapi.ioctl_name(uapi.NodeKind.CONTAINER, uapi.VFIO_IOMMU_GET_INFO) == "VFIO_IOMMU_GET_INFO"
    assert uapi.ioctl_name(uapi.NodeKind.DEVICE, uapi.VFIO_IOMMU_GET_INFO) == "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO"
    assert uapi.ioctl_name(uapi.NodeKind.GROUP, uapi.VFIO_IOMMU_GET_INFO) is None
    assert uapi.ioctl_names(uapi.NodeKind.CONTAINER, uapi.VFIO_IOMMU_DIRTY_PAGES) == (
        "VFIO_IOMMU_DIRTY_PAGES", "VFIO_IOMMU_SPAPR_REGISTER_MEMORY")
    # _IO(';', 100 + n): no size or direction bits
    assert uapi.VFIO_GET_API_VERSION == (ord(";") << 8) | 100


def test_every_struct_the_system_header_declares_has_a_layout():
    import re

    header = subprocess.run(["gcc", "-E", "-P", "-x", "c", "-", "-include", "linux/vfio.h"], input="",
                            check=True, capture_output=True, text=True).stdout
    declared = set(re.findall(r"\bstruct\s+(vfio_\w+)\s*\{", header))
    assert len(declared) > 30
    missing = declared - set(uapi.STRUCTS)
    assert not missing, f"structs of <linux/vfio.h> with no ctypes layout: {sorted(missing)}"


def test_capability_chain_offsets_are_from_the_info_start_and_argsz_grows_when_short():
    chain = uapi.CapChain()
    chain.add(uapi.VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1, bytes(8) + bytes(uapi.vfio_region_sparse_mmap_area(0, 4096)))
    chain.add(uapi.VFIO_REGION_INFO_CAP_TYPE, 1, bytes(uapi.vfio_region_info_cap_type())[8:])
    info = uapi.vfio_region_info(argsz=ctypes.sizeof(uapi.vfio_region_info))
    assert chain.place(info, uapi.VFIO_REGION_INFO_FLAG_CAPS) == b""
    assert info.flags & uapi.VFIO_REGION_INFO_FLAG_CAPS and info.cap_offset == 0
    assert info.argsz == 32 + 32 + 16
    data = chain.place(info, uapi.VFIO_REGION_INFO_FLAG_CAPS)
    assert info.cap_offset == 32 and len(data) == 48
    caps = uapi.parse_caps(bytes(info) + data, info.cap_offset)
    assert [(c.id, c.version, c.offset) for c in caps] == [(1, 1, 32), (2, 1, 64)]
    assert uapi.vfio_region_sparse_mmap_area.from_buffer_copy(caps[0].body, 8).size == 4096
    with pytest.raises(ValueError):
        uapi.parse_caps(bytes(32), 40)  # a cap_offset past the end of the buffer
    looping = bytearray(64)
    looping[32:40] = bytes(uapi.vfio_info_cap_header(1, 1, 32))
    with pytest.raises(ValueError):
        uapi.parse_caps(bytes(looping), 32)


def test_decoder_names_the_ioctl_fields_flags_and_errno():
    dma = uapi.vfio_iommu_type1_dma_map(argsz=32, flags=3, vaddr=0x1000, iova=0x2000, size=0x1000)
    rec = uapi.decode(uapi.NodeKind.CONTAINER, uapi.VFIO_IOMMU_MAP_DMA, bytes(dma), None, -17)
    assert rec["ioctl"] == "VFIO_IOMMU_MAP_DMA" and rec["errno"] == "EEXIST"
    assert rec["in"]["iova"] == 0x2000
    assert rec["in"]["flags_names"] == ["VFIO_DMA_MAP_FLAG_READ", "VFIO_DMA_MAP_FLAG_WRITE"]
    # the same number on a device fd is another ioctl
    rec = uapi.decode(uapi.NodeKind.DEVICE, uapi.VFIO_IOMMU_MAP_DMA, None, None, -25)
    assert rec["ioctl"] == "VFIO_DEVICE_PCI_HOT_RESET" and rec["errno"] == "ENOTTY"
    rec = uapi.decode(uapi.NodeKind.CONTAINER, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU, None, 0)
    assert rec["in"]["extension"] == "VFIO_TYPE1v2_IOMMU" and "errno" not in rec
    rec = uapi.decode(uapi.NodeKind.GROUP, uapi.VFIO_GROUP_GET_DEVICE_FD, b"0000:00:02.0\0", None, 5)
    assert rec["in"] == {"name": "0000:00:02.0"} and rec["result"] == 5
    irq = bytes(uapi.vfio_irq_set(argsz=24, flags=uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER,
                                  index=1, count=1)) + (7).to_bytes(4, "little")
    rec = uapi.decode(uapi.NodeKind.DEVICE, uapi.VFIO_DEVICE_SET_IRQS, irq, None, 0)
    assert rec["in"]["fds"] == [7]
    # a short copy says how much crossed and shows only the fields that did
    rec = uapi.decode(uapi.NodeKind.GROUP, uapi.VFIO_GROUP_GET_STATUS, b"\x08\0\0\0", None, -22)
    assert rec["in"] == {"argsz": 8, "truncated": 4}


def test_decoder_reads_device_feature_flags_as_a_feature_number_and_operations():
    arg = bytes(uapi.vfio_device_feature(argsz=8, flags=uapi.VFIO_DEVICE_FEATURE_SET
                                         | uapi.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY))
    rec = uapi.decode(uapi.NodeKind.DEVICE, uapi.VFIO_DEVICE_FEATURE, arg, None, 0)
    assert rec["in"]["feature"] == "VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY"
    assert rec["in"]["flags_names"] == ["VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY", "VFIO_DEVICE_FEATURE_SET"]


def test_the_handoff_wire_format_matches_its_header(tmp_path):
    # The hand-off protocol between the preload library and the server is defined once,
    # in csrc/handoff.h; the server's ctypes structs and constants must read the same.
    import os

    from cuse_vfio.transport import handoff

    csrc = os.path.join(os.path.dirname(__file__), "..", "csrc")
    lines, expected = [], {}
    for name, ctype in handoff.WIRE_STRUCTS.items():
        lines.append(f'printf("sizeof {name} %zu\\n", sizeof(struct {name}));')
        expected[f"sizeof {name}"] = ctypes.sizeof(ctype)
        for field, _ in ctype._fields_:
            lines.append(f'printf("offsetof {name}.{field} %zu\\n", offsetof(struct {name}, {field}));')
            expected[f"offsetof {name}.{field}"] = getattr(ctype, field).offset
    for name, value in handoff.WIRE_CONSTANTS.items():
        lines.append(f'printf("const {name} %lld\\n", (long long)({name}));')
        expected[f"const {name}"] = value
    src = "\n".join(["#include <stddef.h>", "#include <stdio.h>", '#include "handoff.h"',
                     "int main(void) {", *lines, "return 0; }"])
    (tmp_path / "handoff_probe.c").write_text(src)
    subprocess.run(["gcc", "-Wall", "-Werror", "-I", csrc, "-o", str(tmp_path / "handoff_probe"),
                    str(tmp_path / "handoff_probe.c")], check=True, capture_output=True, text=True)
    out = subprocess.run([str(tmp_path / "handoff_probe")], check=True, capture_output=True, text=True).stdout
    got = dict((key, int(value)) for key, value in (line.rsplit(" ", 1) for line in out.splitlines()))
    assert got == expected
    # and what the server packs is exactly those bytes
    assert handoff.MMAP_REQUEST.size == ctypes.sizeof(handoff.cv_mmap_request)
    assert handoff.MMAP_REPLY.size == ctypes.sizeof(handoff.cv_mmap_reply)
