"""scripts/guest: an unmodified QEMU passes cuse-vfio's edu device through to a
Linux guest, and the guest's stock drivers and user space reach it.

The guest binds edu to uio_pci_generic (loaded at boot with --modules) and
runs tests/guest/edu_uio.py: BAR0 registers through sysfs resource0 (QEMU
traps each access into a pread/pwrite on cuse-vfio's device file), the
factorial's INTx through /dev/uio0, and a DMA each way between edu's buffer
and guest RAM (through the mapping QEMU made with VFIO_IOMMU_MAP_DMA).
Also: the command's exit status and streams come back apart, a timeout
is 124, a topology that does not load is 2 before anything boots.
"""

import os

import pytest

from guest_support import explain, run_guest, values

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="needs root and /dev/fuse (cuse-vfio run serves QEMU over FUSE)")
guest = pytest.mark.guest

EDU = "0000:00:02.0"


@guest
def test_edu_through_uio_pci_generic():
    proc = run_guest("--modules", "uio_pci_generic", "--", "sh", "-c",
                     "echo '1234 11e8' > /sys/bus/pci/drivers/uio_pci_generic/new_id"
                     " && cat /sys/bus/pci/devices/%s/vendor /sys/bus/pci/devices/%s/device"
                     " && python3 tests/guest/edu_uio.py %s; rc=$?; echo to-stderr >&2; exit $((rc + 7))"
                     % (EDU, EDU, EDU))
    assert proc.returncode == 7, explain(proc)
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["0x1234", "0x11e8"], explain(proc)
    v = values(proc.stdout)
    assert v["id"] == "0x010000ed"
    assert v["liveness"] == "0xedcba987"           # ~0x12345678
    assert v["factorial"] == str(3628800)          # 10!
    assert int(v["fact_irqs"]) >= 1
    assert v["fact_irq_status"] == "0x1"
    assert v["dma_in_irq_status"] == "0x100"
    assert v["dma_out_irq_status"] == "0x100"
    assert v["dma_roundtrip"] == "same"
    assert int(v["irqs"]) >= 3                     # factorial + both DMAs
    assert "to-stderr" in proc.stderr and "to-stderr" not in proc.stdout
    assert "guest: guest booted in" in proc.stderr


@guest
def test_timeout_kills_the_guest():
    proc = run_guest("--", "sleep", "1000", timeout=20)
    assert proc.returncode == 124, explain(proc)
    assert "did not finish within 20 s" in proc.stderr


def test_bad_topology_fails_before_booting(tmp_path):
    topo = tmp_path / "bad.toml"
    topo.write_text('[[device]]\nbdf = "0000:00:02.0"\nmodel = "edu"\n')
    proc = run_guest("--topology", str(topo), "--", "true", timeout=60)
    assert proc.returncode == 2, explain(proc)
    assert "guest: %s, line 1: device #1 has no 'group'" % topo in proc.stderr
    assert "booting" not in proc.stderr
