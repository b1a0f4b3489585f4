"""ivshmem-plain: QEMU's shared-memory device, its registers, and its big BAR mapped by real clients.

The first part drives the model and vfio-pci in-process.  The second runs a C
client (written against <linux/vfio.h> only) through the hand-off library,
as tests/test_transport_mmap.py does: it maps the whole shared-memory BAR,
faults it in from several threads at once, and checks that two devices
naming the same ``shm`` file are the same memory while a memfd device is
its own.
"""

import errno
import mmap
import os
import shutil
import struct
import subprocess
import tempfile

import pytest

from cuse_vfio import uapi
from cuse_vfio.devices import create_model
from cuse_vfio.devices.ivshmem import parse_size
from cuse_vfio.machine import Machine
from cuse_vfio.machine.topology import TopologyError, parse
from cuse_vfio.transport.local import LocalProcess
from cuse_vfio.transport.server import Server
from serving_support import CLIENT_TIMEOUT, TRANSPORT, parse_values, serving

needs_server = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or (TRANSPORT == "cuse" and not os.path.exists("/dev/cuse")),
    reason="needs root and /dev/fuse (and /dev/cuse for the CUSE transport)")

SIZE = 16 << 20
BAR2 = 2 << 40
CONFIG = 7 << 40


def topology(shm: str, size: int = SIZE) -> str:
    return "".join(f'[[device]]\nbdf = "0000:00:0{n}.0"\nmodel = "ivshmem-plain"\ngroup = {n}\nsize = {size}\n'
                   + (f'shm = "{shm}"\n' if n != 6 else "") for n in (4, 5, 6))


# -- the model -------------------------------------------------------------------------------

def test_identity_and_bars_are_qemus():
    dev = create_model("ivshmem-plain", name="x", size="2M")
    cfg = bytes(dev.config.data)
    assert struct.unpack_from("<HH", cfg, 0) == (0x1AF4, 0x1110)
    assert cfg[8] == 1 and int.from_bytes(cfg[9:12], "little") == 0x050000
    assert struct.unpack_from("<HH", cfg, 0x2C) == (0x1AF4, 0x1100)
    assert cfg[0x3D] == 0  # no interrupt pin
    assert dev.bars[0].size == 0x100 and not dev.bars[0].bits64
    assert dev.bars[2].size == 2 << 20 and dev.bars[2].bits64 and dev.bars[2].prefetchable
    assert struct.unpack_from("<I", cfg, 0x18)[0] & 0xF == 0xC  # memory, 64-bit, prefetchable


def test_registers():
    dev = create_model("ivshmem-plain", name="x")
    dev.mmio_write(0x00, 4, 0xFFFF)
    assert dev.mmio_read(0x00, 4) == 0xFFFF and dev.mmio_read(0x01, 1) == 0xFF
    dev.mmio_write(0x04, 4, 0x5)
    assert dev.mmio_read(0x04, 4) == 0x5 and dev.mmio_read(0x04, 4) == 0  # reading IntrStatus clears it
    assert dev.mmio_read(0x08, 4) == 0  # IVPosition: no peer number
    dev.mmio_write(0x0C, 4, 1 << 16 | 3)  # a doorbell to peer 1: there are no peers
    assert dev.mmio_read(0x0C, 4) == 0
    dev.reset()
    assert dev.mmio_read(0x00, 4) == 0


@pytest.mark.parametrize("options, words", [({"size": 3 << 20}, "power of two"), ({"size": 2048}, "4 KiB"),
                                            ({"size": "lots"}, "not a number"), ({"shm": 5}, "file path")])
def test_bad_options_are_topology_errors(options, words):
    text = '[[device]]\nbdf = "0000:00:04.0"\nmodel = "ivshmem-plain"\ngroup = 4\n' + "".join(
        f"{k} = {v!r}\n".replace("'", '"') for k, v in options.items())
    with pytest.raises(TopologyError, match=words):
        Machine(parse(text, "t.toml"))


def test_sizes_in_qemus_notation():
    assert [parse_size(s) for s in ("2M", "1G", "64k", 4096, "8MiB")] == [2 << 20, 1 << 30, 64 << 10, 4096, 8 << 20]


