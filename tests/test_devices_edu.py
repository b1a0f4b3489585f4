"""QEMU's edu device behind vfio-pci, checked register by register against hw/misc/edu.c."""

import errno
import logging
import time

from cuse_vfio.core import KernelAbi
from cuse_vfio.devices import VfioPciDevice, create_model
from cuse_vfio.devices.edu import DMA_START
from cuse_vfio.devices.pci import capability_offsets
from cuse_vfio.uapi import (
    VFIO_DEVICE_FLAGS_PCI,
    VFIO_DEVICE_FLAGS_RESET,
    VFIO_DEVICE_GET_INFO,
    VFIO_DEVICE_RESET,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    VFIO_DEVICE_SET_IRQS,
)
from devices_fakes import (
    FakeCaller,
    FakeDmaSpace,
    bar_read,
    bar_write,
    cfg_read,
    enable_master,
    errno_of,
    fds,
    ioctl,
    irq_set,
    region_offset,
)

IOVA = 0x100000
TRIGGER_EFD = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER


def edu(manual_time=True, master=True, **options):
    fn = create_model("edu", name="0000:00:02.0", manual_time=manual_time, **options)
    space = FakeDmaSpace()
    ram = space.map(IOVA, 2 * 4096)
    # 6.12's vfio-pci: 8-byte BAR accesses reach the model whole (rdwr.BAR_IO_WIDTH)
    vdev = VfioPciDevice(fn, dma_space=space, abi=KernelAbi("6.12"))
    vdev.open()
    if master:
        enable_master(vdev)
    return fn, vdev, space, ram


def rd(vdev, reg, size=4):
    return bar_read(vdev, 0, reg, size)


def wr(vdev, reg, value, size=4):
    bar_write(vdev, 0, reg, size, value)


def irq_eventfd(vdev, index):
    caller = FakeCaller()
    fd, efd = caller.eventfd()
    ioctl(vdev, VFIO_DEVICE_SET_IRQS, irq_set(flags=TRIGGER_EFD, index=index, count=1, data=fds(fd)), caller)
    return caller, efd


# -- identity -----------------------------------------------------------------------
def test_identity_and_config_space():
    fn, vdev, _, _ = edu()
    assert cfg_read(vdev, 0, 4) == 0x11E81234
    assert cfg_read(vdev, 8, 4) == 0x00FF0010  # class 00ff00, revision 0x10
    assert cfg_read(vdev, 0x3D, 1) == 1       # INTA
    assert vdev.vconfig.size == 256
    caps = capability_offsets(lambda o, s: cfg_read(vdev, o, s))
    assert list(caps.values()) == [0x05]
    msi = next(iter(caps))
    assert cfg_read(vdev, msi + 2, 2) == 0x0080  # 1 vector, 64-bit, no per-vector mask
    for reg in range(0x10, 0x28, 4):
        vdev.write(b"\xff" * 4, region_offset(7, reg))
    assert cfg_read(vdev, 0x10, 4) == 0xFFF00000  # 1 MiB, 32-bit, non-prefetchable
    assert all(cfg_read(vdev, reg, 4) == 0 for reg in range(0x14, 0x28, 4))
    _, out = ioctl(vdev, VFIO_DEVICE_GET_INFO, bytes.fromhex("18000000") + bytes(20))
    assert int.from_bytes(out[4:8], "little") == VFIO_DEVICE_FLAGS_PCI  # no reset, as the kernel sees edu


def test_id_liveness_and_unknown_registers():
    _, vdev, _, _ = edu()
    assert rd(vdev, 0x00) == 0x010000ED
    assert rd(vdev, 0x04) == 0
    wr(vdev, 0x04, 0x12345678)
    assert rd(vdev, 0x04) == 0xEDCBA987
    assert rd(vdev, 0x0C) == 0xFFFFFFFF and rd(vdev, 0x60) == 0xFFFFFFFF  # nothing there / write-only
    assert rd(vdev, 0x40000) == 0xFFFFFFFF  # the DMA buffer is not visible through MMIO


def test_access_sizes():
    _, vdev, _, _ = edu()
    assert rd(vdev, 0x00, 2) == 0 and rd(vdev, 0x00, 1) == 0     # refused by the memory core
    assert rd(vdev, 0x00, 8) == 0xFFFFFFFFFFFFFFFF               # 8 bytes below 0x80
    wr(vdev, 0x04, 0x1111, size=2)
    wr(vdev, 0x00, 0x5555, size=8)
    assert rd(vdev, 0x04) == 0
    wr(vdev, 0x80, 0x1122334455667788, size=8)
    assert rd(vdev, 0x80, 8) == 0x1122334455667788
    assert rd(vdev, 0x80) == 0x55667788
    assert rd(vdev, 0x84) == 0xFFFFFFFF
    wr(vdev, 0x80, 0xAABBCCDD)  # a 4-byte write replaces the whole 64-bit field
    assert rd(vdev, 0x80, 8) == 0xAABBCCDD


