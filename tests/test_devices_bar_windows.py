"""Register windows (MmioBar.add_window): memory in a register BAR, offered as VFIO sparse mmap areas.

The region info carries VFIO_REGION_INFO_CAP_SPARSE_MMAP (version 1: nr_areas,
reserved, then {offset, size} per area) on both kernel personalities; a
mapping must lie inside the areas (EINVAL otherwise, as vfio_pci_mmap refused
one overlapping the MSI-X table before 4.16); pread/pwrite of a window and a
mapping of it are the same bytes, and the model's handlers never see them.
"""

import ctypes
import errno
import mmap
import os
import struct

import pytest
from devices_fakes import bar_read, bar_write, errno_of, ioctl, region_offset

from cuse_vfio.core import KernelAbi
from cuse_vfio.devices import IoBar, MmioBar, MsixCapability, PciDevice, VfioPciDevice, create_model
from cuse_vfio.machine import Machine
from cuse_vfio.machine.topology import TopologyError, parse
from cuse_vfio.uapi import (
    VFIO_DEVICE_GET_REGION_INFO,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP,
    VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
    vfio_region_info,
)
from cuse_vfio.uapi.caps import parse_caps

PAGE = mmap.PAGESIZE
RW = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
INFO = ctypes.sizeof(vfio_region_info)


class Windowed(PciDevice):
    """BAR0: four pages of registers, pages 1 and 3 windows; BAR2: MSI-X table in page 0, a window in page 1."""

    vendor_id, device_id = 0x1234, 0x0003

    def __init__(self, **options):
        super().__init__(**options)
        self.accesses = []
        self.written = []
        bar = self.add_bar(0, MmioBar(4 * PAGE, self._read, self._write))
        self.ids = bar.add_window(PAGE, PAGE)
        self.scratch = bar.add_window(3 * PAGE, PAGE, on_write=lambda o, s: self.written.append((o, s)))
        msix_bar = self.add_bar(2, MmioBar(2 * PAGE, self._read, self._write))
        self.info = msix_bar.add_window(PAGE, PAGE)
        self.add_capability(MsixCapability(vectors=4, table_bar=2, table_offset=0))

    def _read(self, offset, size):
        self.accesses.append(("r", offset, size))
        return 0x5A

    def _write(self, offset, size, value):
        self.accesses.append(("w", offset, size, value))


def make(fn=None, **kwargs):
    vdev = VfioPciDevice(fn if fn is not None else Windowed(), **kwargs)
    vdev.open()
    return vdev


def region_info(vdev, index, argsz):
    buf = bytearray(argsz)
    struct.pack_into("<III", buf, 0, argsz, 0, index)
    _, out = ioctl(vdev, VFIO_DEVICE_GET_REGION_INFO, bytes(buf))
    return vfio_region_info.from_buffer_copy(out[:INFO]), out


def sparse_areas(out, info):
    (cap,) = parse_caps(out, info.cap_offset)
    assert (cap.id, cap.version) == (VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1)
    nr, reserved = struct.unpack_from("<II", cap.body)
    assert reserved == 0
    return [struct.unpack_from("<QQ", cap.body, 8 + 16 * i) for i in range(nr)]


def client_map(vdev, index, pos, length):
    """What a client gets through the transport: the memfd, mapped shared at the start vfio-pci names."""
    memory, start = vdev.mmap(region_offset(index, pos), length)
    return mmap.mmap(os.dup(memory.fileno()), length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                     offset=start)


# -- GET_REGION_INFO ------------------------------------------------------------------------------
@pytest.mark.parametrize("abi", ["6.1", "6.12"])
def test_region_info_lists_the_windows_as_sparse_mmap_areas(abi):
    vdev = make(abi=KernelAbi(abi))
    needed = INFO + 16 + 2 * 16  # header, nr_areas + reserved, two areas: 8-byte multiples on either ABI
    info, out = region_info(vdev, 0, INFO)
    assert (info.argsz, info.flags, info.cap_offset) == (needed, RW | VFIO_REGION_INFO_FLAG_MMAP
                                                         | VFIO_REGION_INFO_FLAG_CAPS, 0)
    assert out[INFO:] == b""
    info, out = region_info(vdev, 0, needed)
    assert (info.argsz, info.cap_offset, info.size) == (needed, INFO, 4 * PAGE)
    assert sparse_areas(out, info) == [(PAGE, PAGE), (3 * PAGE, PAGE)]
    # the MSI-X table's BAR: its window is the only area, and no MSIX_MAPPABLE (the table never maps)
    info, out = region_info(vdev, 2, 128)
    assert info.flags == RW | VFIO_REGION_INFO_FLAG_MMAP | VFIO_REGION_INFO_FLAG_CAPS
    assert sparse_areas(out, info) == [(PAGE, PAGE)]