def test_an_unusable_shm_file_is_a_topology_error(tmp_path):
    text = topology(str(tmp_path / "no-such-dir" / "shm"))
    with pytest.raises(TopologyError, match="cannot use it as shared memory"):
        Machine(parse(text, "t.toml"))


def test_two_devices_with_one_shm_file_share_their_bar(tmp_path):
    shm = tmp_path / "shm"
    m = Machine(parse(topology(str(shm), 1 << 21), "t.toml"))
    try:
        p = LocalProcess(m.dispatcher)
        c = p.open("/dev/vfio/vfio")
        devs = {}
        for n in (4, 5, 6):
            g = p.open(f"/dev/vfio/{n}")
            p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, struct.pack("<i", c))
            if n == 4:
                p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
            d = devs[n] = p.ioctl(g, uapi.VFIO_GROUP_GET_DEVICE_FD, f"0000:00:0{n}.0".encode() + b"\0")
            p.pwrite(d, struct.pack("<H", 0x2), CONFIG + 4)  # memory decode
            info = uapi.vfio_region_info(argsz=32, index=2)
            p.ioctl(d, uapi.VFIO_DEVICE_GET_REGION_INFO, info)
            assert info.size == 1 << 21 and info.flags & uapi.VFIO_REGION_INFO_FLAG_MMAP
        p.pwrite(devs[4], b"shared!!", BAR2 + 0x1FFFF8)
        assert p.pread(devs[5], 8, BAR2 + 0x1FFFF8) == b"shared!!"
        assert p.pread(devs[6], 8, BAR2 + 0x1FFFF8) == bytes(8)  # the memfd device is its own memory
        with open(shm, "rb") as f:  # and the file is what other processes map
            f.seek(0x1FFFF8)
            assert f.read(8) == b"shared!!"
        os.truncate(shm, 0)  # someone shrinks the file: the server reads zeros, never faults
        assert p.pread(devs[4], 8, BAR2 + 0x1FFFF8) == bytes(8)
    finally:
        m.close()


# -- a real client mapping the big BAR ------------------------------------------------------

CLIENT_C = r"""
/* Maps BAR2 of three ivshmem-plain devices; name=value per check (negative: -errno). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/vfio.h>

#define THREADS 4
static const char *dir;
static size_t size;
static char *bar;

static void say(const char *k, long v) { printf("%s=%ld\n", k, v); fflush(stdout); }

static int device(int c, int n, int set_iommu)
{
	char path[4096], bdf[32];
	int g, d;
	uint16_t cmd = 0x2;

	snprintf(path, sizeof path, "%s/%d", dir, n);
	snprintf(bdf, sizeof bdf, "0000:00:%02x.0", n);
	g = open(path, O_RDWR);
	if (g < 0 || ioctl(g, VFIO_GROUP_SET_CONTAINER, &c) ||
	    (set_iommu && ioctl(c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)))
		return -errno;
	d = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, bdf);
	if (d >= 0)
		pwrite(d, &cmd, 2, ((off_t)VFIO_PCI_CONFIG_REGION_INDEX << 40) + 4);
	return d < 0 ? -errno : d;
}

/* Each thread first-touches its own interleaved 2 MiB stripes, so faults of every thread race. */
static void *fault(void *arg)
{
	long t = (long)arg;
	size_t off;

	for (off = (size_t)t << 21; off < size; off += (size_t)THREADS << 21) {
		size_t i;
		for (i = 0; i < (1 << 21); i += 4096)
			*(volatile uint64_t *)(bar + off + i) = (off + i) ^ 0x5a5a5a5a5a5a5a5aull;
	}
	return NULL;
}

int main(int argc, char **argv)
{
	struct vfio_region_info reg = { .argsz = sizeof reg, .index = VFIO_PCI_BAR2_REGION_INDEX };
	pthread_t th[THREADS];
	int c, a, b, m, ok;
	long t;
	size_t off;
	char *other, *own;

	dir = argv[1];
	c = open(argv[2], O_RDWR);
	a = device(c, 4, 1);
	b = device(c, 5, 0);
	m = device(c, 6, 0);
	say("devices", a >= 0 && b >= 0 && m >= 0 ? 0 : (a < 0 ? a : b < 0 ? b : m));
	if (a < 0 || b < 0 || m < 0)
		return 1;
	say("region_info", ioctl(a, VFIO_DEVICE_GET_REGION_INFO, &reg) ? -errno : 0);
	size = reg.size;
	say("size", (long)size);
	say("mmap_flag", !!(reg.flags & VFIO_REGION_INFO_FLAG_MMAP));
	say("hugetlb", mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_HUGETLB, a, reg.offset)
			== MAP_FAILED ? -errno : 0);
	bar = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, a, reg.offset);
	say("map", bar == MAP_FAILED ? -errno : 0);
	if (bar == MAP_FAILED)
		return 1;
	madvise(bar, size, MADV_HUGEPAGE);   /* where shmem THP is on, faults come in 2 MiB */
	for (t = 0; t < THREADS; t++)
		pthread_create(&th[t], NULL, fault, (void *)t);
	for (t = 0; t < THREADS; t++)
		pthread_join(th[t], NULL);
	for (ok = 1, off = 0; off < size; off += 4096)
		ok &= *(uint64_t *)(bar + off) == (off ^ 0x5a5a5a5a5a5a5a5aull);
	say("threads_wrote", ok);

	other = mmap(NULL, size, PROT_READ, MAP_SHARED, b, reg.offset);  /* the device with the same shm */
	say("map_other", other == MAP_FAILED ? -errno : 0);
	for (ok = other != MAP_FAILED, off = 0; ok && off < size; off += 4096)
		ok &= *(uint64_t *)(other + off) == (off ^ 0x5a5a5a5a5a5a5a5aull);
	say("other_sees_all", ok);
	{
		uint64_t v = 0;
		pread(b, &v, 8, reg.offset + size - 4096);
		say("other_pread", v == ((size - 4096) ^ 0x5a5a5a5a5a5a5a5aull));
	}
	own = mmap(NULL, size, PROT_READ, MAP_SHARED, m, reg.offset);    /* the memfd device */
	say("map_own", own == MAP_FAILED ? -errno : 0);
	say("own_is_apart", own != MAP_FAILED && *(uint64_t *)(own + 4096) == 0);
	bar[size - 1] = 0x42;
	say("last_byte", 0);
	return 0;
}
"""