def test_access_sizes_with_the_6_1_split():
    fn = create_model("edu", manual_time=True)
    vdev = VfioPciDevice(fn)  # 6.1, the default kernel ABI
    vdev.open()
    wr(vdev, 0x80, 0x1122334455667788, size=8)  # two 4-byte writes: 0x84 is no register
    assert rd(vdev, 0x80, 8) == 0xFFFFFFFF55667788


# -- factorial ------------------------------------------------------------------------
def test_factorial_busy_then_done():
    fn, vdev, _, _ = edu()
    wr(vdev, 0x08, 10)
    assert rd(vdev, 0x20) & 0x01
    wr(vdev, 0x08, 5)  # ignored while computing
    assert rd(vdev, 0x08) == 10
    fn.complete_pending()
    assert rd(vdev, 0x20) & 0x01 == 0
    assert rd(vdev, 0x08) == 3628800


def test_factorial_wraps_like_32_bit_arithmetic():
    fn, vdev, _, _ = edu()
    for n, want in ((0, 1), (1, 1), (13, 6227020800 & 0xFFFFFFFF), (33, 2147483648), (34, 0), (1000, 0)):
        wr(vdev, 0x08, n)
        fn.complete_pending()
        assert rd(vdev, 0x08) == want, n


def test_status_register_only_irqfact_is_writable():
    fn, vdev, _, _ = edu()
    wr(vdev, 0x20, 0xFF)
    assert rd(vdev, 0x20) == 0x80
    wr(vdev, 0x20, 0)
    assert rd(vdev, 0x20) == 0


def test_factorial_raises_irq_when_asked():
    fn, vdev, _, _ = edu()
    caller, efd = irq_eventfd(vdev, 0)
    wr(vdev, 0x20, 0x80)
    wr(vdev, 0x08, 4)
    fn.complete_pending()
    assert rd(vdev, 0x08) == 24 and rd(vdev, 0x24) == 0x1 and efd.take() == 1


def test_factorial_in_real_time():
    fn, vdev, _, _ = edu(manual_time=False, fact_delay=0.05)
    # Deferred work runs under the device lock: holding it pins the moment between
    # the write and the timer, whatever the machine's load.
    with fn.lock:
        wr(vdev, 0x08, 12)
        assert rd(vdev, 0x20) & 0x01  # a polling client sees the busy bit
    deadline = time.monotonic() + 5
    while rd(vdev, 0x20) & 0x01 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert rd(vdev, 0x08) == 479001600


# -- interrupts -------------------------------------------------------------------------
def intx_status(vdev):
    """The Interrupt Status bit the user reads in config space: the function's INTx level."""
    return bool(cfg_read(vdev, 6, 2) & 0x08)


def test_intx_raise_and_acknowledge():
    fn, vdev, _, _ = edu()
    caller, efd = irq_eventfd(vdev, 0)
    wr(vdev, 0x60, 0x42)
    assert rd(vdev, 0x24) == 0x42 and efd.take() == 1 and intx_status(vdev)
    assert not fn.intx_asserted()  # automasked: vfio-pci set the function's INTx-disable bit
    wr(vdev, 0x64, 0x02)
    assert rd(vdev, 0x24) == 0x40 and intx_status(vdev)  # still a reason: the level stays up
    ioctl(vdev, VFIO_DEVICE_SET_IRQS, irq_set(flags=VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
                                              index=0, count=1), caller)
    assert efd.take() == 1 and vdev.intx.masked  # unmask with the level still up: signalled again
    wr(vdev, 0x64, 0x40)
    assert rd(vdev, 0x24) == 0 and not intx_status(vdev)
    ioctl(vdev, VFIO_DEVICE_SET_IRQS, irq_set(flags=VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
                                              index=0, count=1), caller)
    assert efd.take() == 0 and not vdev.intx.masked
    wr(vdev, 0x60, 0x1)
    assert efd.take() == 1 and fn.config_read(4, 2) & 0x400


def test_msi_when_enabled():
    fn, vdev, _, _ = edu()
    caller, efd = irq_eventfd(vdev, 1)
    wr(vdev, 0x60, 0x42)
    assert efd.take() == 1 and not intx_status(vdev)
    wr(vdev, 0x60, 0x01)
    assert efd.take() == 1  # every raise sends a message
    wr(vdev, 0x64, 0x43)
    assert rd(vdev, 0x24) == 0
    ioctl(vdev, VFIO_DEVICE_SET_IRQS, irq_set(flags=VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                                              index=1, count=0), caller)
    assert not fn.msi_enabled()


