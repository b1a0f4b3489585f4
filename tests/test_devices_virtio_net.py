"""virtio-net's data path: rings, chains, notifications, mergeable buffers, control queue, errors, faults, pcap."""

import logging
import struct

import pytest

from test_devices_virtio_pci import IOVA, device, enable_intx, enable_msix
from virtio_driver import (
    DRIVER_OK, F_EVENT_IDX, F_INDIRECT, F_MRG_RXBUF, NEEDS_RESET, bits, ether,
)

PEER = bytes.fromhex("020000000002")
BROADCAST = b"\xff" * 6


def frame_to(fn, size=60, tag=0):
    return ether(fn.mac, PEER, bytes([tag]) * (size - 14))


# -- loopback ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("legacy", [True, False])
def test_loopback_round_trip(legacy):
    fn, vdev, space, drv = device(legacy=legacy)
    drv.bring_up()
    frames = [frame_to(fn, 60 + i, i) for i in range(5)]
    for f in frames:
        drv.send(f)
    got = drv.received()
    assert [payload for _, payload in got] == frames
    assert all(header == bytes(drv.hdr_len) for header, _ in got)  # no csum, no GSO
    assert drv.hdr_len == (10 if legacy else 12)
    assert [n for _, n in drv.queues[1].take_used()] == [0] * 5  # tx chains: nothing written
    assert fn.stats["tx_packets"] == fn.stats["rx_packets"] == 5 and not space.faults


def test_loopback_drops_and_counts_without_receive_buffers():
    fn, vdev, _, drv = device()
    drv.bring_up(rx_buffers=2)
    for i in range(4):
        drv.send(frame_to(fn, tag=i))
    assert len(drv.received()) == 2 and fn.stats["rx_dropped_no_buffer"] == 2
    assert drv.queues[0].used_flags() == 0                    # dry: the device wants to hear of new buffers
    drv.post_rx(1, 1526)
    drv.send(frame_to(fn, tag=9))
    assert [p[14] for _, p in drv.received()] == [9]
    assert drv.queues[0].used_flags() == 1                    # buffers left: VRING_USED_F_NO_NOTIFY


def test_transmit_waits_for_driver_ok_then_goes():
    fn, vdev, _, drv = device()
    assert drv.negotiate(bits(5, 32))
    for i in range(2):
        drv.setup_queue(i)
    drv.post_rx(4, 1526)
    drv.send(frame_to(fn, tag=7))
    assert fn.stats["tx_packets"] == 0                        # not before DRIVER_OK
    drv.set_status(drv.status() | DRIVER_OK)
    assert [p[14] for _, p in drv.received()] == [7]


# -- rings and chains ---------------------------------------------------------------------------------------
def test_ring_positions_wrap():
    fn, vdev, _, drv = device(legacy=True, queue_size=4)
    drv.bring_up(rx_buffers=4, ctrl=False)
    seen = []
    for i in range(11):
        drv.send(frame_to(fn, tag=i))
        drv.queues[1].take_used()
        seen += [p[14] for _, p in drv.received()]
        drv.post_rx(1, 1526)
    assert seen == list(range(11))
    assert fn.queues[0].used_idx == 11 and fn.queues[1].last_avail == 11


def test_ring_indexes_wrap_at_65536():
    fn, vdev, _, drv = device(queue_size=8)
    drv.bring_up(rx_buffers=0, ctrl=False)
    start = 65533
    for dq, q in ((drv.queues[0], fn.queues[0]), (drv.queues[1], fn.queues[1])):
        dq.avail_idx = dq.last_used = start
        dq.publish()
        dq.mem.put_u16(dq.used + 2, start)
        q.last_avail = q.used_idx = start
    drv.post_rx(8, 1526)
    for i in range(6):
        drv.send(frame_to(fn, tag=i))
    assert [p[14] for _, p in drv.received()] == list(range(6))
    assert fn.queues[0].used_idx == (start + 6) & 0xFFFF == 3


