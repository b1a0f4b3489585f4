"""virtio-net's PCI transport behind vfio-pci: identity, BARs, capabilities, negotiation, queues, reset, interrupts."""

import logging

import pytest

from cuse_vfio.devices import VfioPciDevice, create_model
from cuse_vfio.uapi import VFIO_DEVICE_SET_IRQS, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD
from devices_fakes import FakeCaller, FakeDmaSpace, enable_master, fds, ioctl, irq_set
from virtio_driver import (
    ACK, DRIVER, DRIVER_OK, F_ANY_LAYOUT, F_CSUM, F_CTRL_RX, F_CTRL_VQ, F_EVENT_IDX, F_INDIRECT, F_MAC, F_MRG_RXBUF,
    F_VERSION_1, FEATURES_OK, NEEDS_RESET, NET_FEATURES, NO_VECTOR, Q_DESC, Q_ENABLE, Q_NOFF, Q_SIZE,
    Memory, Regs, VirtioNetDriver, bits, ether,
)

IOVA = 0x10000000
BDF = "0000:00:03.0"
OFFERED_NET = bits(*NET_FEATURES, F_MRG_RXBUF)


def device(legacy=False, master=True, **options):
    fn = create_model("virtio-net", name=BDF, manual_time=True, **options)
    space = FakeDmaSpace()
    window = space.map(IOVA, 4 << 20)
    vdev = VfioPciDevice(fn, dma_space=space)
    vdev.open()
    if master:
        enable_master(vdev)
    drv = VirtioNetDriver(Regs.of(vdev), Memory.over(window, IOVA), legacy=legacy)
    return fn, vdev, space, drv


def enable_msix(vdev, count=4):
    caller = FakeCaller()
    efds = [caller.eventfd() for _ in range(count)]
    data = fds(*[fd for fd, _ in efds])
    ioctl(vdev, VFIO_DEVICE_SET_IRQS, irq_set(flags=VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                                              index=2, count=count, data=data), caller)
    return [efd for _, efd in efds]


def enable_intx(vdev):
    caller = FakeCaller()
    fd, efd = caller.eventfd()
    ioctl(vdev, VFIO_DEVICE_SET_IRQS, irq_set(flags=VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                                              index=0, count=1, data=fds(fd)), caller)
    return efd


# -- identity and layout -------------------------------------------------------------------------
def test_identity_bars_and_capabilities_are_qemus():
    fn, vdev, _, drv = device()
    regs = drv.regs
    assert regs.cfg_read(0, 4) == 0x10001AF4                  # 1af4:1000, transitional virtio-net
    assert regs.cfg_read(8, 4) == 0x02000000                  # class 020000, revision 0
    assert regs.cfg_read(0x2C, 4) == 0x00011AF4               # subsystem 1af4:0001 (VIRTIO_ID_NET)
    assert regs.cfg_read(0x3D, 1) == 1                        # INTA
    assert regs.cfg_read(0x10, 4) & 1 == 1                    # BAR0: I/O
    assert regs.cfg_read(0x14, 4) & 0xF == 0                  # BAR1: 32-bit memory
    assert regs.cfg_read(0x20, 4) & 0xF == 0xC                # BAR4: 64-bit prefetchable
    sizes = {}
    for bar in (0, 1, 4):
        reg = 0x10 + 4 * bar
        old = regs.cfg_read(reg, 4)
        regs.cfg_write(reg, 4, 0xFFFFFFFF)
        sizes[bar] = regs.cfg_read(reg, 4)
        regs.cfg_write(reg, 4, old)
    assert sizes == {0: 0xFFFFFFE1, 1: 0xFFFFF000, 4: 0xFFFFC00C}  # 32 bytes, 4 KiB, 16 KiB
    assert drv.caps[1] == (0x40, 4, 0x0000, 0x1000)           # common
    assert drv.caps[3] == (0x50, 4, 0x1000, 0x1000)           # ISR
    assert drv.caps[4] == (0x60, 4, 0x2000, 0x1000)           # device
    assert drv.caps[2] == (0x70, 4, 0x3000, 0x1000)           # notify
    assert regs.cfg_read(0x70 + 16, 4) == 4                   # notify_off_multiplier
    assert drv.caps[5][0] == 0x84 and drv.caps["msix"] == 0x98
    assert regs.cfg_read(0x98 + 2, 2) & 0x7FF == 3            # 4 vectors: config + rx, tx, ctrl
    assert regs.cfg_read(0x98 + 4, 4) == 0x1 and regs.cfg_read(0x98 + 8, 4) == 0x801  # BAR1: table 0, PBA 0x800


