"""A client whose memory stalls costs only itself: the server goes on serving everyone else.

A page of a client can be a file on a FUSE mount whose daemon never answers;
the server must neither read an ioctl argument there nor let a device's DMA
there hold it.  The stalling client below passes such a page as an ioctl
argument and as a MAP_DMA vaddr a device then DMAs from, while its daemon
(a small mfusepy file system in this test) holds every read; its ioctl fails
with EFAULT and its DMA is a fault in the log, while another client's whole
edu flow runs, all before the daemon answers anything.
"""

import contextlib
import errno
import os
import subprocess
import sys
import time

import pytest
from serving_support import CLIENT_TIMEOUT, TRANSPORT, parse_values, serving, unmount
from test_transport_clients import CLIENT_C

from cuse_vfio.machine import Machine
from cuse_vfio.machine.topology import parse
from cuse_vfio.transport.server import Server
from cuse_vfio.transport.shim import TransportError

pytest.importorskip("mfusepy")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"),
    pytest.mark.skipif(TRANSPORT == "cuse" and not os.path.exists("/dev/cuse"), reason="needs /dev/cuse"),
]

#: edu 00:02.0 in group 2 for the client that behaves, 00:03.0 in group 3 for the stalling one
TOPOLOGY = """
[[device]]
bdf = "0000:00:02.0"
model = "edu"
group = 2

[[device]]
bdf = "0000:00:03.0"
model = "edu"
group = 3
"""

STALLING_FS = r"""
import errno, os, stat, sys, time
from mfusepy import FUSE, FuseOSError, Operations

armed = sys.argv[2]
class Stalling(Operations):
    # One page-sized file whose every read waits while `armed` exists.
    use_ns = True

    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path != "/f":
            raise FuseOSError(errno.ENOENT)
        return {"st_mode": stat.S_IFREG | 0o666, "st_nlink": 1, "st_size": 4096}
    def readdir(self, path, fh):
        return [".", "..", "f"]
    def open(self, path, flags):
        return 0
    def read(self, path, size, offset, fh):
        while os.path.exists(armed):
            time.sleep(0.01)
        return bytes(size)
FUSE(Stalling(), sys.argv[1], foreground=True, attr_timeout=0.0, entry_timeout=0.0)
"""

STALLING_CLIENT_C = r"""
/* Group 3's owner with a page of a stalling FUSE file: as an ioctl argument, as DMA memory. */
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

static void say(const char *name, long v) { printf("%s=%ld\n", name, v); fflush(stdout); }
static long rc(long r) { return r < 0 ? -errno : r; }
static void wr64(int d, off_t off, uint64_t v) { pwrite(d, &v, 8, off); }

int main(int argc, char **argv)
{
	char path[4096], buf[64];
	int c, g, d, f;

	snprintf(path, sizeof path, "%s/vfio", argv[1]);
	c = open(path, O_RDWR);
	snprintf(path, sizeof path, "%s/3", argv[1]);
	g = open(path, O_RDWR);
	if (c < 0 || g < 0 || ioctl(g, VFIO_GROUP_SET_CONTAINER, &c) || ioctl(c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)) {
		say("setup", -errno);
		return 1;
	}
	f = open(argv[2], O_RDWR);
	char *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, f, 0);
	if (f < 0 || page == MAP_FAILED) {
		say("mmap", -errno);
		return 1;
	}
	say("status", rc(ioctl(g, VFIO_GROUP_GET_STATUS, page)));
	struct vfio_iommu_type1_dma_map map = { .argsz = sizeof map, .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
						.vaddr = (uintptr_t)page, .iova = 0x100000, .size = 4096 };
	say("map_dma", rc(ioctl(c, VFIO_IOMMU_MAP_DMA, &map)));
	d = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, "0000:00:03.0");
	say("device", rc(d));
	if (d < 0)
		return 1;
	uint16_t cmd = 0x6;              /* memory + bus master */
	pwrite(d, &cmd, 2, CFG(4));
	wr64(d, BAR0(0x80), 0x100000);   /* src: the stalling page */
	wr64(d, BAR0(0x88), 0x40000);    /* dst: the device buffer */
	wr64(d, BAR0(0x90), 32);
	wr64(d, BAR0(0x98), 1);          /* RUN, RAM -> device */
	uint64_t status = 1;
	for (int i = 0; i < 100000 && (status & 1); i++) {
		pread(d, &status, 8, BAR0(0x98));
		usleep(1000);
	}
	say("dma_done", !(status & 1));
	say("ready", 1);
	while (read(0, buf, sizeof buf) > 0)
		;
	return 0;
}
"""


def build(tmp_path, name, source):
    src = tmp_path / f"{name}.c"
    src.write_text(source)
    exe = tmp_path / name
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-o", str(exe), str(src)], check=True)
    return str(exe)