# -- DMA ------------------------------------------------------------------------------------
def dma(fn, vdev, src, dst, count, cmd):
    wr(vdev, 0x80, src, size=8)
    wr(vdev, 0x88, dst, size=8)
    wr(vdev, 0x90, count, size=8)
    wr(vdev, 0x98, cmd, size=8)
    assert rd(vdev, 0x98) & 0x1
    fn.complete_pending()
    assert rd(vdev, 0x98) & 0x1 == 0


def test_dma_round_trip():
    fn, vdev, space, ram = edu()
    ram[:64] = bytes((i * 7 + 1) & 0xFF for i in range(64))
    dma(fn, vdev, IOVA, DMA_START, 64, 0x1)
    assert fn.dma_buf[:64] == ram[:64]
    dma(fn, vdev, DMA_START, IOVA + 4096, 64, 0x1 | 0x2)
    assert ram[4096:4096 + 64] == ram[:64]
    assert not space.faults


def test_dma_irq_when_done():
    fn, vdev, space, ram = edu()
    caller, efd = irq_eventfd(vdev, 1)
    dma(fn, vdev, IOVA, DMA_START + 8, 8, 0x1 | 0x4)
    assert rd(vdev, 0x24) == 0x100 and efd.take() == 1


def test_dma_registers_are_frozen_while_running():
    fn, vdev, space, ram = edu()
    wr(vdev, 0x80, IOVA, size=8)
    wr(vdev, 0x88, DMA_START, size=8)
    wr(vdev, 0x90, 4, size=8)
    wr(vdev, 0x98, 0x1)
    wr(vdev, 0x80, 0x999)
    wr(vdev, 0x98, 0x3)
    wr(vdev, 0x98, 0x0)
    assert rd(vdev, 0x80, 8) == IOVA and rd(vdev, 0x98) == 0x1
    fn.complete_pending()
    wr(vdev, 0x98, 0x2)  # without the start bit: ignored
    assert rd(vdev, 0x98) == 0 and not fn.deferred.pending()


def test_dma_outside_the_device_buffer_is_skipped(caplog):
    fn, vdev, space, ram = edu()
    ram[:16] = b"\xaa" * 16
    with caplog.at_level(logging.WARNING):
        dma(fn, vdev, IOVA, DMA_START + 4090, 16, 0x1)
    assert "outside the device buffer" in caplog.text
    assert fn.dma_buf[4090:] == bytes(6)
    dma(fn, vdev, DMA_START - 1, IOVA, 2, 0x1 | 0x2)
    assert ram[:16] == b"\xaa" * 16 and not space.faults


def test_dma_with_bus_master_off_moves_nothing_and_records_a_fault():
    fn, vdev, space, ram = edu(master=False)
    ram[:8] = b"12345678"
    dma(fn, vdev, IOVA, DMA_START, 8, 0x1)
    assert fn.dma_buf[:8] == bytes(8)
    assert space.faults[-1]["reason"] == "bus-master-disabled"
    assert fn.dma.faults[-1]["reason"] == "bus-master-disabled"


def test_dma_to_an_unmapped_iova_faults_in_the_iommu():
    fn, vdev, space, ram = edu()
    dma(fn, vdev, DMA_START, 0x900000, 8, 0x1 | 0x2)
    assert space.faults[-1] == {"iova": 0x900000, "size": 8, "write": True, "reason": "unmapped"}


def test_dma_addresses_are_masked_to_28_bits():
    fn, vdev, space, ram = edu()
    ram[:4] = b"edu!"
    dma(fn, vdev, (1 << 28) | IOVA, DMA_START, 4, 0x1)
    assert fn.dma_buf[:4] == b"edu!"
    fn2, vdev2, space2, ram2 = edu(dma_mask=(1 << 32) - 1)
    dma(fn2, vdev2, (1 << 28) | IOVA, DMA_START, 4, 0x1)
    assert space2.faults[-1]["iova"] == (1 << 28) | IOVA


def test_reset_option():
    fn, vdev, _, _ = edu()
    assert errno_of(ioctl, vdev, VFIO_DEVICE_RESET, b"") == errno.EINVAL
    fn, vdev, _, _ = edu(reset=True)
    _, out = ioctl(vdev, VFIO_DEVICE_GET_INFO, bytes.fromhex("18000000") + bytes(20))
    assert int.from_bytes(out[4:8], "little") == VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET
    wr(vdev, 0x04, 0)
    wr(vdev, 0x08, 3)
    ioctl(vdev, VFIO_DEVICE_RESET, b"")
    assert rd(vdev, 0x04) == 0 and rd(vdev, 0x20) == 0 and not fn.deferred.pending()


