"""vfio-pci's device fd: info ioctls, regions, access splitting, SET_IRQS, resets, features, models."""

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import struct

import pytest

from cuse_vfio.core import KernelAbi
from cuse_vfio.devices import (
    DmaFault,
    ExpressCapability,
    HotResetBus,
    IoBar,
    IrqIndex,
    MmioBar,
    MsiCapability,
    MsixCapability,
    PciDevice,
    RamBar,
    Rom,
    VfioPciDevice,
    create_model,
    load_model_file,
    model_names,
)
from cuse_vfio.uapi import (
    VFIO_DEVICE_FEATURE,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
    VFIO_DEVICE_FLAGS_PCI,
    VFIO_DEVICE_FLAGS_RESET,
    VFIO_DEVICE_GET_INFO,
    VFIO_DEVICE_GET_IRQ_INFO,
    VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
    VFIO_DEVICE_GET_REGION_INFO,
    VFIO_DEVICE_IOEVENTFD,
    VFIO_DEVICE_PCI_HOT_RESET,
    VFIO_DEVICE_RESET,
    VFIO_DEVICE_SET_IRQS,
    VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_INFO_MASKABLE,
    VFIO_IRQ_INFO_NORESIZE,
    VFIO_IRQ_SET_ACTION_MASK,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_ERR_IRQ_INDEX,
    VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_REQ_IRQ_INDEX,
    VFIO_REGION_INFO_CAP_MSIX_MAPPABLE,
    VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
    vfio_device_info,
    vfio_irq_info,
    vfio_region_info,
)
from devices_fakes import (
    FakeArg,
    FakeCaller,
    FakeDmaSpace,
    FakeGroupFile,
    bar_read,
    bar_write,
    cfg_read,
    cfg_write,
    enable_master,
    errno_of,
    fds,
    ioctl,
    irq_set,
    region_offset,
)

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "devices", "scratchpad.py")
TRIGGER_EFD = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER
TRIGGER_NONE = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER


class Recorder(PciDevice):
    """Registers that remember every access the model sees."""

    vendor_id, device_id = 0x1234, 0x0001
    interrupt_pin = 1

    def __init__(self, msix=False, express=False, can_reset=False, **options):
        super().__init__(**options)
        self.can_reset = can_reset
        self.accesses = []
        self.regs = {}
        self.add_bar(0, MmioBar(0x1000, self._read, self._write))
        self.add_bar(1, IoBar(0x10, self._read, self._write))
        self.add_bar(2, RamBar(0x4000, bits64=True))
        if express:
            self.add_capability(ExpressCapability())
        self.add_capability(MsiCapability(vectors=2, addr64=True))
        if msix:
            self.add_bar(4, MmioBar(0x2000, self._read, self._write))
            self.add_capability(MsixCapability(vectors=4, table_bar=4, table_offset=0x1000))

    def _read(self, offset, size):
        self.accesses.append(("r", offset, size))
        if offset == 0xBAD:
            raise RuntimeError("model bug")
        return self.regs.get(offset, 0x0102030405060708 >> (8 * (offset % 8)))

    def _write(self, offset, size, value):
        self.accesses.append(("w", offset, size, value))
        if offset == 0xBAD:
            raise RuntimeError("model bug")
        self.regs[offset] = value


def make(fn=None, **kwargs):
    vdev = VfioPciDevice(fn if fn is not None else Recorder(), **kwargs)
    vdev.open()
    return vdev


def get_info(vdev, argsz=24):
    info = vfio_device_info(argsz=argsz)
    _, out = ioctl(vdev, VFIO_DEVICE_GET_INFO, bytes(info)[:max(argsz, 4)].ljust(argsz, b"\0"))
    return vfio_device_info.from_buffer_copy(out.ljust(ctypes.sizeof(vfio_device_info), b"\0"))


def region_info(vdev, index, argsz=None):
    argsz = ctypes.sizeof(vfio_region_info) if argsz is None else argsz
    buf = bytearray(max(argsz, ctypes.sizeof(vfio_region_info)))
    struct.pack_into("<II I", buf, 0, argsz, 0, index)
    _, out = ioctl(vdev, VFIO_DEVICE_GET_REGION_INFO, bytes(buf))
    return vfio_region_info.from_buffer_copy(out[:ctypes.sizeof(vfio_region_info)]), out


def irq_info(vdev, index):
    _, out = ioctl(vdev, VFIO_DEVICE_GET_IRQ_INFO, bytes(vfio_irq_info(argsz=16, index=index)))
    return vfio_irq_info.from_buffer_copy(out)


def set_irqs(vdev, caller=None, **kw):
    return ioctl(vdev, VFIO_DEVICE_SET_IRQS, irq_set(**kw), caller)[0]


# -- GET_INFO ---------------------------------------------------------------------
def test_get_info():
    info = get_info(make())
    assert info.flags == VFIO_DEVICE_FLAGS_PCI
    assert (info.num_regions, info.num_irqs) == (9, 5)
    assert get_info(make(Recorder(can_reset=True))).flags == VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET


def test_get_info_argsz_rules():
    vdev = make()
    assert errno_of(ioctl, vdev, VFIO_DEVICE_GET_INFO, struct.pack("<IIII", 15, 0, 0, 0)) == errno.EINVAL
    assert errno_of(ioctl, vdev, VFIO_DEVICE_GET_INFO, struct.pack("<I", 16)) == errno.EFAULT
    _, out = ioctl(vdev, VFIO_DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0) + b"\xee" * 8)
    assert out[16:] == b"\xee" * 8  # only argsz bytes are copied out


# -- regions ------------------------------------------------------------------------
def test_region_offsets_and_sizes():
    fn = Recorder()
    fn.set_rom(Rom(b"\x55\xaa" + bytes(22) + b"\x20\x00" + bytes(6) + b"PCIR" + bytes(12) + b"\x04\x00"
                   + bytes(3) + b"\x80", size=0x1000))
    vdev = make(fn)
    got = {i: region_info(vdev, i)[0] for i in range(8)}
    for i, info in got.items():
        assert info.offset == i << 40
    rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
    assert (got[0].size, got[0].flags) == (0x1000, rw)
    assert (got[1].size, got[1].flags) == (0x10, rw)
    assert got[2].size == 0x4000 and got[2].flags & VFIO_REGION_INFO_FLAG_MMAP
    assert (got[3].size, got[3].flags) == (0, 0)  # upper half of the 64-bit BAR2
    assert (got[4].size, got[4].flags) == (0, 0)  # unimplemented
    assert (got[6].size, got[6].flags) == (0x1000, VFIO_REGION_INFO_FLAG_READ)
    assert (got[7].size, got[7].flags) == (256, rw)
    assert errno_of(region_info, vdev, 8) == errno.EINVAL  # no VGA
    assert errno_of(region_info, vdev, 9) == errno.EINVAL
    assert errno_of(region_info, vdev, 0, argsz=31) == errno.EINVAL


def test_rom_without_a_valid_image_is_an_empty_region():
    fn = Recorder()
    fn.set_rom(Rom(bytes(2048)))
    vdev = make(fn)
    info, _ = region_info(vdev, 6)
    assert (info.size, info.flags) == (0, 0)
    assert errno_of(vdev.read, 4, region_offset(6)) == errno.ENOMEM


