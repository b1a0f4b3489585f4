"""The NVMe model under Linux's stock nvme driver: QEMU passes it through
(scripts/guest) and the guest runs tests/guest/nvme_io.sh once.

What must hold: the driver binds and the namespace has the topology's size;
8 MiB written with O_DIRECT from both vCPUs at once (two dd pinned with
taskset, so two I/O queues, each with its own interrupt vector) read back the
same in the guest and are in the backing file at their offsets once the guest
is gone; a media error injected on an LBA range fails a read there with EIO
and the kernel logs the NVMe status (Unrecovered Read Error: SCT 2, SC 0x81);
a controller reset from the guest comes back live, with I/O working after it.
"""

import hashlib
import os

import pytest

from guest_support import explain, run_guest, values

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="needs root and /dev/fuse (cuse-vfio run serves QEMU over FUSE)"),
]

MIB = 1 << 20
SIZE = 64 * MIB
LBA = 512
A, B, C, LENGTH = 4, 20, 40, 8          # MiB offsets of the three regions, MiB written to A and B
BAD = 60 * MIB // LBA                   # first LBA of the injected media error
BAD_COUNT = 8

TOPOLOGY = """\
[[device]]
bdf = "0000:00:04.0"
model = "nvme"
group = 4
backing = "{backing}"
size = "64M"

[[device.inject]]
kind = "media-error"
opcodes = ["read"]
lba = [{first}, {last}]
"""


def sha256_at(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(length)).hexdigest()


def vectors(text):
    """'nvme0q0:12 nvme0q1:3 ' -> {'nvme0q0': 12, 'nvme0q1': 3}"""
    return {k: int(n) for k, _, n in (w.partition(":") for w in text.split())}


@pytest.fixture(scope="module")
def nvme_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("guest-nvme")
    backing = d / "nvme.img"
    topology = d / "nvme.toml"
    topology.write_text(TOPOLOGY.format(backing=backing, first=BAD, last=BAD + BAD_COUNT - 1))
    proc = run_guest("--topology", str(topology), "--smp", "2", "--modules", "nvme", "--",
                     "sh", "tests/guest/nvme_io.sh", str(A), str(B), str(LENGTH), str(BAD), str(C))
    return proc, values(proc.stdout), backing


def test_the_stock_driver_binds_with_the_configured_size(nvme_run):
    proc, v, _ = nvme_run
    assert proc.returncode == 0, explain(proc)
    assert v["block_device"] == "yes" and v["driver"] == "nvme" and v["state"] == "live", explain(proc)
    assert int(v["sectors"]) * 512 == SIZE     # /sys/block/*/size counts 512-byte sectors
    assert v["lba_size"] == str(LBA)
    assert v["cpus"] == "2" and v["hw_queues"] == "2", explain(proc)


def test_two_queues_write_and_read_back_at_once(nvme_run):
    proc, v, backing = nvme_run
    for name in ("write_a_rc", "write_b_rc", "read_a_rc", "read_b_rc"):
        assert v[name] == "0", explain(proc)
    assert v["readback_a"] == "same" and v["readback_b"] == "same", explain(proc)
    before, writes = vectors(v["irqs_before"]), vectors(v["irqs_after_writes"])
    for q in ("nvme0q1", "nvme0q2"):            # each I/O queue completed some of it
        assert writes[q] > before[q], explain(proc)
    assert sha256_at(backing, A * MIB, LENGTH * MIB) == v["sha_a"]
    assert sha256_at(backing, B * MIB, LENGTH * MIB) == v["sha_b"]


def test_an_injected_media_error_is_eio_in_the_guest(nvme_run):
    proc, v, _ = nvme_run
    # blk_status_to_errno(BLK_STS_MEDIUM) is ENODATA; the page cache makes it EIO
    assert v["bad_direct_rc"] != "0" and v["bad_direct_error"] == "No data available", explain(proc)
    assert v["bad_buffered_rc"] != "0" and v["bad_buffered_error"] == "Input/output error", explain(proc)
    assert v["before_bad_rc"] == "0", explain(proc)
    assert "(sct 0x2 / sc 0x81)" in v["dmesg_nvme_error"], explain(proc)
    assert v["dmesg_medium_error"].startswith("critical medium error, dev nvme0n1, sector %d" % BAD)


def test_a_controller_reset_recovers(nvme_run):
    proc, v, backing = nvme_run
    assert v["reset_write_rc"] == "0" and v["state_after_reset"] == "live", explain(proc)
    assert v["queue_setups"] == "2", explain(proc)    # the driver set its queues up again
    assert v["reread_a_rc"] == "0" and v["reread_a"] == "same", explain(proc)
    assert v["write_c_rc"] == "0" and v["read_c_rc"] == "0" and v["readback_c"] == "same", explain(proc)
    assert sha256_at(backing, C * MIB, MIB) == v["sha_c"]
    assert v["timeouts"] == "0", explain(proc)