def test_windows_off_is_a_plain_register_bar():
    fn = Windowed()
    vdev = make(fn, mmap_windows=False)
    info, out = region_info(vdev, 0, 128)
    assert (info.flags, info.cap_offset, info.argsz) == (RW, 0, 128) and out[INFO:] == bytes(128 - INFO)
    assert errno_of(vdev.mmap, region_offset(0, PAGE), PAGE) == errno.EINVAL
    assert errno_of(vdev.region_memory, 0) == errno.EINVAL
    fn.ids.write(0, b"\x11\x22\x33\x44")  # still memory for pread: the model's bytes, not a handler
    assert bar_read(vdev, 0, PAGE, 4) == 0x44332211 and fn.accesses == []


def test_the_function_decides_unless_the_topology_says():
    class Quiet(Windowed):
        mmap_windows = False

    assert not region_info(make(Quiet()), 0, 128)[0].flags & VFIO_REGION_INFO_FLAG_MMAP
    assert region_info(make(Quiet(), mmap_windows=True), 0, 128)[0].flags & VFIO_REGION_INFO_FLAG_MMAP


# -- mmap ----------------------------------------------------------------------------------------------
def test_mmap_only_inside_the_areas():
    vdev = make()
    memory, start = vdev.mmap(region_offset(0, PAGE), PAGE)
    assert memory is vdev.region_memory(0) and start == PAGE
    assert vdev.mmap(region_offset(0, 3 * PAGE), PAGE)[1] == 3 * PAGE
    assert vdev.mmap(region_offset(2, PAGE), PAGE)[1] == PAGE
    refused = [(0, 0, PAGE),          # registers
               (0, 0, 2 * PAGE),      # registers, then a window
               (0, PAGE, 2 * PAGE),   # a window, then registers
               (0, PAGE, 3 * PAGE),   # two windows with registers between
               (0, 3 * PAGE, 2 * PAGE),  # past the BAR
               (0, 4 * PAGE, PAGE),   # beyond it
               (2, 0, PAGE),          # the MSI-X table
               (2, 0, 2 * PAGE)]
    for index, pos, length in refused:
        assert errno_of(vdev.mmap, region_offset(index, pos), length) == errno.EINVAL, (index, pos, length)


def test_adjacent_windows_map_as_one():
    class Adjacent(PciDevice):
        vendor_id, device_id = 0x1234, 0x0004

        def __init__(self, **options):
            super().__init__(**options)
            bar = self.add_bar(0, MmioBar(4 * PAGE, lambda o, s: 0, lambda o, s, v: None))
            bar.add_window(2 * PAGE, PAGE)
            bar.add_window(PAGE, PAGE)

    vdev = make(Adjacent())
    info, out = region_info(vdev, 0, 128)
    assert sparse_areas(out, info) == [(PAGE, PAGE), (2 * PAGE, PAGE)]  # listed by offset
    assert vdev.mmap(region_offset(0, PAGE), 2 * PAGE)[1] == PAGE
    assert errno_of(vdev.mmap, region_offset(0, PAGE), 3 * PAGE) == errno.EINVAL


def test_pread_pwrite_and_the_mapping_are_the_same_bytes():
    fn = Windowed()
    vdev = make(fn)
    m = client_map(vdev, 0, 3 * PAGE, PAGE)
    try:
        bar_write(vdev, 0, 3 * PAGE + 8, 4, 0xCAFEF00D)      # trapped write...
        assert m[8:12] == (0xCAFEF00D).to_bytes(4, "little")  # ...is in the mapping
        assert fn.written == [(8, 4)]                          # and the model is told of it
        m[0x20:0x24] = b"\x01\x02\x03\x04"                     # a store through the mapping...
        assert bar_read(vdev, 0, 3 * PAGE + 0x20, 4) == 0x04030201  # ...is what pread reads
        assert fn.written == [(8, 4)]                          # (never seen by the model, as on hardware)
        fn.scratch.write(0x40, b"model")                       # the model keeps it current
        assert m[0x40:0x45] == b"model" and fn.scratch.read(0x20, 4) == b"\x01\x02\x03\x04"
        assert bar_read(vdev, 0, 3 * PAGE + 0x40, 8) & 0xFFFFFFFFFF == int.from_bytes(b"model", "little")
        assert fn.accesses == []                               # no handler saw any of it
        assert bar_read(vdev, 0, 8, 4) == 0x5A and fn.accesses == [("r", 8, 4)]  # the registers still trap
    finally:
        m.close()


