"""DPDK's testpmd, unmodified, on the emulated virtio-net NIC (the DPDK stage of scripts/test).

``cuse-vfio run`` serves a virtio-net function (loopback backend: every frame
the driver sends comes back on its receive queue) and runs
tests/testpmd_driver.py in the client's namespace, which starts
``dpdk-testpmd -a BDF --in-memory -- -i --forward-mode=io`` and types
``start tx_first``: DPDK's EAL finds VFIO and the device in the sysfs view,
its virtio PMD probes the function through vfio-pci, the port comes up, one
burst goes out and io forwarding sends every frame that comes back out
again.  Once enough frames came back the driver stops, reads the counters
and quits; then it does it all again with a fresh testpmd, which only works
if the first one gave the group, the container and the device back.

The stage reserves the 2 MiB hugepages testpmd needs (``--in-memory``: no
hugetlbfs mount, no files left behind) and sets nr_hugepages back after.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.dpdk,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "testpmd_driver.py")
NIC = "0000:00:03.0"
TOPOLOGY = f"""
[[device]]
bdf = "{NIC}"
model = "virtio-net"
group = 3
backend = "loopback"
"""
#: testpmd's first burst (its default burst size): the frames that then go round and round
BURST = 32
#: frames that must have come back before the driver stops (eight times round, at least)
MIN_RX = 8 * BURST
#: 2 MiB pages testpmd takes with --total-num-mbufs=2048 on one port, with room to spare
HUGEPAGES = 64
HUGEPAGE_DIR = "/sys/kernel/mm/hugepages/hugepages-2048kB"
TIMEOUT = 600  # a bound for a hung run, never a measurement


def _read_int(path):
    with open(path) as f:
        return int(f.read())


def _write(path, value):
    with open(path, "w") as f:
        f.write(f"{value}\n")


@pytest.fixture(scope="module")
def hugepages():
    """Enough free 2 MiB pages for testpmd; nr_hugepages as it was afterwards."""
    if shutil.which("dpdk-testpmd") is None:
        pytest.fail("dpdk-testpmd is missing: scripts/bootstrap installs Debian's dpdk and dpdk-dev")
    nr, free = f"{HUGEPAGE_DIR}/nr_hugepages", f"{HUGEPAGE_DIR}/free_hugepages"
    before = _read_int(nr)
    short = HUGEPAGES - _read_int(free)
    if short > 0:
        print(f"reserving {short} more 2 MiB hugepages (nr_hugepages {before} -> {before + short})")
        _write(nr, before + short)
    try:
        if _read_int(free) < HUGEPAGES:
            pytest.fail(f"the kernel gave only {_read_int(free)} free 2 MiB hugepages of the {HUGEPAGES} "
                        "testpmd needs (memory too fragmented?)")
        yield
    finally:
        if _read_int(nr) != before:
            print(f"giving the hugepages back (nr_hugepages -> {before})")
            _write(nr, before)


def run_driver_under_cuse_vfio(tmp_path, job_args, eal_args):
    topology = tmp_path / "virtio-net.toml"
    topology.write_text(TOPOLOGY)
    cmd = [sys.executable, "-m", "cuse_vfio", "run", "--transport", "fuse", "--topology", str(topology),
           "--runtime-dir", str(tmp_path / "rt"), "--fault-log", str(tmp_path / "faults"), "--",
           sys.executable, DRIVER, *job_args, "--", *eal_args]
    print("running:", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT)
    try:
        report = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise AssertionError(f"no report from the driver (status {done.returncode}):\n"
                             f"{done.stdout}\n{done.stderr}") from None
    return done, report


def test_testpmd_forwards_frames_through_the_emulated_nic_twice(hugepages, tmp_path):
    eal = ["-l", "0,1", "-a", NIC, "--in-memory", "--log-level=pmd.net.virtio.init:info"]
    done, report = run_driver_under_cuse_vfio(tmp_path, ["flow", "--runs", "2", "--min-rx", str(MIN_RX)], eal)
    runs = report.get("runs", [])
    for n, run in enumerate(runs, 1):
        log = run.pop("log", "")
        print(f"testpmd run {n}: {json.dumps(run)}")
        if "error" in run:
            raise AssertionError(f"testpmd run {n}: {run['error']}")
        assert "VFIO support initialized" in log, log
        assert f"Probe PCI driver: net_virtio (1af4:1000) device: {NIC}" in log, log
        print(f"testpmd run {n}: the virtio PMD took the "
              f"{'legacy' if 'trying with legacy virtio pci' in log else 'modern'} interface")
        assert run["link"]["status"] == "up", run["link"]
        fwd, port = run["forward"], run["port"]
        # Frames went out and came back: at least MIN_RX of them round trips ...
        assert fwd["rx"] >= MIN_RX
        # ... and only the first burst's frames can be on their way when forwarding stops.
        assert 0 <= fwd["tx"] - fwd["rx"] <= BURST, fwd
        assert fwd["rx_dropped"] == fwd["tx_dropped"] == 0, fwd
        # The PMD's counters agree with testpmd's own, and nothing was lost or refused.
        assert (port["rx"], port["tx"]) == (fwd["rx"], fwd["tx"]), (port, fwd)
        assert port["rx_missed"] == port["rx_errors"] == port["rx_nombuf"] == port["tx_errors"] == 0, port
        assert run["status"] == 0 and "Bye..." in log, log[-2000:]
    assert len(runs) == 2, report
    assert done.returncode == 0, done.stderr
    assert "IOMMU fault" not in done.stderr, done.stderr
    assert not os.path.exists(tmp_path / "faults") or os.path.getsize(tmp_path / "faults") == 0
    assert not (tmp_path / "rt").exists()