def test_a_runaway_driver_gets_one_ring_a_notify_then_the_rest_is_deferred():
    fn, vdev, _, drv = device(queue_size=8)
    drv.bring_up(rx_buffers=0, ctrl=False)
    sent = []

    class Runaway:
        """A driver on another core that keeps offering (the same chain again) while the device works."""
        kind = "test"

        def transmit(self, frame):
            sent.append(frame)
            if len(sent) < 20:
                drv.queues[1].offer(0)
                drv.queues[1].publish()

    fn.backend = Runaway()
    drv.send(frame_to(fn))
    assert len(sent) == 8 and fn.deferred.pending() == 1     # one ring's worth, then the lock is let go
    assert drv.queues[1].used_idx() == 8
    fn.complete_pending()
    assert len(sent) == 20 and drv.queues[1].used_idx() == 20


def test_chained_and_indirect_transmit():
    fn, vdev, _, drv = device()
    drv.bring_up(extra=[F_INDIRECT])
    a, b = frame_to(fn, 100, 1), frame_to(fn, 200, 2)
    drv.send(a, split=True)                                   # header, 20 bytes, the rest: three descriptors
    drv.send(b, indirect=True)                                # one descriptor pointing at a table
    assert [p for _, p in drv.received()] == [a, b]


def test_receive_into_a_chain_of_buffers():
    fn, vdev, _, drv = device()
    drv.bring_up(rx_buffers=0)
    drv.queues[0].add(ins=[12, 30, 30, 1000])
    drv.queues[0].publish()
    f = frame_to(fn, 300, 3)
    drv.send(f)
    [(head, length)] = drv.queues[0].take_used()
    assert length == 12 + 300
    assert drv.queues[0].written(head, length) == bytes(12) + f


def test_a_frame_too_big_for_one_buffer_is_dropped_without_mergeable():
    fn, vdev, _, drv = device()
    drv.bring_up(rx_buffers=0)
    drv.post_rx(2, 100)
    drv.send(frame_to(fn, 200))
    assert drv.received() == [] and fn.stats["rx_dropped_too_big"] == 1
    drv.send(frame_to(fn, 80, 5))                             # the buffer was given back, unused
    assert [p[14] for _, p in drv.received()] == [5]


def test_mergeable_receive_buffers():
    fn, vdev, _, drv = device(legacy=True)
    drv.bring_up(extra=[F_MRG_RXBUF], rx_buffers=0)
    assert drv.hdr_len == 12
    drv.post_rx(6, 64)
    big = frame_to(fn, 200, 4)                                # 12 + 200 bytes: four 64-byte buffers
    drv.send(big)
    used = drv.queues[0].take_used()
    assert [n for _, n in used] == [64, 64, 64, 20]
    first = drv.queues[0].written(used[0][0], 64)
    assert struct.unpack_from("<H", first, 10)[0] == 4        # num_buffers
    rest = b"".join(drv.queues[0].written(h, n) for h, n in used)[12:]
    assert rest == big
    drv.send(frame_to(fn, 200, 5))                            # only 2 buffers left: given back, dropped
    assert drv.queues[0].take_used() == [] and fn.stats["rx_dropped_no_buffer"] == 1
    assert fn.queues[0].last_avail == 4
    drv.post_rx(2, 64)
    drv.send(frame_to(fn, 200, 6))
    [(header, payload)] = drv.received()
    assert payload[14] == 6 and struct.unpack_from("<H", header, 10)[0] == 4


# -- notification suppression -----------------------------------------------------------------------------
def test_no_interrupt_flag_suppresses_interrupts():
    fn, vdev, _, drv = device()
    efds = enable_msix(vdev)
    drv.bring_up()
    drv.set_queue_vector(0, 1)
    drv.set_queue_vector(1, 2)
    drv.queues[1].set_avail_flags(1)                          # VRING_AVAIL_F_NO_INTERRUPT on tx
    drv.send(frame_to(fn))
    assert [e.take() for e in efds] == [0, 1, 0, 0]
    assert len(drv.queues[1].take_used()) == 1                # the work was done all the same