def test_a_mapping_taken_before_the_last_close_no_longer_aliases_the_window():
    fn = Windowed()
    vdev = make(fn)
    stale = client_map(vdev, 0, PAGE, PAGE)
    try:
        fn.ids.write(0, b"ID01")
        vdev.release()
        vdev.open()
        assert vdev.read(4, region_offset(0, PAGE)) == b"ID01"  # the bytes went along
        fn.ids.write(0, b"ID02")                                  # the model writes the new memory...
        assert stale[0:4] == b"ID01"                              # ...which the old mapping never sees
        stale[4:8] = b"junk"
        assert vdev.read(4, region_offset(0, PAGE + 4)) == bytes(4)
    finally:
        stale.close()


def test_windows_close_with_the_function():
    fn = Windowed()
    memory = fn.bars[0].memory
    fn.shutdown()
    assert memory.closed and fn.bars[2].memory.closed


# -- the rules of a window ---------------------------------------------------------------------------
@pytest.mark.parametrize("offset, size, why", [
    (0x10, PAGE, "not whole pages"), (PAGE, 0x100, "not whole pages"), (0, 0, "not whole pages"),
    (3 * PAGE, 2 * PAGE, "outside"), (PAGE, PAGE, "overlaps")])
def test_a_window_is_whole_pages_inside_the_bar_and_alone(offset, size, why):
    bar = MmioBar(4 * PAGE, lambda o, s: 0, lambda o, s, v: None)
    bar.add_window(PAGE, PAGE)
    with pytest.raises(ValueError, match=why):
        bar.add_window(offset, size)
    with pytest.raises(ValueError, match="I/O"):
        IoBar(0x100, lambda o, s: 0, lambda o, s, v: None).add_window(0, PAGE)
    with pytest.raises(ValueError, match="outside"):
        bar.windows[0].write(PAGE - 2, b"abc")


def test_a_window_over_the_msix_table_or_pba_is_refused():
    class Clash(PciDevice):
        vendor_id, device_id = 0x1234, 0x0005

        def __init__(self, what, **options):
            super().__init__(**options)
            bar = self.add_bar(0, MmioBar(4 * PAGE, lambda o, s: 0, lambda o, s, v: None))
            bar.add_window(PAGE, PAGE)
            if what == "table":
                self.add_capability(MsixCapability(vectors=4, table_bar=0, table_offset=PAGE + 0x800))
            else:
                self.add_capability(MsixCapability(vectors=4, table_bar=0, table_offset=0, pba_offset=PAGE))

    for what in ("table", "PBA"):
        with pytest.raises(ValueError, match=f"MSI-X {what}"):
            VfioPciDevice(Clash(what))


# -- topology -------------------------------------------------------------------------------------------
def virtio_topology(extra=""):
    return f'[[device]]\nbdf = "0000:00:03.0"\nmodel = "virtio-net"\ngroup = 3\n{extra}'


def test_topology_mmap_windows():
    with pytest.raises(TopologyError, match="mmap_windows is true or false"):
        Machine(parse(virtio_topology('mmap_windows = "yes"\n'), "<t>")).close()
    for extra, offered in (("", False), ("mmap_windows = true\n", True), ("mmap_windows = false\n", False)):
        m = Machine(parse(virtio_topology(extra), "<t>"))
        try:
            vdev = m.vdevs["0000:00:03.0"]
            vdev.open()
            info, out = region_info(vdev, 4, 128)
            assert bool(info.flags & VFIO_REGION_INFO_FLAG_MMAP) == offered, extra
            if offered:
                assert sparse_areas(out, info) == [(0x2000, 0x1000)]  # the device config page only
            vdev.release()
        finally:
            m.close()


# -- virtio-net's device config page -------------------------------------------------------------------
def test_virtio_net_keeps_its_device_config_page_current():
    fn = create_model("virtio-net", name="0000:00:03.0", mac="52:54:00:12:34:56", manual_time=True)
    vdev = make(fn, mmap_windows=True)
    m = client_map(vdev, 4, 0x2000, PAGE)
    try:
        assert m[0:8] == bytes.fromhex("525400123456") + b"\x01\x00"  # MAC, status LINK_UP
        assert m[8:PAGE] == b"\xff" * (PAGE - 8)                      # past the config: all ones
        gen = fn.generation
        fn.set_link(False)
        assert m[6:8] == b"\x00\x00" and fn.generation != gen          # the page, then a new generation
        fn.set_link(True)
        assert m[6:8] == b"\x01\x00"
        bar_write(vdev, 4, 0x2000, 4, 0xFFFFFFFF)    # a modern driver's write of the read-only MAC...
        assert m[0:6] == bytes.fromhex("525400123456")  # ...is dropped, as QEMU's next get_config shows
        assert bar_read(vdev, 4, 0x2000, 2) == 0x5452
        fn.mac = bytes.fromhex("02aabbccddee")
        fn.reset()                                       # a reset gives the permanent MAC back
        assert m[0:6] == bytes.fromhex("525400123456")
    finally:
        m.close()