def test_state_survives_close_without_reset():
    fn, vdev, _, _ = edu()
    wr(vdev, 0x04, 0)
    vdev.release()
    vdev.open()
    enable_master(vdev)
    assert rd(vdev, 0x04) == 0xFFFFFFFF  # the kernel cannot reset edu, so neither does close


# -- what the reference machine shows (tests/conformance/real-6.1.txt: 6.1 vfio-pci, QEMU q35) ----
# BAR0 is where SeaBIOS puts a lone edu's (0xfea00000); the conformance VM's machine, with a root
# port and two more edus, has it at 0xfe600000, which tests/conformance/vm.toml gives as bar0_address.
def test_config_space_as_on_the_reference_machine():
    fn = create_model("edu", name="0000:00:02.0", manual_time=True)
    vdev = VfioPciDevice(fn)
    vdev.open()
    want = {
        (0x00, 2): 0x1234, (0x02, 2): 0x11E8, (0x04, 2): 0x103, (0x06, 2): 0x10, (0x08, 1): 0x10,
        (0x0C, 1): 0, (0x0D, 1): 0, (0x0E, 1): 0, (0x0F, 1): 0, (0x10, 4): 0xFEA00000,
        (0x14, 4): 0, (0x24, 4): 0, (0x28, 4): 0, (0x2C, 2): 0x1AF4, (0x2E, 2): 0x1100, (0x30, 4): 0,
        (0x34, 1): 0x40, (0x3C, 1): 0x0B, (0x3D, 1): 1, (0x3E, 1): 0, (0x3F, 1): 0,
        (0x40, 1): 0x05, (0x42, 2): 0x80, (0xFC, 4): 0, (0x01, 1): 0x12,
    }
    assert {key: cfg_read(vdev, *key) for key in want} == want
    assert cfg_read(vdev, 0x08, 4) >> 8 == 0x00FF00  # config.class
    for reg, sizing in ((0x10, 0xFFF00000), (0x14, 0), (0x30, 0)):
        before = cfg_read(vdev, reg, 4)
        vdev.write(b"\xff" * 4, region_offset(7, reg))
        assert cfg_read(vdev, reg, 4) == sizing
        vdev.write(before.to_bytes(4, "little"), region_offset(7, reg))
        assert cfg_read(vdev, reg, 4) == before
    enable_master(vdev)
    assert cfg_read(vdev, 4, 2) == 0x107
    assert errno_of(vdev.read, 4, region_offset(7, 0x100)) == errno.EFAULT
    assert errno_of(vdev.read, 4, region_offset(7, 0xFE)) == errno.EFAULT
    assert rd(vdev, 0xFFFFC) == 0xFFFFFFFF and rd(vdev, 0x10) == 0xFFFFFFFF
    assert errno_of(rd, vdev, 0x100000) == errno.EINVAL
    assert errno_of(vdev.read, 4, region_offset(1)) == errno.EINVAL
    cfg_write_ = lambda v: vdev.write(v.to_bytes(2, "little"), region_offset(7, 4))
    cfg_write_(0x105)
    assert errno_of(rd, vdev, 0) == errno.EIO
    cfg_write_(0x107)
    assert rd(vdev, 0) == 0x010000ED


def test_msi_enable_leaves_the_virtual_control_and_command_as_the_user_wrote_them():
    fn, vdev, _, _ = edu()
    caller, efd = irq_eventfd(vdev, 1)
    assert fn.msi_enabled()
    assert cfg_read(vdev, 0x42, 2) == 0x80 and cfg_read(vdev, 4, 2) == 0x107  # as on 6.1
    ioctl(vdev, VFIO_DEVICE_SET_IRQS, irq_set(flags=VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                                              index=1, count=0), caller)
    assert cfg_read(vdev, 0x42, 2) == 0x80


def test_msi_enable_with_no_vectors_is_erange():
    fn, vdev, _, _ = edu()
    data = irq_set(flags=TRIGGER_EFD, index=1, start=0, count=0)
    assert errno_of(ioctl, vdev, VFIO_DEVICE_SET_IRQS, data) == errno.ERANGE  # pci_alloc_irq_vectors(1, 0)
    assert vdev.irq_type is None


def test_dma_waits_for_qemus_100_ms_timer():
    fn, vdev, space, ram = edu(manual_time=False)
    ram[:4] = b"abcd"
    wr(vdev, 0x80, IOVA, size=8)
    wr(vdev, 0x88, DMA_START, size=8)
    wr(vdev, 0x90, 4, size=8)
    start = time.monotonic()
    wr(vdev, 0x98, 0x1)
    while rd(vdev, 0x98) & 1 and time.monotonic() - start < 5:
        time.sleep(0.01)
    assert time.monotonic() - start >= 0.09 and fn.dma_buf[:4] == b"abcd"
