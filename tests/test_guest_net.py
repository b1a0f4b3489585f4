"""The virtio-net model under Linux's stock virtio_pci and virtio_net drivers, on a TAP.

The test makes a network namespace with a TAP interface (10.0.3.1/24) and
runs scripts/guest inside it, so cuse-vfio's server attaches the device's tap
backend to that TAP; QEMU passes the function through and the guest runs
tests/guest/virtio_net.sh: the interface comes up at 10.0.3.2 and pings
10.0.3.1.  Every echo request must be answered, and the counters of both
ends must move together: what the guest sent arrived on the TAP, what the
guest received the TAP had sent.

The device offers its device config page for mmap (``mmap_windows = true``, a
sparse mmap area of BAR4): QEMU's trace shows it mapped that page, and not
one of the driver's reads of MAC and status there was a pread on the device
fd (QEMU traces every trapped access, vfio_region_read).
"""

import re

import os
import subprocess

import pytest

from guest_support import explain, run_guest, values

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="needs root and /dev/fuse (cuse-vfio run serves QEMU over FUSE)"),
]

NIC = "0000:00:03.0"
TAP = "cvnet0"
HOST, GUEST = "10.0.3.1", "10.0.3.2"
PINGS = 5
TOPOLOGY = f"""\
[[device]]
bdf = "{NIC}"
model = "virtio-net"
group = 3
backend = "tap"
tap = "{TAP}"
mmap_windows = true
"""


def in_netns(ns, *cmd):
    done = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}: {done.stderr}"
    return done.stdout


def tap_counters(ns):
    return {name: int(in_netns(ns, "cat", f"/sys/class/net/{TAP}/statistics/{name}"))
            for name in ("rx_packets", "tx_packets", "rx_errors", "tx_errors", "rx_dropped", "tx_dropped")}


@pytest.fixture
def netns():
    """A network namespace holding TAP, up, at HOST/24; gone (with TAP) afterwards."""
    if not os.path.exists("/dev/net/tun"):
        pytest.fail("/dev/net/tun is missing: load the tun module (modprobe tun) for the tap backend")
    ns = f"cvfio-guest-net-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True)
    assert made.returncode == 0, f"cannot make a network namespace: {made.stderr}"
    try:
        in_netns(ns, "ip", "tuntap", "add", "dev", TAP, "mode", "tap")
        in_netns(ns, "ip", "link", "set", TAP, "up")
        in_netns(ns, "ip", "addr", "add", f"{HOST}/24", "dev", TAP)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_the_guest_pings_the_host_through_the_emulated_nic(netns, tmp_path):
    topology = tmp_path / "virtio-net-tap.toml"
    topology.write_text(TOPOLOGY)
    before = tap_counters(netns)
    trace = tmp_path / "qemu-trace.log"
    proc = run_guest("--topology", str(topology), "--modules", "virtio_net",
                     "--qemu-arg=-trace", "--qemu-arg=vfio_region_mmap", "--qemu-arg=-trace",
                     "--qemu-arg=vfio_region_read", "--qemu-arg=-D", f"--qemu-arg={trace}", "--", "sh",
                     "tests/guest/virtio_net.sh", NIC, GUEST, HOST, str(PINGS), netns=netns)
    after = tap_counters(netns)
    assert proc.returncode == 0, explain(proc)
    v = values(proc.stdout)
    print(f"guest: {v}; host TAP before {before}, after {after}")
    # The stock drivers took the function: virtio_pci, then virtio_net on its virtio device.
    assert (v["pci_driver"], v["virtio_driver"]) == ("virtio-pci", "virtio_net"), explain(proc)
    assert v["mac"] == "52:54:00:00:03:00"          # the model's default: QEMU's prefix and the BDF
    # QEMU mapped the device config page, and the driver read MAC and status there without a trap.
    log = trace.read_text()
    assert f"Region {NIC} BAR 4 mmaps[0] [0x2000 - 0x2fff]" in log, log[-2000:]
    reads = re.findall(r"vfio_region_read\s+\(" + re.escape(NIC) + r":region4\+0x([0-9a-f]+), \d\)", log)
    assert reads, "no trapped read of BAR4 at all: the trace is not what this test expects"
    assert not [off for off in reads if 0x2000 <= int(off, 16) < 0x3000], "device config reads trapped"
    assert v["features"][32] == "1", v["features"]  # VIRTIO_F_VERSION_1: the modern interface
    assert v["operstate"] == "up" and v["down_operstate"] == "down"
    # Every echo request was answered.
    assert (v["ping_rc"], v["ping_sent"], v["ping_received"]) == ("0", str(PINGS), str(PINGS)), explain(proc)
    sent = int(v["tx_packets"]) - int(v["tx_packets_before"])
    received = int(v["rx_packets"]) - int(v["rx_packets_before"])
    assert sent >= PINGS and received >= PINGS, v
    assert v["rx_errors"] == v["tx_errors"] == v["rx_dropped"] == "0", v
    # Both ends agree: the TAP got every frame the guest sent, and sent every frame the guest got.
    tap_in, tap_out = after["rx_packets"] - before["rx_packets"], after["tx_packets"] - before["tx_packets"]
    assert tap_in >= sent and tap_out >= received, (v, before, after)
    assert after["rx_errors"] == before["rx_errors"] and after["tx_errors"] == before["tx_errors"], after