def test_event_idx_interrupts_only_when_used_event_is_crossed():
    fn, vdev, _, drv = device()
    efds = enable_msix(vdev)
    drv.bring_up(extra=[F_EVENT_IDX], rx_buffers=32)
    drv.set_queue_vector(1, 2)
    tx = drv.queues[1]
    tx.set_avail_flags(1)                                     # ignored with EVENT_IDX
    tx.set_used_event(2)                                      # interrupt when used idx passes 2
    for i in range(5):
        drv.send(frame_to(fn, tag=i))
        assert tx.avail_event() == i + 1                      # the device asks to hear of the next one
    # the first flush always interrupts (nothing signalled yet), then only the crossing of 2 (idx 2 -> 3)
    assert efds[2].take() == 2
    tx.set_used_event(100)
    drv.send(frame_to(fn))
    assert efds[2].take() == 0


def test_event_idx_on_the_receive_queue_asks_for_buffers_when_dry():
    fn, vdev, _, drv = device()
    drv.bring_up(extra=[F_EVENT_IDX], rx_buffers=1)
    drv.send(frame_to(fn))
    drv.send(frame_to(fn))                                    # no buffer: the device enables notification
    assert drv.queues[0].avail_event() == 1 and fn.stats["rx_dropped_no_buffer"] == 1


# -- driver errors ----------------------------------------------------------------------------------------------
def corrupt(drv, q, head, addr=None, length=None, flags=None, nxt=None):
    table = drv.queues[q].desc + 16 * head
    old = struct.unpack("<QIHH", drv.mem.read(table, 16))
    new = [v if n is None else n for v, n in zip(old, (addr, length, flags, nxt))]
    drv.mem.write(table, struct.pack("<QIHH", *new))


@pytest.mark.parametrize("breakage, message", [
    (lambda drv, h: corrupt(drv, 1, h, flags=1, nxt=h), "loops"),
    (lambda drv, h: corrupt(drv, 1, h, flags=1, nxt=999), "beyond the 256 entries"),
    (lambda drv, h: corrupt(drv, 1, h, length=0), "zero-sized buffer"),
    (lambda drv, h: corrupt(drv, 1, h, length=0x20000), "more than the 65562 a buffer of this queue may hold"),
    (lambda drv, h: corrupt(drv, 1, h, length=5), "shorter than the 12-byte virtio-net header"),
    (lambda drv, h: corrupt(drv, 1, h, flags=4, length=24), "not a whole number"),
    (lambda drv, h: (corrupt(drv, 1, h + 1, addr=drv.queues[1].desc, length=16, flags=0, nxt=0),
                     corrupt(drv, 1, h, flags=2 | 1, nxt=h + 1)), "device-readable descriptor after"),
    (lambda drv, h: drv.mem.put_u16(drv.queues[1].avail + 4, 300), "made descriptor 300 available"),
    (lambda drv, h: drv.mem.put_u16(drv.queues[1].avail + 2, 400), "moved the available index"),
])
def test_broken_rings_make_the_device_need_a_reset(breakage, message, caplog):
    fn, vdev, space, drv = device()
    efds = enable_msix(vdev)
    drv.bring_up()
    drv.set_config_vector(0)
    head = drv.send(frame_to(fn), notify=False)
    if breakage is not None:
        breakage(drv, head)
    with caplog.at_level(logging.WARNING):
        drv.notify(1)
    assert message in caplog.text
    assert drv.status() & NEEDS_RESET and efds[0].take() == 1   # told by a config interrupt
    assert drv.queues[1].used_idx() == 0 and drv.received() == []
    drv.send(frame_to(fn))                                    # broken until reset: nothing moves
    assert drv.queues[1].used_idx() == 0
    drv.bring_up()
    drv.send(frame_to(fn, tag=3))
    assert [p[14] for _, p in drv.received()] == [3]