def read_until(proc, key, values):
    for line in proc.stdout:
        name, _, value = line.strip().partition("=")
        values[name] = int(value)
        if name == key:
            return values
    raise AssertionError(f"the stalling client ended before {key}: {values}")


@contextlib.contextmanager
def stalling_file_system(tmp_path):
    """STALLING_FS mounted: (its file, the path whose existence holds every read); unmounted after."""
    mnt, armed = tmp_path / "stall", tmp_path / "armed"
    mnt.mkdir()
    armed.touch()
    fs = subprocess.Popen([sys.executable, "-c", STALLING_FS, str(mnt), str(armed)])
    try:
        deadline = time.monotonic() + CLIENT_TIMEOUT
        while not os.path.ismount(mnt):
            assert time.monotonic() < deadline and fs.poll() is None, "the stalling file system did not mount"
            time.sleep(0.01)
        yield mnt / "f", armed
    finally:
        if armed.exists():
            armed.unlink()
        unmount(str(mnt))
        fs.wait(timeout=CLIENT_TIMEOUT)


def test_a_client_whose_memory_stalls_costs_only_itself(tmp_path):
    machine = Machine(parse(TOPOLOGY, "<stall test topology>"))
    dev_dir = "/dev/cuse-vfio-test" if TRANSPORT == "cuse" else str(tmp_path / "vfio")
    server = Server(machine.dispatcher, machine.topology.groups.values(), transport=TRANSPORT,
                    dev_dir=dev_dir, runtime_dir=str(tmp_path / "run"))
    flow = build(tmp_path, "vfio-client", CLIENT_C)
    staller = build(tmp_path, "stalling-client", STALLING_CLIENT_C)
    stalling = None
    try:
        with stalling_file_system(tmp_path) as (page_file, armed), serving(server):
            try:
                env = server.client_env(os.environ)
                print("the stalling client: a FUSE page as GROUP_GET_STATUS's argument and as MAP_DMA's vaddr")
                stalling = subprocess.Popen([staller, server.dev_dir, str(page_file)], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, text=True, env=env)
                v = read_until(stalling, "ready", {})
                assert armed.exists()  # everything below happened while the daemon answered nothing
                assert v["status"] == -errno.EFAULT
                assert v["map_dma"] == 0  # MAP_DMA pins nothing: only the DMA reaches the page
                assert v["device"] >= 0 and v["dma_done"] == 1  # the command completed, the transfer faulted
                faults = machine.fault_log.faults()
                assert any(f.iova == 0x100000 and not f.write for f in faults), faults

                print("another client's whole edu flow while the daemon still stalls")
                proc = subprocess.run([flow, server.dev_dir, "2", "flow"], capture_output=True, text=True,
                                      env=env, timeout=CLIENT_TIMEOUT)
                assert proc.returncode == 0, proc.stdout + proc.stderr
                values = parse_values(proc.stdout)
                assert values["map_dma"] == 0 and values["dma_roundtrip"] == 1
                assert values["irq1"] == 1 and values["irq2"] == 1
                assert armed.exists()
                armed.unlink()
                stalling.stdin.close()
                assert stalling.wait(timeout=CLIENT_TIMEOUT) == 0
            finally:  # before the file system goes: the client's mapping would keep it
                if stalling is not None and stalling.poll() is None:
                    stalling.kill()
                    stalling.wait()
    finally:
        machine.close()


def test_serve_refuses_a_dev_dir_another_server_mounted_and_leaves_its_mount(tmp_path):
    machine = Machine(parse(TOPOLOGY, "<stall test topology>"))
    dev_dir = str(tmp_path / "vfio")
    first = Server(machine.dispatcher, machine.topology.groups.values(), transport="fuse",
                   dev_dir=dev_dir, runtime_dir=str(tmp_path / "run1"))
    second = Server(machine.dispatcher, machine.topology.groups.values(), transport="fuse",
                    dev_dir=dev_dir, runtime_dir=str(tmp_path / "run2"))
    try:
        with serving(first):
            print("a second server on the first one's --dev-dir is refused, and stops without touching it")
            with pytest.raises(TransportError, match="already a mount point"):
                second.start()
            second.stop()
            assert sorted(os.listdir(dev_dir)) == ["2", "3", "vfio"]  # the first one's mount, still served
    finally:
        machine.close()


def test_a_sysfs_view_refuses_a_mount_point(tmp_path):
    from cuse_vfio.sysfs.tree import SysfsViewError
    machine = Machine(parse(TOPOLOGY, "<stall test topology>"))
    mnt = str(tmp_path / "sys")
    os.mkdir(mnt)
    subprocess.run(["mount", "-t", "tmpfs", "none", mnt], check=True)
    try:
        with pytest.raises(SysfsViewError, match="already a mount point"):
            machine.sysfs_view().mount(mnt)
    finally:
        unmount(mnt)
        machine.close()