def test_legacy_header_and_config_move_when_msix_is_enabled():
    fn, vdev, _, drv = device(legacy=True, mac="52:54:00:ab:cd:ef")
    assert drv.mac() == bytes.fromhex("525400abcdef")
    assert drv.config(6, 2) == 1                              # status: link up
    assert drv.config(8, 4) == 0xFFFFFFFF                     # past the 8-byte config: all ones
    assert drv.regs.bar_read(0, 20, 2) == 0x5452              # offset 20 is the MAC while MSI-X is off
    enable_msix(vdev)
    assert drv.regs.bar_read(0, 20, 2) == NO_VECTOR           # now the config vector
    assert drv.mac() == bytes.fromhex("525400abcdef")         # and the config starts at 24
    assert drv.regs.bar_read(0, 5, 1) == 0xFF                 # no register at 5: all ones, as QEMU


def test_eight_byte_accesses_are_two_four_byte_ones():
    fn, vdev, _, drv = device()
    drv.select(1)
    drv.regs.bar_write(4, Q_DESC, 8, 0x0000_0012_3456_7000)
    assert drv._common(Q_DESC, 4) == 0x3456_7000 and drv._common(Q_DESC + 4, 4) == 0x12
    assert drv.regs.bar_read(4, Q_DESC, 8) == 0x0000_0012_3456_7000


def test_pci_config_access_capability_reaches_the_modern_bar():
    fn, vdev, _, drv = device()
    cap = drv.caps[5][0]
    regs = drv.regs
    regs.cfg_write(cap + 4, 1, 4)                             # bar 4
    regs.cfg_write(cap + 8, 4, 0x14)                          # common config: device_status
    regs.cfg_write(cap + 12, 4, 1)                            # one byte
    regs.cfg_write(cap + 16, 4, ACK)
    assert fn.status == ACK and regs.cfg_read(cap + 16, 1) == ACK
    regs.cfg_write(cap + 8, 4, 0x2000)                        # device config: the MAC
    regs.cfg_write(cap + 12, 4, 4)
    assert regs.cfg_read(cap + 16, 4) == int.from_bytes(fn.mac[:4], "little")
    regs.cfg_write(cap + 4, 1, 0)                             # any other BAR: nothing is reached
    assert regs.cfg_read(cap + 16, 4) == 0xFFFFFFFF


# -- feature negotiation ------------------------------------------------------------------------------
def test_legacy_features_are_32_bits_without_version_1():
    fn, vdev, _, drv = device(legacy=True)
    host = drv.device_features()
    assert host == OFFERED_NET | bits(F_INDIRECT, F_EVENT_IDX, F_ANY_LAYOUT)
    drv.negotiate(bits(F_MAC, F_CSUM, F_MRG_RXBUF))           # CSUM was not offered: dropped
    assert drv._legacy(4, 4) == bits(F_MAC, F_MRG_RXBUF)
    assert fn.hdr_len == 12 and fn.mergeable
    drv.negotiate(bits(F_MAC))
    assert fn.hdr_len == 10 and not fn.mergeable


def test_modern_features_have_version_1_and_no_any_layout():
    fn, vdev, _, drv = device()
    offered = drv.device_features()
    assert offered == OFFERED_NET | bits(F_INDIRECT, F_EVENT_IDX, F_VERSION_1)
    assert drv.negotiate(bits(F_MAC, F_VERSION_1))
    assert fn.hdr_len == 12 and not fn.mergeable


@pytest.mark.parametrize("features, reason", [
    (bits(F_MAC, F_VERSION_1, F_CSUM), "did not offer"),
    (bits(F_MAC, F_VERSION_1, F_ANY_LAYOUT), "did not offer"),
    (bits(F_MAC), "VIRTIO_F_VERSION_1"),
    (bits(F_VERSION_1, F_CTRL_RX), "needs VIRTIO_NET_F_CTRL_VQ"),
])
def test_features_ok_is_refused(features, reason, caplog):
    fn, vdev, _, drv = device()
    drv.set_status(0)
    drv.set_status(ACK | DRIVER)
    drv.write_features(features)
    with caplog.at_level(logging.WARNING):
        drv.set_status(ACK | DRIVER | FEATURES_OK)
    assert drv.status() == ACK | DRIVER
    assert "FEATURES_OK refused" in caplog.text and reason in caplog.text


def test_features_cannot_change_after_features_ok():
    fn, vdev, _, drv = device()
    assert drv.negotiate(bits(F_MAC, F_VERSION_1, F_CTRL_VQ))
    drv.write_features(bits(F_MAC, F_VERSION_1))
    assert fn.has_feature(F_CTRL_VQ)


# -- queues ------------------------------------------------------------------------------------------------
def test_legacy_queue_setup():
    fn, vdev, _, drv = device(legacy=True, queue_size=128)
    assert [drv.queue_size(i) for i in range(4)] == [128, 128, 64, 0]
    drv.negotiate(bits(F_MAC, F_CTRL_VQ))
    q = drv.setup_queue(1)
    assert drv._legacy(8, 4) == q.desc >> 12
    dev_q = fn.queues[1]
    assert (dev_q.desc, dev_q.avail, dev_q.used) == (q.desc, q.avail, q.used)
    assert dev_q.used % 4096 == 0