def test_nested_indirect_tables_are_refused(caplog):
    fn, vdev, _, drv = device()
    drv.bring_up(extra=[F_INDIRECT])
    head = drv.send(frame_to(fn), indirect=True, notify=False)
    table = struct.unpack("<Q", drv.mem.read(drv.queues[1].desc + 16 * head, 8))[0]
    drv.mem.write(table + 12, struct.pack("<H", 4 | 1))       # an indirect descriptor inside the table
    with caplog.at_level(logging.WARNING):
        drv.notify(1)
    assert "inside an indirect table" in caplog.text and drv.status() & NEEDS_RESET


def test_a_receive_chain_without_writable_buffers(caplog):
    fn, vdev, _, drv = device()
    drv.bring_up(rx_buffers=0)
    drv.queues[0].add(out=[b"not for writing"])
    drv.queues[0].publish()
    with caplog.at_level(logging.WARNING):
        drv.send(frame_to(fn))
    assert "no device-writable buffer" in caplog.text and drv.status() & NEEDS_RESET


def test_control_command_without_room_for_the_ack(caplog):
    fn, vdev, _, drv = device()
    drv.bring_up()
    ctrl = drv.queues[2]
    ctrl.add(out=[bytes([0, 0, 1])])
    ctrl.publish()
    with caplog.at_level(logging.WARNING):
        drv.notify(2)
    assert "control command" in caplog.text and drv.status() & NEEDS_RESET


# -- IOMMU faults ------------------------------------------------------------------------------------------------
def test_unmapped_descriptor_table_is_a_dma_error_on_the_modern_path(caplog):
    fn, vdev, space, drv = device()
    efds = enable_msix(vdev)
    drv.bring_up()
    drv.set_config_vector(0)
    fn.queues[1].desc = 0x7000_0000                           # nothing is mapped there
    drv.send(frame_to(fn), notify=False)
    before = bytes(space.windows[IOVA])
    with caplog.at_level(logging.WARNING):
        drv.notify(1)
    assert space.faults[-1] == {"iova": 0x7000_0000, "size": 16 * 256, "write": False, "reason": "unmapped"}
    assert fn.dma.faults[-1]["iova"] == 0x7000_0000
    assert drv.status() & NEEDS_RESET and efds[0].take() == 1
    after = bytes(space.windows[IOVA])
    assert before == after                                    # nothing moved: no used entry, no frame
    assert "DMA of queue 1" in caplog.text


def test_a_dma_fault_stops_the_queue_on_the_legacy_interface(caplog):
    fn, vdev, space, drv = device(legacy=True)
    drv.bring_up()
    fn.queues[0].used = 0x7000_0000                           # the receive ring's used area: unmapped
    with caplog.at_level(logging.WARNING):
        drv.send(frame_to(fn, tag=1))
    assert space.faults[-1]["write"] and 0x7000_0000 <= space.faults[-1]["iova"] < 0x7000_1000
    assert fn.queues[0].stopped and not fn.broken
    assert "the queue stops" in caplog.text and not drv.status() & NEEDS_RESET
    drv.send(frame_to(fn, tag=2))                             # transmit still works; receive is stopped
    assert len(drv.queues[1].take_used()) == 2 and fn.stats["rx_dropped_not_ready"] == 1


def test_bus_mastering_off_moves_nothing():
    fn, vdev, space, drv = device()
    drv.bring_up()
    head = drv.send(frame_to(fn), notify=False)
    fn.status |= DRIVER_OK                                    # a driver racing its own bus-master clear
    cmd = drv.regs.cfg_read(4, 2)
    fn.config.set(4, 2, cmd & ~0x4)
    drv.notify(1)
    assert fn.dma.faults[-1]["reason"] == "bus-master-disabled" and drv.queues[1].used_idx() == 0
    assert head == 0 and drv.status() & NEEDS_RESET