def test_rom_reads_image_then_ff_and_refuses_writes():
    image = b"\x55\xaa" + bytes(22) + b"\x20\x00" + bytes(6) + b"PCIR" + bytes(12) + b"\x01\x00" + bytes(3) + b"\x80"
    fn = Recorder()
    fn.set_rom(Rom(image, size=0x1000))
    vdev = make(fn)
    assert vdev.read(4, region_offset(6)) == b"\x55\xaa\x00\x00"
    assert vdev.read(4, region_offset(6, 512)) == b"\xff" * 4  # past the 512-byte image
    assert errno_of(vdev.write, b"\0", region_offset(6)) == errno.EINVAL


def test_a_mappable_bar_has_no_capability_as_on_6_1():
    # vfio_pci_ioctl_get_region_info (6.1): READ|WRITE|MMAP and nothing else, whatever argsz offers
    vdev = make()
    rwm = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE | VFIO_REGION_INFO_FLAG_MMAP
    info, out = region_info(vdev, 2, argsz=32)
    assert (info.argsz, info.flags, info.cap_offset) == (32, rwm, 0)
    info, out = region_info(vdev, 2, argsz=64)
    assert (info.argsz, info.flags, info.cap_offset) == (64, rwm, 0) and out[32:] == bytes(32)
    assert not region_info(vdev, 0)[0].flags & VFIO_REGION_INFO_FLAG_MMAP  # registers: no mmap


