"""virtio-net's tap backend against a real TAP interface, in a network namespace the test makes."""

import ctypes
import os
import socket
import subprocess
import threading
import time

import pytest

from cuse_vfio.devices import VfioPciDevice, create_model
from cuse_vfio.devices.virtio.backends import BackendError, TapBackend
from devices_fakes import FakeDmaSpace, enable_master
from virtio_driver import Memory, Regs, VirtioNetDriver, ether

TAP = "cvtap0"
IOVA = 0x10000000
CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
PEER = bytes.fromhex("020000000042")


def ip(*args, netns=None):
    cmd = ["ip", "netns", "exec", netns, "ip", *args] if netns else ["ip", *args]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture
def netns():
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("SKIPPED LOUDLY: /dev/net/tun is missing, so the tap backend cannot be tested "
                    "(load the tun module: modprobe tun)")
    name = f"cvfio-test-{os.getpid()}"
    made = ip("netns", "add", name)
    if made.returncode:
        pytest.skip(f"SKIPPED LOUDLY: cannot make a network namespace for the tap test "
                    f"({made.stderr.strip()}): it needs root and iproute2")
    try:
        for args in (("tuntap", "add", "dev", TAP, "mode", "tap"), ("link", "set", TAP, "up")):
            r = ip(*args, netns=name)
            assert r.returncode == 0, r.stderr
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", f"net.ipv6.conf.{TAP}.disable_ipv6=1"],
                       capture_output=True)
        yield name
    finally:
        ip("netns", "del", name)


def in_netns(name, fn):
    """Run ``fn`` in a thread that joined network namespace ``name`` (where TUNSETIFF and sockets look)."""
    result = {}

    def run():
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(fd, CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), "setns into the test's network namespace failed")
            result["value"] = fn()
        except BaseException as e:  # handed to the test's thread
            result["error"] = e
        finally:
            os.close(fd)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def wait_for(condition, what):
    for _ in range(1000):  # a bound on the wait, not a measurement
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def tap_device(netns):
    def make():
        fn = create_model("virtio-net", name="0000:00:03.0", manual_time=True, backend="tap", tap=TAP)
        peer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        peer.bind((TAP, 0))
        return fn, peer

    fn, peer = in_netns(netns, make)
    space = FakeDmaSpace()
    window = space.map(IOVA, 4 << 20)
    vdev = VfioPciDevice(fn, dma_space=space)
    vdev.open()
    enable_master(vdev)
    drv = VirtioNetDriver(Regs.of(vdev), Memory.over(window, IOVA), legacy=True)
    try:
        yield fn, drv, peer, netns
    finally:
        peer.close()
        fn.shutdown()


def received_from_peer(peer, payload):
    peer.settimeout(10)
    while True:
        data, addr = peer.recvfrom(65536)
        if addr[2] != PACKET_OUTGOING and payload in data:
            return data


def test_frames_cross_a_real_tap_both_ways(tap_device):
    fn, drv, peer, _ = tap_device
    drv.bring_up(rx_buffers=16)
    to_device = ether(fn.mac, PEER, b"from the peer" + bytes(40))
    peer.send(to_device)
    got = []
    wait_for(lambda: got.extend(p for _, p in drv.received()) or to_device in got, "the frame from the TAP")
    from_device = ether(PEER, fn.mac, b"from the driver" + bytes(40))
    drv.send(from_device)
    assert received_from_peer(peer, b"from the driver") == from_device
    assert fn.stats["tx_packets"] == 1 and fn.stats["rx_packets"] >= 1


def test_a_frame_waits_for_receive_buffers(tap_device):
    fn, drv, peer, _ = tap_device
    drv.bring_up(rx_buffers=0)
    frame = ether(fn.mac, PEER, b"held until buffers come" + bytes(30))
    peer.send(frame)
    wait_for(lambda: fn.backend._waiting, "the tap thread to hold the frame")
    assert drv.queues[0].used_idx() == 0 and fn.stats["rx_dropped_no_buffer"] == 0
    drv.post_rx(4, 1526, notify=True)                         # the notify wakes the tap thread
    got = []
    wait_for(lambda: got.extend(p for _, p in drv.received()) or frame in got, "the held frame")


def test_tap_errors_are_sentences(tap_device):
    fn, drv, peer, netns = tap_device
    with pytest.raises(BackendError, match="busy"):
        in_netns(netns, lambda: TapBackend(TAP))
    with pytest.raises(BackendError, match="does not exist: create it first"):
        in_netns(netns, lambda: TapBackend("cvtap-none"))
    with pytest.raises(BackendError, match="not a single-queue TAP"):
        in_netns(netns, lambda: TapBackend("lo"))