# -- control queue -------------------------------------------------------------------------------------------------
def test_rx_mode_and_mac_filtering():
    fn, vdev, _, drv = device()
    drv.bring_up(rx_buffers=32)
    other = bytes.fromhex("020000000099")
    multi = bytes.fromhex("01005e000001")
    drv.send(ether(other, PEER))
    assert len(drv.received()) == 1                           # promiscuous after reset, as QEMU
    assert drv.command(0, 0, b"\x00") == 0                    # PROMISC off
    for dst in (other, multi, BROADCAST, fn.mac):
        drv.send(ether(dst, PEER))
    assert [p[:6] for _, p in drv.received()] == [BROADCAST, fn.mac]
    assert drv.command(0, 1, b"\x01") == 0                    # ALLMULTI on
    drv.send(ether(multi, PEER))
    assert len(drv.received()) == 1
    assert drv.command(0, 1, b"\x00") == 0
    table = struct.pack("<I", 1) + other + struct.pack("<I", 1) + multi
    assert drv.command(1, 0, table) == 0                      # MAC_TABLE_SET: one unicast, one multicast
    for dst in (other, multi, bytes.fromhex("01005e000002")):
        drv.send(ether(dst, PEER))
    assert [p[:6] for _, p in drv.received()] == [other, multi]
    assert fn.stats["rx_filtered"] == 3


def test_mac_table_errors_and_overflow():
    fn, vdev, _, drv = device()
    drv.bring_up(rx_buffers=8)
    drv.command(0, 0, b"\x00")
    assert drv.command(1, 0, struct.pack("<I", 2) + b"\x02" * 6) == 1             # says 2, carries 1
    assert drv.command(1, 0, struct.pack("<I", 0)) == 1                            # no multicast count
    assert drv.command(1, 0, struct.pack("<II", 0, 1) + b"\x01" * 6 + b"x") == 1  # trailing bytes
    many = struct.pack("<I", 65) + b"".join(bytes([2, 0, 0, 0, 0, i]) for i in range(65)) + struct.pack("<I", 0)
    assert drv.command(1, 0, many) == 0 and fn.uni_overflow
    drv.send(ether(bytes.fromhex("0200000000ff"), PEER))      # overflow: every unicast accepted
    assert len(drv.received()) == 1


def test_mac_addr_set_changes_the_config_mac():
    fn, vdev, _, drv = device()
    drv.bring_up()
    new = bytes.fromhex("02aabbccddee")
    assert drv.command(1, 1, new) == 0
    assert drv.mac() == new
    assert drv.command(1, 1, new[:5]) == 1


def test_legacy_driver_without_ctrl_mac_addr_writes_the_mac():
    fn, vdev, _, drv = device(legacy=True)
    drv.negotiate(bits(5))
    for i, b in enumerate(bytes.fromhex("02aabbccddee")):
        drv.regs.bar_write(0, 20 + i, 1, b)
    assert drv.mac() == bytes.fromhex("02aabbccddee")
    drv.negotiate(bits(5, 17, 23))                            # with CTRL_MAC_ADDR the config is read-only
    drv.regs.bar_write(0, 20, 2, 0)
    assert drv.mac() == fn.perm_mac                           # (the reset gave the MAC back)


def test_vlan_filter():
    fn, vdev, _, drv = device()
    drv.bring_up(rx_buffers=8)
    drv.command(0, 0, b"\x00")

    def tagged(vid):
        return fn.mac + PEER + struct.pack(">HH", 0x8100, vid) + b"\x88\xb5" + b"v" * 46

    drv.send(tagged(5))
    assert drv.received() == []                               # CTRL_VLAN: no VLAN until added
    assert drv.command(2, 0, struct.pack("<H", 5)) == 0
    drv.send(tagged(5))
    drv.send(tagged(6))
    assert len(drv.received()) == 1
    assert drv.command(2, 1, struct.pack("<H", 5)) == 0
    drv.send(tagged(5))
    assert drv.received() == []
    assert drv.command(2, 0, struct.pack("<H", 4096)) == 1