def test_modern_queue_setup_and_size():
    fn, vdev, _, drv = device()
    assert drv.negotiate(bits(F_MAC, F_VERSION_1, F_CTRL_VQ))
    assert drv._common(18, 2) == 3                            # num_queues
    drv.select(0)
    for bad in (100, 512, 0):
        drv._common(Q_SIZE, 2, bad)
        assert drv._common(Q_SIZE, 2) == 256                  # not a power of two / too big / zero
    drv._common(Q_SIZE, 2, 64)
    assert drv._common(Q_SIZE, 2) == 64
    assert drv._common(Q_NOFF, 2) == 0
    q = drv.setup_queue(0, 64)
    assert fn.queues[0].size == 64 and fn.queues[0].desc == q.desc and fn.queues[0].enabled
    drv._common(Q_DESC, 4, 0x1234000)                         # an enabled queue's config stays
    assert drv._common(Q_DESC, 4) == q.desc & 0xFFFFFFFF
    drv.select(2)
    assert drv._common(Q_NOFF, 2) == 2 and drv._common(Q_ENABLE, 2) == 0


def test_queue_enable_with_0_is_a_driver_error(caplog):
    fn, vdev, _, drv = device()
    assert drv.negotiate(bits(F_MAC, F_VERSION_1))
    drv.select(0)
    with caplog.at_level(logging.WARNING):
        drv._common(Q_ENABLE, 2, 0)
    assert drv.status() & NEEDS_RESET and "queue_enable" in caplog.text


# -- reset ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("legacy", [True, False])
def test_status_0_resets_everything(legacy):
    fn, vdev, _, drv = device(legacy=legacy)
    drv.bring_up()
    enable_msix(vdev)
    assert drv.set_queue_vector(1, 2) == 2 and drv.set_config_vector(0) == 0
    drv.send(ether(b"\xff" * 6, fn.mac))
    fn.isr = 3
    drv.command(1, 1, bytes.fromhex("020000000001"))          # MAC_ADDR_SET
    assert fn.mac == bytes.fromhex("020000000001")
    drv.set_status(0)
    assert drv.status() == 0 and fn.features == 0 and fn.isr == 0
    assert fn.mac == fn.perm_mac and fn.promisc
    assert all(not q.ready and q.vector == NO_VECTOR and q.last_avail == 0 for q in fn.queues)
    assert fn.config_vector == NO_VECTOR
    drv.select(1)
    if legacy:
        assert drv._legacy(8, 4) == 0
    else:
        assert drv._common(Q_ENABLE, 2) == 0 and drv._common(Q_DESC, 4) == 0


def test_legacy_pfn_0_resets_the_device_as_qemu():
    fn, vdev, _, drv = device(legacy=True)
    drv.bring_up()
    drv.select(1)
    drv._legacy(8, 4, 0)
    assert drv.status() == 0 and not fn.queues[0].ready


def test_clearing_bus_master_takes_driver_ok_away():
    fn, vdev, _, drv = device()
    drv.bring_up()
    cmd = drv.regs.cfg_read(4, 2)
    drv.regs.cfg_write(4, 2, cmd & ~0x4)
    assert not drv.status() & DRIVER_OK


# -- interrupts ----------------------------------------------------------------------------------------------
def intx_status(drv):
    return bool(drv.regs.cfg_read(6, 2) & 0x08)


@pytest.mark.parametrize("legacy", [True, False])
def test_isr_reads_and_clears_and_lowers_intx(legacy):
    fn, vdev, _, drv = device(legacy=legacy)
    efd = enable_intx(vdev)
    drv.bring_up()
    drv.send(ether(fn.mac, b"\x02" * 6))
    assert intx_status(drv) and efd.take() == 1               # tx used + rx used: one level
    assert drv.isr() == 1
    assert not intx_status(drv) and drv.isr() == 0
    fn.set_link(False)                                        # a config change: ISR bits 0 and 1
    assert intx_status(drv) and drv.isr() == 3 and not intx_status(drv)


def test_msix_vectors_per_queue_and_config():
    fn, vdev, _, drv = device()
    efds = enable_msix(vdev)
    drv.bring_up()
    assert drv.set_config_vector(0) == 0
    assert drv.set_queue_vector(0, 1) == 1 and drv.set_queue_vector(1, 2) == 2
    assert drv.set_queue_vector(2, 4) == NO_VECTOR            # beyond the 4-entry table: refused
    drv.send(ether(fn.mac, b"\x02" * 6))
    assert [e.take() for e in efds] == [0, 1, 1, 0]
    fn.set_link(False)
    assert [e.take() for e in efds] == [1, 0, 0, 0]
    assert not intx_status(drv)
    drv.command(0, 0, b"\x01")                                # ctrl has no vector: no message
    assert [e.take() for e in efds] == [0, 0, 0, 0]


def test_config_change_waits_for_driver_ok_but_the_generation_moves():
    fn, vdev, _, drv = device()
    efd = enable_intx(vdev)
    gen = drv.generation()
    fn.set_link(False)
    assert drv.generation() == (gen + 1) & 0xFF and efd.take() == 0 and fn.isr == 0
    assert drv.config(6, 2) == 0