def test_mmap_hands_out_the_bars_shared_memory():
    fn = Recorder()
    vdev = make(fn)
    memory, start = vdev.mmap(region_offset(2, 0x1000), 0x1000)
    assert memory is vdev.region_memory(2) is fn.bars[2].memory and start == 0x1000
    bar_write(vdev, 2, 0x10, 4, 0xCAFEF00D)
    # What a client does with the fd the transport sends it: map it shared.
    client = mmap.mmap(os.dup(memory.fileno()), 0x4000, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        assert client[0x10:0x14] == (0xCAFEF00D).to_bytes(4, "little")
        client[0x20] = 0x77  # the client's store through its mapping
        assert bar_read(vdev, 2, 0x20, 1) == 0x77
        assert fn.bars[2].backing[0x20] == 0x77  # and the model sees it
    finally:
        client.close()
    assert errno_of(vdev.mmap, region_offset(0), 0x1000) == errno.EINVAL       # registers
    assert errno_of(vdev.mmap, region_offset(1), 0x1000) == errno.EINVAL       # I/O
    assert errno_of(vdev.mmap, region_offset(2, 0x10), 0x1000) == errno.EINVAL  # not on a page
    assert errno_of(vdev.mmap, region_offset(2, 0x3000), 0x2000) == errno.EINVAL  # beyond the BAR
    assert errno_of(vdev.mmap, region_offset(7), 0x1000) == errno.EINVAL       # config
    for index in (0, 1, 3, 6, 7, 8):
        assert errno_of(vdev.region_memory, index) == errno.EINVAL


def test_the_msix_bar_is_mapped_whole_and_says_msix_mappable():
    class MsixInRam(PciDevice):
        vendor_id, device_id = 0x1234, 0x0002

        def __init__(self, **options):
            super().__init__(**options)
            self.add_bar(0, RamBar(0x10000))
            self.add_capability(MsixCapability(vectors=4, table_bar=0, table_offset=0x4000))

    vdev = make(MsixInRam())
    rwm = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE | VFIO_REGION_INFO_FLAG_MMAP
    info, out = region_info(vdev, 0, argsz=32)
    assert (info.argsz, info.flags, info.cap_offset) == (40, rwm | VFIO_REGION_INFO_FLAG_CAPS, 0)
    info, out = region_info(vdev, 0, argsz=40)
    assert (info.argsz, info.flags, info.cap_offset) == (40, rwm | VFIO_REGION_INFO_FLAG_CAPS, 32)
    assert struct.unpack_from("<HHI", out, 32) == (VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 1, 0)  # the only one
    # vfio_pci_core_mmap: any whole pages of the BAR, the table and PBA page included
    assert vdev.mmap(region_offset(0, 0x4000), 0x1000)[1] == 0x4000
    assert vdev.mmap(region_offset(0), 0x10000)[1] == 0
    assert errno_of(vdev.mmap, region_offset(0, 0x4000), 0xD000) == errno.EINVAL  # past the end
    # a table in a register BAR: no mmap, so no capability either
    reg = make(Recorder(msix=True))
    info, _ = region_info(reg, 4, argsz=64)
    assert (info.argsz, info.flags, info.cap_offset) == (64, VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE, 0)


def test_a_mapping_taken_before_the_last_close_no_longer_aliases_the_bar():
    # Client A maps the RAM BAR and closes every fd, keeping its mapping; the
    # next open (client B) must not share bytes with A's stale mapping.
    fn = Recorder()
    vdev = make(fn)
    memory, start = vdev.mmap(region_offset(2), 0x4000)
    old_fd = memory.fileno()
    stale = mmap.mmap(os.dup(old_fd), 0x4000, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        stale[0:4] = b"keep"
        vdev.release()
        assert memory.closed  # this side of the old memfd is let go
        vdev.open()
        assert vdev.read(4, region_offset(2)) == b"keep"  # the bytes went along
        new_memory, _ = vdev.mmap(region_offset(2), 0x4000)
        assert new_memory is not memory and new_memory is fn.bars[2].memory and not new_memory.closed
        # still sealed against shrinking and growing (the transport refuses it otherwise)
        seals = fcntl.fcntl(new_memory.fileno(), fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
        stale[0:4] = b"A>B!"  # A's store goes nowhere B or the model looks
        assert vdev.read(4, region_offset(2)) == b"keep" and bytes(fn.bars[2].backing[0:4]) == b"keep"
        bar_write(vdev, 2, 0x10, 4, 0x5EC2E7)  # and B's (or the model's) bytes never reach A
        assert stale[0x10:0x14] == bytes(4)
        fresh = mmap.mmap(os.dup(new_memory.fileno()), 0x4000, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            fresh[0x20] = 0x77  # a mapping of the new open works as before
            assert bar_read(vdev, 2, 0x20, 1) == 0x77
        finally:
            fresh.close()
    finally:
        stale.close()


def test_shared_memory_closes_with_the_function():
    fn = Recorder()
    memory = fn.bars[2].memory
    fd = memory.fileno()
    os.fstat(fd)
    fn.shutdown()
    assert memory.closed
    with pytest.raises(OSError) as e:
        os.fstat(fd)
    assert e.value.errno == errno.EBADF


# -- reads and writes through the device fd ---------------------------------------
def test_accesses_are_split_naturally_aligned():
    fn = Recorder()
    vdev = make(fn, abi=KernelAbi("6.12"))  # 8-byte accesses since 6.9
    data = vdev.read(16, region_offset(0, 2))
    assert [a[1:] for a in fn.accesses] == [(2, 2), (4, 4), (8, 8), (16, 2)]
    assert len(data) == 16
    fn.accesses.clear()
    vdev.write(bytes(range(7)), region_offset(0, 1))
    assert [a[1:] for a in fn.accesses] == [(1, 1, 0x00), (2, 2, 0x0201), (4, 4, 0x06050403)]


def test_accesses_without_8_bytes_as_on_6_1():
    fn = Recorder()
    vdev = make(fn)  # the default kernel ABI, 6.1
    vdev.read(8, region_offset(0))
    assert [a[1:] for a in fn.accesses] == [(0, 4), (4, 4)]


def test_read_values_are_little_endian_assembled():
    fn = Recorder()
    vdev = make(fn, abi=KernelAbi("6.12"))  # one 8-byte access
    fn.regs[0] = 0x1122334455667788
    assert vdev.read(8, region_offset(0)) == (0x1122334455667788).to_bytes(8, "little")


def test_bar_bounds():
    vdev = make()
    assert len(vdev.read(16, region_offset(0, 0xFF8))) == 8  # short read at the end
    assert errno_of(vdev.read, 4, region_offset(0, 0x1000)) == errno.EINVAL
    assert errno_of(vdev.read, 4, region_offset(4)) == errno.EINVAL  # unimplemented BAR
    assert errno_of(vdev.read, 4, region_offset(8)) == errno.EINVAL  # VGA
    assert errno_of(vdev.read, 4, region_offset(9)) == errno.EINVAL
    assert vdev.read(0, region_offset(9)) == b""


def test_memory_bars_fail_with_memory_decode_off():
    vdev = make()
    cfg_write(vdev, 4, 2, cfg_read(vdev, 4, 2) & ~0x2)
    assert errno_of(vdev.read, 4, region_offset(0)) == errno.EIO
    assert errno_of(vdev.write, b"\0" * 4, region_offset(2)) == errno.EIO
    assert len(vdev.read(4, region_offset(1))) == 4  # I/O BARs are not checked
    cfg_write(vdev, 4, 2, cfg_read(vdev, 4, 2) | 0x2)
    assert len(vdev.read(4, region_offset(0))) == 4


def test_msix_table_is_excluded_but_pba_is_not():
    fn = Recorder(msix=True)
    vdev = make(fn)
    assert vdev.read(8, region_offset(4, 0x1000)) == b"\xff" * 8
    vdev.write(b"\0" * 4, region_offset(4, 0x100C))
    assert fn.msix.entry_masked(0)  # the write was dropped
    fn.msix.pending = 0b1010
    assert bar_read(vdev, 4, 0x1040, 8) == 0b1010
    assert len(vdev.read(8, region_offset(4, 0xFF8))) == 8 and fn.accesses


def test_single_accesses_at_the_edges_of_the_msix_table():
    # One naturally aligned access is served in one step; at the table's edges it must
    # still see the exclusion exactly as the split loop does.
    fn = Recorder(msix=True)
    vdev = make(fn)
    assert vdev.read(4, region_offset(4, 0xFFC)) == (0x01020304).to_bytes(4, "little")  # ends at the table
    assert fn.accesses == [("r", 0xFFC, 4)]
    fn.accesses.clear()
    assert vdev.read(4, region_offset(4, 0x1000)) == b"\xff" * 4  # starts it
    assert vdev.read(2, region_offset(4, 0x103E)) == b"\xff" * 2  # ends inside it
    vdev.write(b"\1\0\0\0", region_offset(4, 0x1000 + 0x40))  # the PBA: after the table
    assert fn.accesses == [] and fn.msix.pending == 0  # (the PBA is read-only, not a register)
    vdev.write(b"\7\0\0\0", region_offset(4, 0xFFC))
    assert fn.accesses == [("w", 0xFFC, 4, 7)]
    assert vdev.read(3, region_offset(0, 0x10)) and fn.accesses[-2:] == [("r", 0x10, 2), ("r", 0x12, 1)]


def test_a_broken_handler_fails_one_access_with_eio(caplog):
    fn = Recorder()
    vdev = make(fn)
    with caplog.at_level(logging.ERROR):
        assert errno_of(vdev.read, 1, region_offset(0, 0xBAD)) == errno.EIO
    assert "model bug" in caplog.text and "Traceback" in caplog.text
    assert errno_of(vdev.write, b"\1", region_offset(0, 0xBAD)) == errno.EIO
    assert bar_read(vdev, 0, 0, 4) == 0x05060708  # still working


# -- GET_IRQ_INFO ---------------------------------------------------------------------
def test_irq_info_conventional():
    vdev = make(Recorder(msix=False))
    intx = irq_info(vdev, VFIO_PCI_INTX_IRQ_INDEX)
    assert intx.flags == VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED and intx.count == 1
    msi = irq_info(vdev, VFIO_PCI_MSI_IRQ_INDEX)
    assert msi.flags == VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE and msi.count == 2
    msix = irq_info(vdev, VFIO_PCI_MSIX_IRQ_INDEX)
    assert msix.flags == VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE and msix.count == 0
    req = irq_info(vdev, VFIO_PCI_REQ_IRQ_INDEX)
    assert req.flags == VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE and req.count == 1
    assert errno_of(irq_info, vdev, VFIO_PCI_ERR_IRQ_INDEX) == errno.EINVAL
    assert errno_of(irq_info, vdev, 5) == errno.EINVAL
    assert errno_of(ioctl, vdev, VFIO_DEVICE_GET_IRQ_INFO, struct.pack("<IIII", 15, 0, 0, 0)) == errno.EINVAL


def test_irq_info_express_with_msix_and_no_pin():
    fn = Recorder(msix=True, express=True)
    fn.interrupt_pin = 0
    fn.config.init(0x3D, 1, 0)
    vdev = make(fn)
    assert irq_info(vdev, VFIO_PCI_INTX_IRQ_INDEX).count == 0
    assert irq_info(vdev, VFIO_PCI_MSIX_IRQ_INDEX).count == 4
    err = irq_info(vdev, VFIO_PCI_ERR_IRQ_INDEX)
    assert err.flags == VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE and err.count == 1


# -- SET_IRQS validation: one test per rule ----------------------------------------------
def test_set_irqs_argsz_smaller_than_minsz():
    assert errno_of(set_irqs, make(), argsz=19, flags=TRIGGER_NONE) == errno.EINVAL


def test_set_irqs_index_out_of_range():
    assert errno_of(set_irqs, make(), flags=TRIGGER_NONE, index=5) == errno.EINVAL


def test_set_irqs_start_plus_count_overflows():
    assert errno_of(set_irqs, make(), flags=TRIGGER_NONE, index=1, start=1, count=0xFFFFFFFF) == errno.EINVAL


def test_set_irqs_unknown_flags():
    assert errno_of(set_irqs, make(), flags=TRIGGER_NONE | (1 << 6), index=1, count=1) == errno.EINVAL


def test_set_irqs_start_beyond_vectors():
    assert errno_of(set_irqs, make(), flags=TRIGGER_NONE, index=1, start=2, count=0) == errno.EINVAL


def test_set_irqs_count_beyond_vectors():
    assert errno_of(set_irqs, make(), flags=TRIGGER_NONE, index=1, start=1, count=2) == errno.EINVAL


def test_set_irqs_two_data_types():
    flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER
    assert errno_of(set_irqs, make(), flags=flags, index=1, count=1, data=b"\1") == errno.EINVAL


def test_set_irqs_no_data_type():
    assert errno_of(set_irqs, make(), flags=VFIO_IRQ_SET_ACTION_TRIGGER, index=1, count=1) == errno.EINVAL


def test_set_irqs_two_action_types_is_enotty_as_in_the_kernel():
    # vfio_set_irqs_validate_and_prepare does not look at actions; vfio_pci_set_irqs_ioctl
    # finds no handler for two action bits and answers ENOTTY.
    flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK
    assert errno_of(set_irqs, make(), flags=flags, index=0, count=1) == errno.ENOTTY


def test_set_irqs_data_shorter_than_count():
    data = fds(-1)
    assert errno_of(set_irqs, make(), argsz=20 + 7, flags=TRIGGER_EFD, index=1, count=2,
                    data=data + b"\xff" * 3) == errno.EINVAL


def test_set_irqs_data_beyond_the_argument_is_efault():
    assert errno_of(set_irqs, make(), argsz=28, flags=TRIGGER_EFD, index=1, count=2, data=fds(-1)) == errno.EFAULT


def test_msi_mask_is_enotty():
    assert errno_of(set_irqs, make(), flags=VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK,
                    index=1, count=1) == errno.ENOTTY


# -- INTx ---------------------------------------------------------------------------------
def intx_device():
    fn = Recorder()
    vdev = make(fn)
    caller = FakeCaller()
    fd, efd = caller.eventfd()
    set_irqs(vdev, caller, flags=TRIGGER_EFD, index=0, count=1, data=fds(fd))
    return fn, vdev, caller, efd


def test_intx_automask_and_unmask():
    fn, vdev, caller, efd = intx_device()
    fn.raise_irq(IrqIndex.INTX)
    assert efd.take() == 1 and vdev.intx.masked
    fn.lower_irq()
    fn.raise_irq(IrqIndex.INTX)
    assert efd.take() == 0  # masked: no second signal
    set_irqs(vdev, caller, flags=VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK, index=0, count=1)
    assert efd.take() == 1 and vdev.intx.masked  # still asserted: re-sent, stays masked
    fn.lower_irq()
    set_irqs(vdev, caller, flags=VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_UNMASK, index=0, count=1, data=b"\1")
    assert efd.take() == 0 and not vdev.intx.masked
    fn.raise_irq(IrqIndex.INTX)
    assert efd.take() == 1


def test_intx_mask_action_and_loopback():
    fn, vdev, caller, efd = intx_device()
    set_irqs(vdev, caller, flags=VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK, index=0, count=1)
    fn.raise_irq(IrqIndex.INTX)
    assert efd.take() == 0
    set_irqs(vdev, caller, flags=TRIGGER_NONE, index=0, count=1)
    assert efd.take() == 1  # loopback signals without changing the mask
    set_irqs(vdev, caller, flags=VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER, index=0, count=1, data=b"\0")
    assert efd.take() == 0
    assert errno_of(set_irqs, vdev, caller, flags=VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_MASK,
                    index=0, count=1, data=fds(-1)) == errno.ENOTTY


def test_intx_already_asserted_fires_on_enable():
    fn = Recorder()
    vdev = make(fn)
    fn.raise_irq(IrqIndex.INTX)
    caller = FakeCaller()
    fd, efd = caller.eventfd()
    set_irqs(vdev, caller, flags=TRIGGER_EFD, index=0, count=1, data=fds(fd))
    assert efd.take() == 1


def test_intx_disable_bit_in_command_masks():
    fn, vdev, caller, efd = intx_device()
    cfg_write(vdev, 4, 2, cfg_read(vdev, 4, 2) | 0x400)
    fn.raise_irq(IrqIndex.INTX)
    assert efd.take() == 0
    fn.lower_irq()
    cfg_write(vdev, 4, 2, cfg_read(vdev, 4, 2) & ~0x400)
    fn.raise_irq(IrqIndex.INTX)
    assert efd.take() == 1


def test_intx_deassign_and_disable():
    fn, vdev, caller, efd = intx_device()
    set_irqs(vdev, caller, flags=TRIGGER_EFD, index=0, count=1, data=fds(-1))
    assert efd.released and vdev.irq_type == VFIO_PCI_INTX_IRQ_INDEX
    fn.raise_irq(IrqIndex.INTX)
    assert efd.take() == 0
    set_irqs(vdev, caller, flags=TRIGGER_NONE, index=0, count=0)
    assert vdev.irq_type is None
    assert errno_of(set_irqs, vdev, caller, flags=TRIGGER_NONE, index=0, count=0) == errno.EINVAL
    assert errno_of(set_irqs, vdev, caller, flags=VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
                    index=0, count=1) == errno.EINVAL


def test_intx_unmask_from_an_eventfd():
    fn, vdev, caller, efd = intx_device()
    ufd, unmask = caller.eventfd()
    set_irqs(vdev, caller, flags=VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK, index=0, count=1,
             data=fds(ufd))
    fn.raise_irq(IrqIndex.INTX)
    fn.lower_irq()
    assert efd.take() == 1 and vdev.intx.masked
    unmask.client_write()
    assert not vdev.intx.masked


def test_intx_bad_eventfds():
    vdev = make()
    caller = FakeCaller()
    other = caller.add(object())
    assert errno_of(set_irqs, vdev, caller, flags=TRIGGER_EFD, index=0, count=1, data=fds(77)) == errno.EBADF
    assert errno_of(set_irqs, vdev, caller, flags=TRIGGER_EFD, index=0, count=1, data=fds(other)) == errno.EINVAL
    assert vdev.irq_type is None


# -- MSI and MSI-X ----------------------------------------------------------------------------
def test_msi_enable_raise_disable():
    fn = Recorder()
    vdev = make(fn)
    caller = FakeCaller()
    fd0, efd0 = caller.eventfd()
    fd1, efd1 = caller.eventfd()
    set_irqs(vdev, caller, flags=TRIGGER_EFD, index=1, count=2, data=fds(fd0, fd1))
    assert fn.msi_enabled() and fn.command() & 0x400  # INTx off in the function while MSI is on
    fn.raise_irq(IrqIndex.MSI, 1)
    fn.raise_irq(IrqIndex.MSI, 0)
    assert (efd0.take(), efd1.take()) == (1, 1)
    set_irqs(vdev, caller, flags=TRIGGER_NONE, index=1, start=1, count=1)  # loopback
    assert (efd0.take(), efd1.take()) == (0, 1)
    set_irqs(vdev, caller, flags=TRIGGER_EFD, index=1, start=1, count=1, data=fds(-1))
    fn.raise_irq(IrqIndex.MSI, 1)
    assert efd1.take() == 0 and efd1.released
    assert errno_of(set_irqs, vdev, caller, flags=TRIGGER_EFD, index=0, count=1, data=fds(fd0)) == errno.EINVAL
    set_irqs(vdev, caller, flags=TRIGGER_NONE, index=1, count=0)
    assert not fn.msi_enabled() and vdev.irq_type is None and not fn.command() & 0x400


def test_msi_disable_when_not_enabled_is_einval():
    assert errno_of(set_irqs, make(), flags=TRIGGER_NONE, index=1, count=0) == errno.EINVAL


def test_msi_enable_fails_whole_when_one_eventfd_is_bad():
    fn = Recorder()
    vdev = make(fn)
    caller = FakeCaller()
    fd0, efd0 = caller.eventfd()
    assert errno_of(set_irqs, vdev, caller, flags=TRIGGER_EFD, index=1, count=2, data=fds(fd0, 99)) == errno.EBADF
    assert vdev.irq_type is None and not fn.msi_enabled() and efd0.released


def test_msix_pending_message_is_delivered_when_the_vector_gets_an_eventfd():
    fn = Recorder(msix=True)
    vdev = make(fn)
    caller = FakeCaller()
    fd0, efd0 = caller.eventfd()
    fd2, efd2 = caller.eventfd()
    # 6.1 has no dynamic MSI-X (NORESIZE): enable the three vectors at once, two without eventfds
    set_irqs(vdev, caller, flags=TRIGGER_EFD, index=2, count=3, data=fds(fd0, -1, -1))
    assert fn.msix_enabled()
    fn.raise_irq(IrqIndex.MSIX, 0)
    fn.raise_irq(IrqIndex.MSIX, 2)  # vector 2 has no handler: masked, pending
    assert efd0.take() == 1 and fn.msix.pending == 0b100
    set_irqs(vdev, caller, flags=TRIGGER_EFD, index=2, start=2, count=1, data=fds(fd2))
    assert efd2.take() == 1 and fn.msix.pending == 0
    set_irqs(vdev, caller, flags=TRIGGER_NONE, index=2, count=0)
    assert not fn.msix_enabled()


def test_msi_vectors_are_fixed_until_disabled():
    # vfio_msi_set_block: start/count beyond the vectors enabled first is EINVAL (NORESIZE),
    # and so is loopback there (vfio_pci_set_msi_trigger checks num_ctx).
    fn = Recorder(msix=True)
    vdev = make(fn)
    caller = FakeCaller()
    fd0, efd0 = caller.eventfd()
    set_irqs(vdev, caller, flags=TRIGGER_EFD, index=2, count=1, data=fds(fd0))
    assert errno_of(set_irqs, vdev, caller, flags=TRIGGER_EFD, index=2, start=1, count=1,
                    data=fds(fd0)) == errno.EINVAL
    assert errno_of(set_irqs, vdev, caller, flags=TRIGGER_NONE, index=2, start=1, count=1) == errno.EINVAL
    set_irqs(vdev, caller, flags=TRIGGER_NONE, index=2, count=1)
    assert efd0.take() == 1
    set_irqs(vdev, caller, flags=TRIGGER_NONE, index=2, count=0)
    set_irqs(vdev, caller, flags=TRIGGER_EFD, index=2, start=1, count=1, data=fds(fd0))  # re-enable: 2 vectors
    assert vdev.num_ctx == 2 and vdev.msi_ctx == {1: efd0}


# -- ERR and REQ ------------------------------------------------------------------------------
def test_err_eventfd_on_express():
    fn = Recorder(express=True)
    vdev = make(fn)
    caller = FakeCaller()
    fd, efd = caller.eventfd()
    set_irqs(vdev, caller, flags=TRIGGER_EFD, index=3, count=1, data=fds(fd))
    fn.signal_error()
    assert efd.take() == 1
    set_irqs(vdev, caller, flags=TRIGGER_NONE, index=3, count=1)
    assert efd.take() == 1
    set_irqs(vdev, caller, flags=TRIGGER_NONE, index=3, count=0)
    assert vdev.err_trigger is None
    assert errno_of(set_irqs, vdev, caller, flags=TRIGGER_NONE, index=3, count=1) == errno.EINVAL
    assert errno_of(set_irqs, make(), caller, flags=TRIGGER_EFD, index=3, count=1, data=fds(fd)) == errno.EINVAL


def test_req_eventfd_and_request():
    vdev = make()
    caller = FakeCaller()
    fd, efd = caller.eventfd()
    vdev.request(0)  # nothing registered: only a warning
    set_irqs(vdev, caller, flags=TRIGGER_EFD, index=4, count=1, data=fds(fd))
    vdev.request(0)
    vdev.request(1)
    assert efd.take() == 2
    vdev.release()
    assert vdev.req_trigger is None and efd.released


# -- resets ----------------------------------------------------------------------------------
def test_reset_only_where_the_model_can():
    assert errno_of(ioctl, make(), VFIO_DEVICE_RESET, b"") == errno.EINVAL
    fn = Recorder(can_reset=True)
    fn.reset = lambda: fn.regs.clear()
    vdev = make(fn)
    enable_master(vdev)
    bar_write(vdev, 0, 0, 4, 0x1234)
    assert ioctl(vdev, VFIO_DEVICE_RESET, b"")[0] == 0
    assert fn.regs == {} and fn.bus_master_enabled()  # config space survives a function reset


def hot_reset_info(vdev, argsz):
    return ioctl(vdev, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, struct.pack("<III", argsz, 0, 0).ljust(argsz, b"\0"))


def test_hot_reset_without_a_resettable_bus_is_enodev():
    vdev = make()
    assert errno_of(hot_reset_info, vdev, 12) == errno.ENODEV
    assert errno_of(ioctl, vdev, VFIO_DEVICE_PCI_HOT_RESET, struct.pack("<IIIi", 16, 0, 1, 3)) == errno.ENODEV


def bus_of_two():
    bus = HotResetBus(segment=0, bus=3)
    a, b = make(Recorder()), make(Recorder())
    a.function.reset = lambda: a.function.regs.clear()
    b.function.reset = lambda: b.function.regs.clear()
    bus.add(0x00, 7, a)
    bus.add(0x08, 8, b)
    return bus, a, b


def test_hot_reset_info():
    bus, a, b = bus_of_two()
    arg = FakeArg(struct.pack("<III", 20, 0, 0).ljust(20, b"\0"))
    assert errno_of(a.ioctl, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, arg) == errno.ENOSPC
    assert struct.unpack_from("<III", arg.buf) == (20, 0, 2)  # the count the user needs
    _, out = hot_reset_info(a, 12 + 16)
    assert struct.unpack_from("<III", out) == (28, 0, 2)
    assert struct.unpack_from("<IHBB", out, 12) == (7, 0, 3, 0x00)
    assert struct.unpack_from("<IHBB", out, 20) == (8, 0, 3, 0x08)


def hot_reset(vdev, caller, *group_fds, flags=0, count=None):
    count = len(group_fds) if count is None else count
    data = struct.pack("<III", 12 + 4 * len(group_fds), flags, count) + fds(*group_fds)
    return ioctl(vdev, VFIO_DEVICE_PCI_HOT_RESET, data, caller)[0]


def test_pci_hot_reset_rules():
    bus, a, b = bus_of_two()
    caller = FakeCaller()
    g7, g8 = caller.add(FakeGroupFile(7)), caller.add(FakeGroupFile(8))
    efd_fd, _ = caller.eventfd()
    assert errno_of(hot_reset, a, caller, g7, g8, flags=1) == errno.EINVAL
    assert errno_of(hot_reset, a, caller, count=0) == errno.EINVAL
    assert errno_of(hot_reset, a, caller, g7, g8, g7) == errno.EINVAL  # more fds than devices
    assert errno_of(hot_reset, a, caller, g7) == errno.EINVAL          # group 8 missing
    assert errno_of(hot_reset, a, caller, g7, 99) == errno.EBADF
    assert errno_of(hot_reset, a, caller, g7, efd_fd) == errno.EINVAL  # not a group
    a.function.regs[0] = 1
    b.function.regs[0] = 2
    assert hot_reset(a, caller, g7, g8) == 0
    assert a.function.regs == {} and b.function.regs == {}


def test_pci_hot_reset_needs_every_function_bound_to_vfio_pci():
    bus, a, b = bus_of_two()
    bus.add(0x10, 9, None)
    caller = FakeCaller()
    g = [caller.add(FakeGroupFile(n)) for n in (7, 8, 9)]
    assert errno_of(hot_reset, a, caller, *g) == errno.EINVAL


@pytest.mark.parametrize("abi, header_back", [("6.1", True), ("6.12", False)])
def test_hot_reset_info_with_a_function_in_no_group_is_eperm(abi, header_back):
    """vfio_pci_fill_devs: -EPERM; 6.1 still copies the header out, 6.5+ jumps past it."""
    bus = HotResetBus(segment=0, bus=3)
    a = make(Recorder(), abi=KernelAbi(abi))
    bus.add(0x00, 7, a)
    bus.add(0x08, None, None)   # a function the IOMMU left out
    arg = FakeArg(struct.pack("<III", 12 + 16, 0x55, 0x66).ljust(28, b"\0"))
    assert errno_of(a.ioctl, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, arg) == errno.EPERM
    assert struct.unpack_from("<III", arg.buf) == ((28, 0, 0x66) if header_back else (28, 0x55, 0x66))


# -- VFIO_DEVICE_FEATURE ---------------------------------------------------------------------
def feature(vdev, flags, argsz=8):
    return ioctl(vdev, VFIO_DEVICE_FEATURE, struct.pack("<II", argsz, flags))


def test_device_feature_checks_then_enotty():
    vdev = make()
    assert errno_of(feature, vdev, VFIO_DEVICE_FEATURE_PROBE | 1, argsz=7) == errno.EINVAL
    assert errno_of(feature, vdev, 1 << 20) == errno.EINVAL  # unknown flag
    assert errno_of(feature, vdev, VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET | 1) == errno.EINVAL
    for flags in (VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_GET | 1,       # migration
                  VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_SET | 2,       # low power entry
                  VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET | 6,
                  VFIO_DEVICE_FEATURE_GET | 1):
        assert errno_of(feature, vdev, flags) == errno.ENOTTY


def test_unknown_device_ioctl_is_enotty():
    assert errno_of(ioctl, make(), 0x3B00 + 99, b"") == errno.ENOTTY


# -- IOEVENTFD -------------------------------------------------------------------------------
def test_ioeventfd_writes_the_bar_when_signalled():
    fn = Recorder()
    vdev = make(fn)
    caller = FakeCaller()
    fd, efd = caller.eventfd()
    req = struct.pack("<IIQQiI", 32, 4, region_offset(0, 0x40), 0xABCD, fd, 0)
    assert ioctl(vdev, VFIO_DEVICE_IOEVENTFD, req, caller)[0] == 0
    efd.client_write()
    assert fn.regs[0x40] == 0xABCD
    assert errno_of(ioctl, vdev, VFIO_DEVICE_IOEVENTFD, req, caller) == errno.EEXIST
    remove = struct.pack("<IIQQiI", 32, 4, region_offset(0, 0x40), 0xABCD, -1, 0)
    assert ioctl(vdev, VFIO_DEVICE_IOEVENTFD, remove, caller)[0] == 0 and not efd.watchers
    assert errno_of(ioctl, vdev, VFIO_DEVICE_IOEVENTFD, remove, caller) == errno.ENODEV
    bad = struct.pack("<IIQQiI", 32, 3, region_offset(0, 0x40), 0, fd, 0)
    assert errno_of(ioctl, vdev, VFIO_DEVICE_IOEVENTFD, bad, caller) == errno.EINVAL
    beyond = struct.pack("<IIQQiI", 32, 4, region_offset(0, 0xFFE), 0, fd, 0)
    assert errno_of(ioctl, vdev, VFIO_DEVICE_IOEVENTFD, beyond, caller) == errno.EINVAL


def test_ioeventfd_releases_its_eventfd_on_removal_and_on_release():
    # each IOEVENTFD fetched the client's eventfd into the server: removing it,
    # or the device's last close, must give that fd back
    vdev = make(Recorder())
    caller = FakeCaller()
    fd, efd = caller.eventfd()
    req = struct.pack("<IIQQiI", 32, 4, region_offset(0, 0x40), 1, fd, 0)
    assert ioctl(vdev, VFIO_DEVICE_IOEVENTFD, req, caller)[0] == 0
    assert not efd.released
    remove = struct.pack("<IIQQiI", 32, 4, region_offset(0, 0x40), 1, -1, 0)
    assert ioctl(vdev, VFIO_DEVICE_IOEVENTFD, remove, caller)[0] == 0
    assert efd.released and not efd.watchers
    fd2, efd2 = caller.eventfd()
    req2 = struct.pack("<IIQQiI", 32, 4, region_offset(0, 0x44), 2, fd2, 0)
    assert ioctl(vdev, VFIO_DEVICE_IOEVENTFD, req2, caller)[0] == 0
    vdev.release()
    assert efd2.released and not efd2.watchers and not vdev.ioeventfds


# -- DMA through the function's port -------------------------------------------------------
def test_dma_needs_bus_master_and_an_iommu():
    fn = Recorder()
    space = FakeDmaSpace()
    space.map(0x1000, 0x1000)
    vdev = make(fn, dma_space=space)
    with pytest.raises(DmaFault) as e:
        fn.dma.write(0x1000, b"x")
    assert e.value.reason == "bus-master-disabled"
    assert space.faults[-1]["reason"] == "bus-master-disabled" and fn.dma.faults[-1]["iova"] == 0x1000
    assert space.windows[0x1000][0] == 0
    enable_master(vdev)
    fn.dma.write(0x1000, b"x")
    assert fn.dma.read(0x1000, 1) == b"x"
    vdev.set_dma_space(None)
    with pytest.raises(DmaFault) as e:
        fn.dma.read(0x1000, 1)
    assert e.value.reason == "no-iommu-domain"


def test_release_quiets_the_device():
    fn = Recorder()
    vdev = make(fn)
    enable_master(vdev)
    caller = FakeCaller()
    fd, efd = caller.eventfd()
    set_irqs(vdev, caller, flags=TRIGGER_EFD, index=1, count=1, data=fds(fd))
    vdev.release()
    assert not fn.msi_enabled() and not fn.bus_master_enabled() and vdev.irq_type is None and efd.released


# -- the registry and the example model ----------------------------------------------------
def test_registry():
    assert "edu" in model_names()
    with pytest.raises(KeyError):
        create_model("no-such-device")
    with pytest.raises(TypeError):
        create_model("edu", no_such_option=1)


def test_example_scratchpad_device():
    load_model_file(EXAMPLE)
    fn = create_model("scratchpad", name="0000:00:05.0")
    vdev = make(fn)
    assert get_info(vdev).flags == VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET
    assert region_info(vdev, 0)[0].flags & VFIO_REGION_INFO_FLAG_MMAP
    assert not region_info(vdev, 2)[0].flags & VFIO_REGION_INFO_FLAG_MMAP
    vdev.write(b"hello", region_offset(0, 0x100))
    assert vdev.read(5, region_offset(0, 0x100)) == b"hello"
    caller = FakeCaller()
    efds = [caller.eventfd() for _ in range(4)]
    set_irqs(vdev, caller, flags=TRIGGER_EFD, index=1, count=4, data=fds(*[fd for fd, _ in efds]))
    bar_write(vdev, 2, 0x00, 4, 3)
    assert [e.take() for _, e in efds] == [0, 0, 0, 1]
    assert bar_read(vdev, 2, 0x04, 4) == 1
    ioctl(vdev, VFIO_DEVICE_RESET, b"")
    assert bar_read(vdev, 2, 0x04, 4) == 0 and vdev.read(5, region_offset(0, 0x100)) == bytes(5)


# -- GET_INFO copies 16 or 20 bytes, never the padding -------------------------------------
def test_get_info_copies_cap_offset_only_when_argsz_has_room():
    vdev = make()
    _, out = ioctl(vdev, VFIO_DEVICE_GET_INFO, struct.pack("<IIIIII", 24, 0, 0, 0, 0x55, 0x66))
    assert struct.unpack("<IIIIII", out) == (24, VFIO_DEVICE_FLAGS_PCI, 9, 5, 0, 0x66)
    _, out = ioctl(vdev, VFIO_DEVICE_GET_INFO, struct.pack("<IIIIII", 19, 0, 0, 0, 0x55, 0x66))
    assert struct.unpack("<IIIIII", out) == (19, VFIO_DEVICE_FLAGS_PCI, 9, 5, 0x55, 0x66)


# -- INTx eventfds: de-assign, re-assign, the unmask eventfd --------------------------------
def test_intx_reassigned_eventfd_sees_a_level_still_up():
    fn, vdev, caller, efd = intx_device()
    set_irqs(vdev, caller, flags=TRIGGER_EFD, index=0, count=1, data=fds(-1))
    fn.raise_irq(IrqIndex.INTX)  # no handler: nothing masks, nothing is signalled
    assert not vdev.intx.masked and fn.intx_asserted()
    fd2, efd2 = caller.eventfd()
    set_irqs(vdev, caller, flags=TRIGGER_EFD, index=0, count=1, data=fds(fd2))
    assert efd2.take() == 1 and vdev.intx.masked and not fn.intx_asserted()
    assert efd.take() == 0


def test_intx_unmask_eventfd_is_busy_until_deassigned():
    fn, vdev, caller, efd = intx_device()
    u1, _ = caller.eventfd()
    u2, unmask2 = caller.eventfd()
    unmask_efd = lambda fd: set_irqs(vdev, caller, flags=VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK,
                                     index=0, count=1, data=fds(fd))
    unmask_efd(u1)
    assert errno_of(unmask_efd, u2) == errno.EBUSY  # vfio_virqfd_enable
    unmask_efd(-1)
    unmask_efd(u2)
    fn.raise_irq(IrqIndex.INTX)
    fn.lower_irq()
    unmask2.client_write()
    assert not vdev.intx.masked


def test_intx_mask_reaches_the_function_and_loopback_ignores_it():
    fn, vdev, caller, efd = intx_device()
    set_irqs(vdev, caller, flags=VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_MASK, index=0, count=1, data=b"\1")
    assert vdev.intx.masked and fn.command() & 0x400
    set_irqs(vdev, caller, flags=VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER, index=0, count=1, data=b"\1")
    assert efd.take() == 1
    set_irqs(vdev, caller, flags=VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK, index=0, count=1)
    assert not vdev.intx.masked and not fn.command() & 0x400


def test_msi_count_of_the_capability_bounds_set_irqs():
    vdev = make()  # MSI with 2 vectors
    caller = FakeCaller()
    a, _ = caller.eventfd()
    assert errno_of(set_irqs, vdev, caller, flags=TRIGGER_EFD, index=1, count=3, data=fds(a, a, a)) == errno.EINVAL
    assert errno_of(set_irqs, vdev, caller, flags=TRIGGER_EFD, index=2, count=1, data=fds(a)) == errno.EINVAL  # no MSI-X
    assert errno_of(set_irqs, vdev, caller, flags=VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER,
                    index=1, count=1, data=b"\1") == errno.EINVAL  # loopback before enabling
    set_irqs(vdev, caller, flags=TRIGGER_EFD, index=1, count=2, data=fds(a, -1))
    assert vdev.function.msi.enabled_vectors() == 2


# -- VFIO_DEVICE_FEATURE: low power, the one feature vfio-pci has for every device ------------
def low_power(vdev, feature_flags, caller=None, data=b""):
    return ioctl(vdev, VFIO_DEVICE_FEATURE, struct.pack("<II", 8 + len(data), feature_flags) + data, caller)[0]


def test_low_power_features_probe_like_6_1():
    vdev = make()
    for number in (3, 4, 5):  # LOW_POWER_ENTRY, _ENTRY_WITH_WAKEUP, _EXIT: SET only
        assert low_power(vdev, VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_SET | number) == 0
        assert low_power(vdev, VFIO_DEVICE_FEATURE_PROBE | number) == 0
        assert errno_of(low_power, vdev, VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_GET | number) == errno.EINVAL
        assert errno_of(low_power, vdev, number) == errno.EINVAL  # neither GET nor SET nor PROBE
    for number in (0, 1, 2, 6, 7, 8, 9, 0xFFFF):  # VF token (not a PF), migration, 6.2+ and unknown
        assert errno_of(low_power, vdev, VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_SET | number) == errno.ENOTTY
    assert errno_of(low_power, vdev, VFIO_DEVICE_FEATURE_SET | 4) == errno.EINVAL  # no room for the eventfd


def test_low_power_entry_and_exit():
    fn = Recorder()
    vdev = make(fn)
    caller, (fd, efd) = FakeCaller(), (None, None)
    fd, efd = caller.eventfd()
    set_irqs(vdev, caller, flags=TRIGGER_EFD, index=0, count=1, data=fds(fd))
    assert low_power(vdev, VFIO_DEVICE_FEATURE_SET | 3) == 0
    assert vdev.pm_runtime_engaged and fn.command() & 0x400  # suspended: INTx masked
    fn.raise_irq(IrqIndex.INTX)
    assert efd.take() == 0
    fn.lower_irq()
    assert errno_of(low_power, vdev, VFIO_DEVICE_FEATURE_SET | 3) == errno.EINVAL  # already in low power
    assert bar_read(vdev, 0, 0, 4) == 0x05060708  # an access wakes it for its duration
    assert vdev.pm_runtime_engaged
    assert low_power(vdev, VFIO_DEVICE_FEATURE_SET | 5) == 0
    assert not vdev.pm_runtime_engaged and not fn.command() & 0x400
    fn.raise_irq(IrqIndex.INTX)
    assert efd.take() == 1


def test_low_power_with_wakeup_eventfd():
    vdev = make()
    caller = FakeCaller()
    wfd, wake = caller.eventfd()
    assert errno_of(low_power, vdev, VFIO_DEVICE_FEATURE_SET | 4, caller, struct.pack("<iI", -1, 0)) == errno.EINVAL
    assert errno_of(low_power, vdev, VFIO_DEVICE_FEATURE_SET | 4, caller, struct.pack("<iI", 99, 0)) == errno.EBADF
    assert low_power(vdev, VFIO_DEVICE_FEATURE_SET | 4, caller, struct.pack("<iI", wfd, 0)) == 0
    assert wake.take() == 0
    vdev.read(4, region_offset(7))  # the first access wakes the device: the eventfd fires, low power ends
    assert wake.take() == 1 and not vdev.pm_runtime_engaged and wake.released
    vdev.read(4, region_offset(7))
    assert wake.take() == 0


def test_low_power_puts_a_pm_capable_function_in_d3hot():
    from cuse_vfio.devices import PmCapability

    fn = Recorder()
    fn.add_capability(PmCapability())
    vdev = make(fn)
    low_power(vdev, VFIO_DEVICE_FEATURE_SET | 3)
    assert fn.power_state == 3
    assert bar_read(vdev, 0, 0, 4) == 0x05060708 and fn.power_state == 3  # woken for the access only
    vdev.release()  # out of low power; then idle again, so back in D3hot (no disable_idle_d3)
    assert fn.power_state == 3 and not vdev.pm_runtime_engaged and vdev.runtime_pm.suspended


# -- broken models -----------------------------------------------------------------------------
class Broken(Recorder):
    """A model whose reset and whose DMA-doing register are buggy."""

    def __init__(self, **options):
        super().__init__(can_reset=True, **options)

    def reset(self):
        if getattr(self, "armed", False):
            raise ZeroDivisionError("reset bug")

    def _write(self, offset, size, value):
        if offset == 0x10:
            self.dma.write(0x1000, b"x")  # bus master is off: DmaFault, which the model forgot to catch
        super()._write(offset, size, value)


def test_a_broken_model_fails_one_access_and_others_keep_running(caplog):
    broken, healthy = Broken(), Recorder()
    vb, vh = make(broken), make(healthy)
    broken.armed = True
    with caplog.at_level(logging.ERROR):
        assert errno_of(ioctl, vb, VFIO_DEVICE_RESET, b"") == errno.EIO
    assert "reset bug" in caplog.text
    assert errno_of(vb.write, b"\1\0\0\0", region_offset(0, 0x10)) == errno.EIO  # not the DmaFault's errno
    assert errno_of(vb.read, 4, region_offset(0, 0xBAD)) == errno.EIO
    assert bar_read(vb, 0, 0, 4) == 0x05060708 and cfg_read(vb, 0, 4) == 0x00011234
    assert bar_read(vh, 0, 0, 4) == 0x05060708
    broken.armed = False
    assert ioctl(vb, VFIO_DEVICE_RESET, b"")[0] == 0
    broken.armed = True
    vb.release()  # a failing reset on close is logged; the close completes
    assert not broken.bus_master_enabled()


def test_deferred_work_that_raises_is_logged_and_the_device_goes_on(caplog):
    fn = Recorder(manual_time=True)
    fn.call_later(0, lambda: 1 / 0)
    fn.call_later(0, lambda: fn.regs.__setitem__(0x40, 7))
    with caplog.at_level(logging.ERROR):
        fn.complete_pending()
    assert "ZeroDivisionError" in caplog.text and fn.regs[0x40] == 7


# -- hot reset info when a function has no IOMMU group -------------------------------------------
def test_hot_reset_info_eperm_without_a_group():
    bus, a, b = bus_of_two()
    bus.add(0x10, None, None)
    arg = FakeArg(struct.pack("<III", 12 + 3 * 8, 7, 99).ljust(12 + 3 * 8, b"\0"))
    assert errno_of(a.ioctl, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, arg) == errno.EPERM
    assert struct.unpack_from("<III", arg.buf) == (36, 0, 99)  # header back with flags 0, count untouched


# -- the registry -------------------------------------------------------------------------------
def test_create_model_passes_name_and_any_option():
    from cuse_vfio.devices import register_model

    @register_model("test-named")
    class Named(PciDevice):
        vendor_id, device_id = 0x1234, 0x4242

        def __init__(self, name=None, model_name="x", **options):
            super().__init__(name, **options)
            self.option = model_name

    fn = create_model("test-named", name="0000:00:07.0", model_name="y")
    assert fn.name == "0000:00:07.0" and fn.option == "y"
    assert create_model("test-named").name == "Named"
    assert create_model("edu", name="0000:00:02.0", manual_time=True).name == "0000:00:02.0"


def test_example_scratchpad_ram_is_shared_memory():
    load_model_file(EXAMPLE)
    load_model_file(EXAMPLE)  # loading twice re-registers the same class
    fn = create_model("scratchpad", name="0000:00:05.0")
    vdev = make(fn)
    memory, start = vdev.mmap(region_offset(0), 64 * 1024)
    client = mmap.mmap(os.dup(memory.fileno()), 64 * 1024)
    try:
        client[0:5] = b"howdy"
        assert vdev.read(5, region_offset(0)) == b"howdy"
    finally:
        client.close()
    info, out = region_info(vdev, 0, argsz=64)
    assert info.flags & VFIO_REGION_INFO_FLAG_MMAP and not info.flags & VFIO_REGION_INFO_FLAG_CAPS


def test_example_scratchpad_dma_through_the_iommu():
    load_model_file(EXAMPLE)
    fn = create_model("scratchpad", name="0000:00:05.0")
    space = FakeDmaSpace()
    host = space.map(0x200000, 0x1000)
    vdev = make(fn, dma_space=space)
    enable_master(vdev)
    vdev.write(b"to the host", region_offset(0))
    for reg, value in ((0x0C, 11), (0x10, 0x200000), (0x14, 0), (0x18, 1)):
        bar_write(vdev, 2, reg, 4, value)
    assert bytes(host[:11]) == b"to the host" and bar_read(vdev, 2, 0x1C, 4) == 0
    host[:4] = b"back"
    bar_write(vdev, 2, 0x0C, 4, 4)
    bar_write(vdev, 2, 0x18, 4, 2)
    assert vdev.read(4, region_offset(0)) == b"back"
    bar_write(vdev, 2, 0x14, 4, 1)  # 4 GiB up: nothing mapped there
    bar_write(vdev, 2, 0x18, 4, 1)
    assert bar_read(vdev, 2, 0x1C, 4) == 1 and space.faults[-1]["iova"] == 0x100200000
