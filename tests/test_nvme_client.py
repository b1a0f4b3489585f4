"""The NVMe model through real syscalls: a C user-space driver against a running Server.

The client (tests/clients/nvme-client.c) does what libvfn or SPDK do through
VFIO: map DMA memory, enable MSI-X, bring the controller up, Identify, create
an I/O queue pair, write and read a block.  The device fd is a FUSE file, DMA
goes through type1 into the client's own memory, commands run on the
controller's I/O thread, and the interrupt arrives on the client's eventfd.
Needs root and /dev/fuse; the fixture takes every mount down.
"""

import os
import subprocess

import pytest

from cuse_vfio.machine import topology
from cuse_vfio.machine import Machine
from cuse_vfio.transport.server import Server
from serving_support import CLIENT_TIMEOUT, TRANSPORT, parse_values, serving

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"),
    pytest.mark.skipif(TRANSPORT == "cuse" and not os.path.exists("/dev/cuse"), reason="needs /dev/cuse"),
]

BDF = "0000:00:04.0"
SOURCE = os.path.join(os.path.dirname(__file__), "clients", "nvme-client.c")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    exe = tmp_path_factory.mktemp("nvme-client") / "nvme-client"
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-o", str(exe), SOURCE], check=True)
    return str(exe)


def test_a_user_space_driver_reads_and_writes_through_vfio(client, tmp_path):
    image = tmp_path / "disk.img"
    text = (f'[[device]]\nbdf = "{BDF}"\nmodel = "nvme"\ngroup = 4\nbacking = "{image}"\nsize = "1M"\n'
            'serial = "CLIENT01"\n')
    machine = Machine(topology.parse(text, "<test>"))
    dev_dir = "/dev/cuse-vfio-nvme-test" if TRANSPORT == "cuse" else str(tmp_path / "vfio")
    server = Server(machine.dispatcher, machine.topology.groups.values(), transport=TRANSPORT, dev_dir=dev_dir,
                    runtime_dir=str(tmp_path / "run"))
    try:
        with serving(server):
            proc = subprocess.run([client, server.dev_dir, "4", BDF], capture_output=True, text=True,
                                  env=server.client_env(os.environ), timeout=CLIENT_TIMEOUT)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        v = parse_values(proc.stdout)
        assert v["set_container"] == v["set_iommu"] == v["device"] == v["map_dma"] == v["msix"] == 0, v
        assert v["vendor_device"] == 0x00101B36 and v["class_rev"] == 0x01080202
        assert v["vs"] == 0x00010400 and v["cap_mqes"] == 0x7FF and v["ready"] == 1
        assert v["identify"] == 0 and v["sn_ok"] == 1 and v["vid"] == 0x1B36
        assert v["msix_signalled"] == 1
        assert v["create_cq"] == v["create_sq"] == 0
        assert v["write"] == v["read"] == 0 and v["read_back"] == 1
        assert v["unmapped_read"] == 0x04                                  # Data Transfer Error
        assert v["flush"] == 0 and v["csts"] == 1
        assert "pread_failed" not in v and "pwrite_failed" not in v and "wrong_cid" not in v
        with open(image, "rb") as f:
            f.seek(8 * 512)
            assert f.read(4096) == bytes((i * 13 + 1) & 0xFF for i in range(4096))
        faults = machine.fault_log.faults()
        assert len(faults) == 1 and faults[0].iova == 0x10000000 + 16 * 4096 + 0x200 and faults[0].device == BDF
    finally:
        machine.close()