@pytest.fixture(scope="module")
def shared_dir():
    d = tempfile.mkdtemp(prefix="cuse-vfio-ivshmem.")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def client(shared_dir):
    src = os.path.join(shared_dir, "ivshmem-client.c")
    with open(src, "w") as f:
        f.write(CLIENT_C)
    exe = os.path.join(shared_dir, "ivshmem-client")
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-pthread", "-o", exe, src], check=True)
    return exe


@needs_server
def test_threads_fault_a_16_mib_bar_and_a_second_device_sees_it_through_the_shm_file(client, shared_dir):
    shm = os.path.join(shared_dir, "shm")
    machine = Machine(parse(topology(shm), "<ivshmem>"))
    base = tempfile.mkdtemp(dir=shared_dir)
    dev_dir = "/dev/cuse-vfio-test" if TRANSPORT == "cuse" else os.path.join(base, "vfio")
    server = Server(machine.dispatcher, machine.topology.groups.values(), transport=TRANSPORT, dev_dir=dev_dir,
                    runtime_dir=os.path.join(base, "run"))
    try:
        with serving(server):
            proc = subprocess.run([client, dev_dir, os.path.join(dev_dir, "vfio")], capture_output=True,
                                  text=True, env=server.client_env(os.environ), timeout=CLIENT_TIMEOUT)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        v = parse_values(proc.stdout)
        assert v["devices"] == 0 and v["region_info"] == 0 and v["size"] == SIZE and v["mmap_flag"] == 1
        assert v["hugetlb"] == -errno.EINVAL  # a memfd or file BAR is not hugetlbfs
        assert v["map"] == 0 and v["threads_wrote"] == 1
        assert v["map_other"] == 0 and v["other_sees_all"] == 1 and v["other_pread"] == 1
        assert v["map_own"] == 0 and v["own_is_apart"] == 1
        with open(shm, "rb") as f:  # the server side: the same bytes in the file
            with mmap.mmap(f.fileno(), SIZE, prot=mmap.PROT_READ) as mm:
                assert struct.unpack_from("<Q", mm, 0x123000)[0] == 0x123000 ^ 0x5A5A5A5A5A5A5A5A
                assert mm[SIZE - 1] == 0x42
    finally:
        machine.close()
