"""A real client whose DMA memory is a sealed memfd, as QEMU's memory-backend-memfd guest RAM is.

The client maps the memfd for DMA and has edu copy bytes from it and back
through the served nodes; the server maps the memfd itself at MAP_DMA, so
edu's DMA never goes through the copier (which this test forbids), and once
the client exits (its container is released) the server's mapping is gone.
"""

import os
import subprocess
import time

import pytest
from serving_support import CLIENT_TIMEOUT, TRANSPORT, serving
from test_transport_stall import build, read_until

from cuse_vfio.machine import Machine
from cuse_vfio.machine.topology import parse
from cuse_vfio.memory import ProcessImage, shared
from cuse_vfio.transport.server import Server

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"),
    pytest.mark.skipif(TRANSPORT == "cuse" and not os.path.exists("/dev/cuse"), reason="needs /dev/cuse"),
]

TOPOLOGY = """
[[device]]
bdf = "0000:00:02.0"
model = "edu"
group = 2
dma_delay = 0.001
"""

MEMFD_CLIENT_C = r"""
/* edu's DMA from a sealed memfd mapped for DMA, and back into it; then it waits for stdin and exits
 * without unmapping anything (the container's release must). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/vfio.h>

#define CFG(off) (((off_t)VFIO_PCI_CONFIG_REGION_INDEX << 40) + (off))
#define BAR0(off) (((off_t)VFIO_PCI_BAR0_REGION_INDEX << 40) + (off))
#define SIZE (1 << 20)
#define IOVA 0x100000

static void say(const char *name, long v) { printf("%s=%ld\n", name, v); fflush(stdout); }
static long rc(long r) { return r < 0 ? -errno : r; }
static void wr64(int d, off_t off, uint64_t v) { if (pwrite(d, &v, 8, off) != 8) say("pwrite", -errno); }

static int edu_dma(int d, uint64_t src, uint64_t dst, uint64_t cmd)
{
	uint64_t status = 1;

	wr64(d, BAR0(0x80), src);
	wr64(d, BAR0(0x88), dst);
	wr64(d, BAR0(0x90), 14);
	wr64(d, BAR0(0x98), cmd);
	for (int i = 0; i < 10000 && (status & 1); i++) {
		if (pread(d, &status, 8, BAR0(0x98)) != 8)
			return -errno;
		usleep(1000);
	}
	return !(status & 1);
}

int main(int argc, char **argv)
{
	char path[4096], c;
	int container, group, device, fd;

	snprintf(path, sizeof path, "%s/vfio", argv[1]);
	container = open(path, O_RDWR);
	snprintf(path, sizeof path, "%s/2", argv[1]);
	group = open(path, O_RDWR);
	if (container < 0 || group < 0 || ioctl(group, VFIO_GROUP_SET_CONTAINER, &container) ||
		ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)) {
		say("setup", -errno);
		return 1;
	}
	/* As QEMU's memory-backend-memfd: sealed against shrinking and growing. */
	fd = memfd_create("e2e-ram", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0 || ftruncate(fd, SIZE) || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)) {
		say("memfd", -errno);
		return 1;
	}
	char *ram = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (ram == MAP_FAILED) {
		say("mmap", -errno);
		return 1;
	}
	memcpy(ram, "zero-copy DMA!", 14);
	struct vfio_iommu_type1_dma_map map = { .argsz = sizeof map,
		.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
		.vaddr = (uintptr_t)ram, .iova = IOVA, .size = SIZE };
	say("map_dma", rc(ioctl(container, VFIO_IOMMU_MAP_DMA, &map)));
	device = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, "0000:00:02.0");
	say("device", rc(device));
	if (device < 0)
		return 1;
	uint16_t cmd = 0x6;  /* memory + bus master */
	if (pwrite(device, &cmd, 2, CFG(4)) != 2)
		say("command", -errno);
	say("to_device", edu_dma(device, IOVA, 0x40000, 1));            /* RAM -> edu's buffer */
	say("to_ram", edu_dma(device, 0x40000, IOVA + 0x1000, 1 | 2));  /* and back, 4 KiB on */
	say("roundtrip", !memcmp(ram + 0x1000, "zero-copy DMA!", 14));
	say("ready", 1);
	while (read(0, &c, 1) > 0)
		;
	return 0;
}
"""


def server_maps(name):
    with open("/proc/self/maps") as maps:
        return [line for line in maps if name in line]


def test_a_clients_memfd_is_reached_without_the_copier_and_let_go_when_it_exits(tmp_path, monkeypatch):
    def no_copier(*args, **kwargs):
        raise AssertionError("a DMA went through the copier")
    monkeypatch.setattr(ProcessImage, "_copy", no_copier)
    machine = Machine(parse(TOPOLOGY, "<memfd test topology>"))
    dev_dir = "/dev/cuse-vfio-test" if TRANSPORT == "cuse" else str(tmp_path / "vfio")
    server = Server(machine.dispatcher, machine.topology.groups.values(), transport=TRANSPORT,
                    dev_dir=dev_dir, runtime_dir=str(tmp_path / "run"))
    client = build(tmp_path, "memfd-client", MEMFD_CLIENT_C)
    proc = None
    try:
        with serving(server):
            print("the client's memfd, mapped for DMA: edu copies from it and back into it")
            proc = subprocess.Popen([client, server.dev_dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True, env=server.client_env(os.environ))
            v = read_until(proc, "ready", {})
            assert v["map_dma"] == 0 and v["device"] >= 0, v
            assert v["to_device"] == 1 and v["to_ram"] == 1 and v["roundtrip"] == 1, v
            assert machine.fault_log.faults() == []
            assert len(server_maps("/memfd:e2e-ram")) == 1  # the server's own mapping of it

            print("the client exits without unmapping: its container goes, and the server's mapping with it")
            proc.stdin.close()
            assert proc.wait(timeout=CLIENT_TIMEOUT) == 0
            deadline = time.monotonic() + CLIENT_TIMEOUT
            while server_maps("/memfd:e2e-ram") or shared.windows_vmas():
                assert time.monotonic() < deadline, "the server still maps the exited client's memfd"
                time.sleep(0.01)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        machine.close()