def test_announce_and_ack():
    fn, vdev, _, drv = device()
    efds = enable_msix(vdev)
    drv.bring_up()
    drv.set_config_vector(0)
    assert drv.command(3, 0) == 1                             # nothing to acknowledge
    assert fn.announce()
    assert drv.config(6, 2) == 3 and efds[0].take() == 1      # LINK_UP | ANNOUNCE, config interrupt
    gen = drv.generation()
    assert drv.command(3, 0) == 0
    assert drv.config(6, 2) == 1 and drv.generation() != gen


@pytest.mark.parametrize("cls, cmd, data", [(9, 0, b""), (0, 2, b"\x01"), (4, 0, b"\x01\x00"), (0, 0, b"")])
def test_unknown_or_malformed_commands_get_err(cls, cmd, data, caplog):
    fn, vdev, _, drv = device()
    drv.bring_up()
    with caplog.at_level(logging.INFO):
        assert drv.command(cls, cmd, data) == 1
    assert "refused" in caplog.text and not drv.status() & NEEDS_RESET


def test_commands_need_their_features():
    fn, vdev, _, drv = device()
    drv.bring_up()
    fn.features &= ~bits(19)                                  # as if CTRL_VLAN were not negotiated
    assert drv.command(2, 0, struct.pack("<H", 1)) == 1


# -- link ---------------------------------------------------------------------------------------------------------------
def test_link_down_drops_both_ways():
    fn, vdev, _, drv = device(link="down")
    drv.bring_up()
    assert drv.config(6, 2) == 0
    drv.send(frame_to(fn))
    assert drv.received() == [] and fn.stats["tx_dropped_link_down"] == 1
    assert len(drv.queues[1].take_used()) == 1                # the driver still gets its buffer back
    fn.set_link(True)
    drv.send(frame_to(fn, tag=4))
    assert [p[14] for _, p in drv.received()] == [4]


# -- pcap -----------------------------------------------------------------------------------------------------------------
def read_pcap(path):
    data = open(path, "rb").read()
    magic, major, minor, _, _, snaplen, linktype = struct.unpack_from("<IHHiIII", data)
    assert (magic, major, minor, linktype) == (0xA1B2C3D4, 2, 4, 1)
    frames, pos = [], 24
    while pos < len(data):
        _, _, incl, orig = struct.unpack_from("<IIII", data, pos)
        frames.append(data[pos + 16:pos + 16 + incl])
        assert incl == orig
        pos += 16 + incl
    return frames


def test_pcap_records_what_is_transmitted_and_received(tmp_path):
    path = tmp_path / "net.pcap"
    fn, vdev, _, drv = device(pcap=str(path))
    drv.bring_up(rx_buffers=1)
    a, b = frame_to(fn, 70, 1), frame_to(fn, 80, 2)
    drv.send(a)
    drv.send(b)                                               # no buffer left: transmitted, never received
    assert read_pcap(path) == [a, a, b]                       # flushed: readable while the device runs
    fn.shutdown()


def test_options_are_checked():
    for options, text in (({"mac": "01:00:00:00:00:01"}, "multicast"), ({"mac": "zz"}, "not a MAC"),
                          ({"link": "sideways"}, "link"), ({"queue_size": 100}, "queue_size"),
                          ({"backend": "carrier-pigeon"}, "backend"), ({"backend": "tap"}, "needs tap"),
                          ({"pcap": "/nonexistent/dir/x.pcap"}, "cannot write the pcap file")):
        with pytest.raises(ValueError, match=text):
            device(**options)


def test_default_mac_comes_from_the_bdf():
    fn, vdev, _, drv = device()
    assert drv.mac() == bytes.fromhex("525400000300")
    assert enable_intx(vdev) is not None
