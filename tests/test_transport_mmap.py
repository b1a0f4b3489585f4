"""mmap of a device fd through the hand-off library: the client and the model share the BAR's bytes.

A device fd is a FUSE direct_io file, which cannot share the model's pages,
so csrc/preload.c wraps mmap(): for a device fd it asks the server over the
hand-off socket for the memfd behind the region and maps that.  These tests
run a C client written only against <linux/vfio.h> (as the other transport
tests do) against a small model whose BAR0 is plain memory with the MSI-X
table in its middle, which 6.1 maps whole (MSIX_MAPPABLE, no holes), and
whose BAR4 is registers with one page of memory, a window offered as a
sparse mmap area.  Then
the protocol itself, spoken from Python as the library speaks it, and
do_mmap's file rules without any I/O.

Needs root and /dev/fuse, as tests/test_transport_clients.py; runs on either
transport (CUSE_VFIO_TEST_TRANSPORT=cuse inside scripts/vm).
"""

import array
import errno
import fcntl
import mmap
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time

import pytest

from cuse_vfio.machine import Machine
from serving_support import CLIENT_TIMEOUT, TRANSPORT, parse_values, serving, unmount
from cuse_vfio.machine.topology import parse
from cuse_vfio.devices import MmioBar, MsixCapability, PciDevice, RamBar, register_model
from cuse_vfio.errors import VfioError
from cuse_vfio.transport.handoff import HELLO, MMAP_REPLY, MMAP_REQUEST, NOT_MINE, OP_MMAP
from cuse_vfio.transport.mapping import file_mmap_rules
from cuse_vfio.transport.server import Server

needs_server = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or (TRANSPORT == "cuse" and not os.path.exists("/dev/cuse")),
    reason="needs root and /dev/fuse (and /dev/cuse for the CUSE transport)")

BDF = "0000:00:04.0"
GROUP = 4
BOUND = 10.0
NOBODY = 65534
PAGE = mmap.PAGESIZE


@register_model("mmap-test-ram")
class MappedRam(PciDevice):
    """BAR0: 64 KiB of memory with the MSI-X table and PBA in its page at 0x4000; BAR2: one register;
    BAR4: four pages of registers, the second one a window."""

    vendor_id, device_id = 0x1B36, 0x00FE
    class_code = 0xFF0000

    def __init__(self, name=None, **options):
        super().__init__(name, **options)
        self.ram = self.add_bar(0, RamBar(0x10000))
        self.add_bar(2, MmioBar(4096, self.regs_read, self.regs_write))
        self.add_capability(MsixCapability(vectors=4, table_bar=0, table_offset=0x4000))
        self.window = self.add_bar(4, MmioBar(4 * PAGE, self.regs_read, self.regs_write)).add_window(PAGE, PAGE)

    def regs_read(self, offset, size):
        return 0

    def regs_write(self, offset, size, value):
        if offset == 0:  # the model stores into its own memory
            self.ram.backing[0x30:0x34] = value.to_bytes(4, "little")
        elif offset == 4:  # ... or into its window
            self.window.write(0x30, value.to_bytes(4, "little"))


TOPOLOGY = f"""
[[device]]
bdf = "{BDF}"
model = "mmap-test-ram"
group = {GROUP}

[group.{GROUP}]
owner = {NOBODY}
group = {NOBODY}
mode = "0600"
"""

CLIENT_C = r"""
/* Maps BAR0 of a device through its device fd; one check per line, name=value (negative: -errno). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vfio.h>

#define REGION(i, off) (((off_t)(i) << 40) + (off))
#define BAR0(off) REGION(VFIO_PCI_BAR0_REGION_INDEX, off)

static char node[4096];
static const char *dir, *bdf;
static int group_id;
static long page;

static const char *path(const char *name) { snprintf(node, sizeof node, "%s/%s", dir, name); return node; }
static long rc(long r) { return r < 0 ? -errno : r; }
static long mrc(void *p) { return p == MAP_FAILED ? -errno : 0; }
static void say(const char *k, long v) { printf("%s=%ld\n", k, v); fflush(stdout); }
static uint32_t rd32(int d, off_t off) { uint32_t v = 0; if (pread(d, &v, 4, off) != 4) say("pread_failed", -errno); return v; }
static void wr32(int d, off_t off, uint32_t v) { if (pwrite(d, &v, 4, off) != 4) say("pwrite_failed", -errno); }
static uint32_t at(void *p, size_t off) { return *(volatile uint32_t *)((char *)p + off); }
static void put(void *p, size_t off, uint32_t v) { *(volatile uint32_t *)((char *)p + off) = v; }
static void *map(int d, size_t len, int prot, int flags, off_t off) { return mmap(NULL, len, prot, flags, d, off); }

static int device(int *gp)
{
	char g[16];
	int c = open(path("vfio"), O_RDWR), grp, d;

	snprintf(g, sizeof g, "%d", group_id);
	grp = open(path(g), O_RDWR);
	say("open_group", rc(grp));
	if (c < 0 || grp < 0 || ioctl(grp, VFIO_GROUP_SET_CONTAINER, &c) || ioctl(c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)) {
		say("setup", -errno);
		return -1;
	}
	d = ioctl(grp, VFIO_GROUP_GET_DEVICE_FD, bdf);
	say("device", rc(d));
	if (d >= 0) {
		uint16_t cmd = 0;
		pread(d, &cmd, 2, REGION(VFIO_PCI_CONFIG_REGION_INDEX, 4));
		cmd |= 0x2; /* memory decode, for the pread/pwrite comparisons */
		pwrite(d, &cmd, 2, REGION(VFIO_PCI_CONFIG_REGION_INDEX, 4));
	}
	if (gp)
		*gp = grp;
	return d;
}

static int cmd_share(void)
{
	struct vfio_region_info reg = { .argsz = sizeof reg, .index = VFIO_PCI_BAR0_REGION_INDEX };
	int g, d = device(&g), d2, d3, file;
	void *p, *q, *r, *m2, *m3, *f, *a;

	if (d < 0)
		return 1;
	say("region_info", rc(ioctl(d, VFIO_DEVICE_GET_REGION_INFO, &reg)));
	say("region_mmap_flag", !!(reg.flags & VFIO_REGION_INFO_FLAG_MMAP));

	p = map(d, 0x4000, PROT_READ | PROT_WRITE, MAP_SHARED, BAR0(0));
	say("map", mrc(p));
	if (p == MAP_FAILED)
		return 1;
	put(p, 0x10, 0xdeadbeef);                        /* a store through the mapping... */
	say("pread_sees_store", rd32(d, BAR0(0x10)) == 0xdeadbeef);  /* ...is the model's memory */
	wr32(d, BAR0(0x20), 0x1234);                     /* a write through the device fd... */
	say("map_sees_pwrite", at(p, 0x20) == 0x1234);   /* ...is in the mapping */
	wr32(d, REGION(VFIO_PCI_BAR2_REGION_INDEX, 0), 0xcafe);  /* the model stores into its RAM */
	say("map_sees_model", at(p, 0x30) == 0xcafe);

	q = map(d, 100, PROT_READ, MAP_SHARED, BAR0(0));  /* a length that is not whole pages */
	say("short_length", mrc(q));
	say("short_length_reads", q != MAP_FAILED && at(q, 0x10) == 0xdeadbeef);
	r = map(d, 0xb000, PROT_READ | PROT_WRITE, MAP_SHARED, BAR0(0x5000));  /* at an offset: after the MSI-X page */
	say("second_area", mrc(r));
	if (r != MAP_FAILED) {
		put(r, 0, 0x55aa);
		say("second_area_offset", rd32(d, BAR0(0x5000)) == 0x55aa);
	}
	a = mmap(NULL, 2 * page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	f = mmap(a, page, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, d, BAR0(0));
	say("fixed_at_address", f == a);
	say("fixed_reads", f != MAP_FAILED && at(f, 0x10) == 0xdeadbeef);

	d2 = dup(d);                                     /* any fd of the same open is the device fd */
	m2 = map(d2, page, PROT_READ | PROT_WRITE, MAP_SHARED, BAR0(0));
	say("dup", mrc(m2));
	say("dup_same_memory", m2 != MAP_FAILED && at(m2, 0x10) == 0xdeadbeef);
	d3 = fcntl(d, F_DUPFD_CLOEXEC, 300);
	m3 = map(d3, page, PROT_READ, MAP_SHARED_VALIDATE, BAR0(0));
	say("dupfd_validate", mrc(m3));

	say("private", mrc(map(d, page, PROT_READ, MAP_PRIVATE, BAR0(0))));
	say("bad_type", mrc(map(d, page, PROT_READ, 0, BAR0(0))));
	say("msix_page", mrc(map(d, page, PROT_READ | PROT_WRITE, MAP_SHARED, BAR0(0x4000))));
	say("across_msix", mrc(map(d, 0x5000, PROT_READ, MAP_SHARED, BAR0(0))));
	say("unaligned", mrc(map(d, page, PROT_READ, MAP_SHARED, BAR0(0x10))));
	say("past_end", mrc(map(d, 2 * page, PROT_READ, MAP_SHARED, BAR0(0x10000 - page))));
	say("beyond", mrc(map(d, page, PROT_READ, MAP_SHARED, BAR0(0x10000))));
	say("registers", mrc(map(d, page, PROT_READ, MAP_SHARED, REGION(VFIO_PCI_BAR2_REGION_INDEX, 0))));
	say("config", mrc(map(d, page, PROT_READ, MAP_SHARED, REGION(VFIO_PCI_CONFIG_REGION_INDEX, 0))));
	say("rom", mrc(map(d, page, PROT_READ, MAP_SHARED, REGION(VFIO_PCI_ROM_REGION_INDEX, 0))));
	say("no_region", mrc(map(d, page, PROT_READ, MAP_SHARED, REGION(20, 0))));
	say("zero_length", mrc(map(d, 0, PROT_READ, MAP_SHARED, BAR0(0))));
	say("sync_validate", mrc(map(d, page, PROT_READ, MAP_SHARED_VALIDATE | MAP_SYNC, BAR0(0))));
	say("group_fd", mrc(map(g, page, PROT_READ, MAP_SHARED, 0)));
	say("not_open", mrc(map(999, page, PROT_READ, MAP_SHARED, 0)));

	/* Other files still map as they always did. */
	file = open("/proc/self/exe", O_RDONLY);
	f = map(file, page, PROT_READ, MAP_PRIVATE, 0);
	say("elf_file", f != MAP_FAILED && !memcmp(f, "\177ELF", 4));
	f = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	say("anonymous", mrc(f));

	say("munmap", rc(munmap(p, 0x4000)));
	close(d3);
	close(d2);
	close(d);
	/* As with the kernel's, a mapping outlives the fd it was made through. */
	say("after_close", at(m2, 0x10) == 0xdeadbeef);
	return 0;
}

/* BAR4: registers with a window at its second page, listed by VFIO_REGION_INFO_CAP_SPARSE_MMAP. */
static int cmd_sparse(void)
{
	char buf[256] = { 0 };
	struct vfio_region_info *reg = (void *)buf;
	struct vfio_info_cap_header *h;
	struct vfio_region_info_cap_sparse_mmap *sparse = NULL;
	off_t win = REGION(VFIO_PCI_BAR4_REGION_INDEX, page);
	int d = device(NULL);
	void *p;

	if (d < 0)
		return 1;
	reg->argsz = sizeof buf;
	reg->index = VFIO_PCI_BAR4_REGION_INDEX;
	say("sparse_region_info", rc(ioctl(d, VFIO_DEVICE_GET_REGION_INFO, reg)));
	say("sparse_flags", reg->flags);
	for (h = reg->cap_offset ? (void *)(buf + reg->cap_offset) : NULL; h; h = h->next ? (void *)(buf + h->next) : NULL)
		if (h->id == VFIO_REGION_INFO_CAP_SPARSE_MMAP)
			sparse = (void *)h;
	say("sparse_version", sparse ? sparse->header.version : -1);
	say("sparse_nr_areas", sparse ? (long)sparse->nr_areas : -1);
	if (sparse && sparse->nr_areas == 1) {
		say("sparse_area_offset", sparse->areas[0].offset);
		say("sparse_area_size", sparse->areas[0].size);
	}
	p = map(d, page, PROT_READ | PROT_WRITE, MAP_SHARED, win);
	say("sparse_map", mrc(p));
	if (p == MAP_FAILED)
		return 1;
	put(p, 0x10, 0xfeedf00d);
	say("sparse_pread_sees_store", rd32(d, win + 0x10) == 0xfeedf00d);
	wr32(d, win + 0x20, 0x4321);
	say("sparse_map_sees_pwrite", at(p, 0x20) == 0x4321);
	wr32(d, REGION(VFIO_PCI_BAR2_REGION_INDEX, 4), 0xabcd);  /* the model updates its window */
	say("sparse_map_sees_model", at(p, 0x30) == 0xabcd);
	say("sparse_registers", mrc(map(d, page, PROT_READ, MAP_SHARED, REGION(VFIO_PCI_BAR4_REGION_INDEX, 0))));
	say("sparse_across", mrc(map(d, 2 * page, PROT_READ, MAP_SHARED, win)));
	say("sparse_whole", mrc(map(d, 4 * page, PROT_READ, MAP_SHARED, REGION(VFIO_PCI_BAR4_REGION_INDEX, 0))));
	return 0;
}

static int cmd_fork(void)
{
	int d = device(NULL), status = -1;
	pid_t pid;

	if (d < 0)
		return 1;
	pid = fork();
	if (pid == 0) {  /* the child holds the inherited device fd: it may map it */
		void *p = map(d, page, PROT_READ | PROT_WRITE, MAP_SHARED, BAR0(0));
		if (p == MAP_FAILED)
			_exit(10);
		put(p, 0x40, 0x77);
		_exit(0);
	}
	waitpid(pid, &status, 0);
	say("child", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
	say("parent_sees_child", rd32(d, BAR0(0x40)) == 0x77);
	return 0;
}

static int cmd_hold(void)
{
	int d = device(NULL);
	char c;

	if (d < 0)
		return 1;
	say("held_fd", rc(dup2(d, 500)));
	say("ready", 1);
	while (read(0, &c, 1) > 0)
		;
	return 0;
}

/* Another connection of this process is open (another thread's call) but this call cannot reach the server. */
static int cmd_token(void)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	char hello = 0;

	snprintf(sa.sun_path, sizeof sa.sun_path, "%s", getenv("CUSE_VFIO_SOCKET"));
	say("other_connection", rc(connect(s, (struct sockaddr *)&sa, sizeof sa)));
	say("hello", read(s, &hello, 1) == 1 && hello == 'R');
	setenv("CUSE_VFIO_SOCKET", "/nonexistent/cuse-vfio.sock", 1);
	return device(NULL) >= 0;
}

int main(int argc, char **argv)
{
	if (argc < 5)
		return 2;
	dir = argv[1];
	group_id = atoi(argv[2]);
	bdf = argv[3];
	page = sysconf(_SC_PAGESIZE);
	if (!strcmp(argv[4], "share")) return cmd_share();
	if (!strcmp(argv[4], "fork")) return cmd_fork();
	if (!strcmp(argv[4], "sparse")) return cmd_sparse();
	if (!strcmp(argv[4], "hold")) return cmd_hold();
	if (!strcmp(argv[4], "token")) return cmd_token();
	return 2;
}
"""


@pytest.fixture(scope="module")
def shared_dir():
    """A directory every user can reach (pytest's own are 0700): the client, the nodes, the runtime dir."""
    d = tempfile.mkdtemp(prefix="cuse-vfio-mmap.")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def clients(shared_dir):
    """The client as most programs are built, and with 64-bit file offsets (QEMU's way: it calls mmap64)."""
    src = os.path.join(shared_dir, "mmap-client.c")
    with open(src, "w") as f:
        f.write(CLIENT_C)
    built = {}
    for name, flags in (("mmap", []), ("mmap64", ["-D_FILE_OFFSET_BITS=64"])):
        exe = built[name] = os.path.join(shared_dir, f"{name}-client")
        subprocess.run(["gcc", "-O1", "-Wall", "-Werror", *flags, "-o", exe, src], check=True)
        os.chmod(exe, 0o755)
    return built


@pytest.fixture(scope="module")
def client(clients):
    return clients["mmap"]



@pytest.fixture
def machine():
    m = Machine(parse(TOPOLOGY, "<mmap test topology>"))
    yield m
    m.close()


@pytest.fixture
def server(machine, shared_dir):
    base = tempfile.mkdtemp(dir=shared_dir)
    os.chmod(base, 0o755)
    dev_dir = "/dev/cuse-vfio-test" if TRANSPORT == "cuse" else os.path.join(base, "vfio")
    s = Server(machine.dispatcher, machine.topology.groups.values(), transport=TRANSPORT, dev_dir=dev_dir,
               runtime_dir=os.path.join(base, "run"))
    with serving(s):
        yield s



def read_until(proc, key):
    values = {}
    for line in proc.stdout:
        name, _, value = line.strip().partition("=")
        values[name] = int(value)
        if name == key:
            return values
    raise AssertionError(f"client ended before {key}: {values}")


def run(client, server, command, **popen):
    proc = subprocess.run([client, server.dev_dir, str(GROUP), BDF, command], capture_output=True, text=True,
                          env=server.client_env(os.environ), timeout=CLIENT_TIMEOUT, **popen)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return parse_values(proc.stdout)


def ram(machine):
    return machine.vdevs[BDF].function.bars[0].backing


def u32(value):
    return value.to_bytes(4, "little")


# -- the C client ----------------------------------------------------------------------------
@needs_server
@pytest.mark.parametrize("as_user, build", [(0, "mmap"), (NOBODY, "mmap"), (0, "mmap64")],
                         ids=["root", "unprivileged", "mmap64"])
def test_a_mapping_shares_the_bar_with_the_model(clients, server, machine, as_user, build):
    # Group 4 belongs to uid 65534 (the topology's [group.4]): root and its owner may both use it.
    v = run(clients[build], server, "share", user=as_user, group=as_user, extra_groups=[])
    assert v["open_group"] >= 0 and v["device"] >= 3
    assert v["region_info"] == 0 and v["region_mmap_flag"] == 1
    assert v["map"] == 0
    assert v["pread_sees_store"] == 1 and v["map_sees_pwrite"] == 1 and v["map_sees_model"] == 1
    assert v["short_length"] == 0 and v["short_length_reads"] == 1
    assert v["second_area"] == 0 and v["second_area_offset"] == 1
    assert v["fixed_at_address"] == 1 and v["fixed_reads"] == 1
    assert v["dup"] == 0 and v["dup_same_memory"] == 1 and v["dupfd_validate"] == 0
    assert v["msix_page"] == 0 and v["across_msix"] == 0  # 6.1 maps the MSI-X table and PBA too
    for name in ("private", "bad_type", "unaligned", "past_end", "beyond",
                 "registers", "config", "rom", "no_region", "zero_length"):
        assert v[name] == -errno.EINVAL, name
    assert v["sync_validate"] == -errno.EOPNOTSUPP
    assert v["group_fd"] == -errno.ENODEV  # as the kernel's group fd, which has no mmap
    assert v["not_open"] == -errno.EBADF
    assert v["elf_file"] == 1 and v["anonymous"] == 0
    assert v["munmap"] == 0 and v["after_close"] == 1
    # What the client stored through its mapping is in the model's memory.
    assert ram(machine)[0x10:0x14] == u32(0xDEADBEEF)
    assert ram(machine)[0x5000:0x5004] == u32(0x55AA)


@needs_server
def test_a_window_maps_through_its_sparse_mmap_area_and_nothing_else(client, server, machine):
    v = run(client, server, "sparse")
    assert v["sparse_region_info"] == 0
    assert v["sparse_flags"] == 0xF  # READ | WRITE | MMAP | CAPS
    assert (v["sparse_version"], v["sparse_nr_areas"]) == (1, 1)
    assert (v["sparse_area_offset"], v["sparse_area_size"]) == (PAGE, PAGE)
    assert v["sparse_map"] == 0
    assert v["sparse_pread_sees_store"] == v["sparse_map_sees_pwrite"] == v["sparse_map_sees_model"] == 1
    # vfio_pci_mmap refused a mapping reaching a trapped register (the MSI-X table before 4.16): EINVAL
    assert v["sparse_registers"] == v["sparse_across"] == v["sparse_whole"] == -errno.EINVAL
    window = machine.vdevs[BDF].function.window
    assert window.read(0x10, 4) == u32(0xFEEDF00D) and window.read(0x20, 4) == u32(0x4321)


@needs_server
def test_a_forked_child_maps_the_device_fd_it_inherited(client, server, machine):
    v = run(client, server, "fork")
    assert v["child"] == 0 and v["parent_sees_child"] == 1
    assert ram(machine)[0x40:0x44] == u32(0x77)


@needs_server
def test_a_token_is_never_returned_as_an_fd(client, server):
    # The server issues a token because the process holds a connection, but
    # this call's own connect failed: the library must fail, not return the token.
    v = run(client, server, "token")
    assert v["other_connection"] == 0 and v["hello"] == 1
    assert v["device"] == -errno.EIO


# -- the protocol, spoken from Python as csrc/preload.c speaks it -----------------------------------
def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(BOUND)
    s.connect(path)
    assert s.recv(1) == HELLO
    return s


def call(s, request, size):
    s.sendall(request)
    data, ancdata, _, _ = s.recvmsg(size, socket.CMSG_SPACE(4), socket.MSG_WAITALL)
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload)
    return data, (fds[0] if fds else None)


def ask_map(path, fd, offset, length, prot=mmap.PROT_READ | mmap.PROT_WRITE, flags=mmap.MAP_SHARED):
    with connect(path) as s:
        data, memfd = call(s, MMAP_REQUEST.pack(OP_MMAP, fd, prot, flags, offset, length), MMAP_REPLY.size)
    status, _, start = MMAP_REPLY.unpack(data)
    return status, memfd, start


def get_device_fd(server):
    """This process as a client with the library: greeted, the raw ioctl, the token redeemed."""
    conn = connect(server.socket_path)
    c = os.open(server.container_path, os.O_RDWR)
    g = os.open(server.group_path(GROUP), os.O_RDWR)
    fcntl.ioctl(g, 0x3B68, struct.pack("<i", c))                  # VFIO_GROUP_SET_CONTAINER
    fcntl.ioctl(c, 0x3B66, 3)                                     # VFIO_SET_IOMMU, TYPE1v2
    token = fcntl.ioctl(g, 0x3B6A, bytearray(BDF.encode() + b"\0"))  # VFIO_GROUP_GET_DEVICE_FD
    data, device = call(conn, struct.pack("<I", token), 4)
    conn.close()
    assert struct.unpack("<i", data)[0] == 0 and device is not None
    return c, g, device


@needs_server
def test_the_server_answers_only_for_a_device_file_the_asker_holds(client, server, machine):
    c, g, device = get_device_fd(server)
    try:
        status, memfd, start = ask_map(server.socket_path, device, 0x1000, 0x1000)
        assert (status, start) == (0, 0x1000) and memfd is not None
        view = mmap.mmap(memfd, 0x2000, mmap.MAP_SHARED)
        os.close(memfd)
        view[0x1008:0x100C] = u32(0x600DF00D)
        assert ram(machine)[0x1008:0x100C] == u32(0x600DF00D)
        view.close()
        # This process's own fds that are no device file: the library maps them itself.
        r, w = os.pipe()
        assert ask_map(server.socket_path, r, 0, 0x1000) == (NOT_MINE, None, 0)
        assert ask_map(server.socket_path, g, 0, 0x1000) == (NOT_MINE, None, 0)
        assert ask_map(server.socket_path, c, 0, 0x1000) == (NOT_MINE, None, 0)
        # The device's rules come back as an errno, with no fd.
        assert ask_map(server.socket_path, device, 0x10000, 0x1000) == (errno.EINVAL, None, 0)  # past BAR0
        assert ask_map(server.socket_path, device, 0, 0x1000, flags=mmap.MAP_PRIVATE) == (errno.EINVAL, None, 0)
        assert ask_map(server.socket_path, device, 0, 0x1000, prot=mmap.PROT_WRITE, flags=0) == (errno.EINVAL, None, 0)
    finally:
        for fd in (device, g, c):
            os.close(fd)

    # Another process holds the device fd as its number 500; here 500 is nothing, then a pipe.
    held = subprocess.Popen([client, server.dev_dir, str(GROUP), BDF, "hold"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=server.client_env(os.environ))
    try:
        values = read_until(held, "ready")
        assert values["device"] >= 3 and values["held_fd"] == 500
        with pytest.raises(OSError):
            os.fstat(500)
        assert ask_map(server.socket_path, 500, 0, 0x1000) == (errno.EBADF, None, 0)
        os.dup2(r, 500)
        try:
            assert ask_map(server.socket_path, 500, 0, 0x1000) == (NOT_MINE, None, 0)
        finally:
            os.close(500)
    finally:
        os.close(r)
        os.close(w)
        held.stdin.close()
        assert held.wait(timeout=CLIENT_TIMEOUT) == 0


@needs_server
def test_the_memfd_a_client_gets_cannot_shrink_under_the_model(server):
    c, g, device = get_device_fd(server)
    try:
        status, memfd, _ = ask_map(server.socket_path, device, 0, 0x1000)
        assert status == 0
        # Never try the truncation itself: the model's mapping lives in this (pytest) process.
        seals = fcntl.fcntl(memfd, 1034)  # F_GET_SEALS
        os.close(memfd)
        assert seals & 0x0002 and seals & 0x0004  # F_SEAL_SHRINK, F_SEAL_GROW
    finally:
        for fd in (device, g, c):
            os.close(fd)


STALLING_FS = r"""
import errno, os, stat, sys, time
from mfusepy import FUSE, FuseOSError, Operations

armed = sys.argv[2]
class Stalling(Operations):
    # One file; once `armed` exists, every getattr and flush waits until it is gone.
    use_ns = True

    def _stall(self):
        while os.path.exists(armed):
            time.sleep(0.01)
    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path != "/f":
            raise FuseOSError(errno.ENOENT)
        self._stall()
        return {"st_mode": stat.S_IFREG | 0o644, "st_nlink": 1, "st_size": 4096}
    def readdir(self, path, fh):
        return [".", "..", "f"]
    def open(self, path, flags):
        return 0
    def flush(self, path, fh):
        self._stall()
        return 0
FUSE(Stalling(), sys.argv[1], foreground=True, attr_timeout=0.0, entry_timeout=0.0)
"""


@needs_server
def test_a_file_of_a_stalling_file_system_does_not_hold_up_the_hand_off(server, tmp_path):
    # Any user may ask about any fd of theirs; if the server fstat'ed or closed it, a
    # FUSE daemon of their own that never answers would stop every hand-off.
    mnt, armed = tmp_path / "stall", tmp_path / "armed"
    mnt.mkdir()
    fs = subprocess.Popen([os.sys.executable, "-c", STALLING_FS, str(mnt), str(armed)])
    try:
        deadline = time.monotonic() + BOUND
        while not os.path.ismount(mnt):
            assert time.monotonic() < deadline and fs.poll() is None, "the stalling file system did not mount"
            time.sleep(0.01)
        fd = os.open(mnt / "f", os.O_RDONLY)
        armed.touch()
        started = time.monotonic()
        assert ask_map(server.socket_path, fd, 0, 0x1000) == (NOT_MINE, None, 0)
        assert time.monotonic() - started < BOUND / 2
        armed.unlink()
        os.close(fd)
    finally:
        if armed.exists():
            armed.unlink()
        unmount(str(mnt))
        fs.wait(timeout=BOUND)


@needs_server
def test_a_garbage_request_costs_only_its_connection(server):
    bad = connect(server.socket_path)
    bad.sendall(struct.pack("<I", 7))
    assert bad.recv(16) == b""  # disconnected
    half = connect(server.socket_path)
    half.sendall(MMAP_REQUEST.pack(OP_MMAP, 0, 0, 0, 0, 0)[:10])  # and then nothing
    r, w = os.pipe()
    try:
        assert ask_map(server.socket_path, r, 0, 0x1000) == (NOT_MINE, None, 0)  # not held up by `half`
    finally:
        os.close(r)
        os.close(w)
        half.close()
        bad.close()


# -- do_mmap's file rules, no I/O ---------------------------------------------------------------------
def rule_errno(*args):
    try:
        file_mmap_rules(*args)
    except VfioError as e:
        return e.errno
    return 0


def test_file_mmap_rules():
    rw, shared, private = os.O_RDWR, mmap.MAP_SHARED, mmap.MAP_PRIVATE
    read, write = mmap.PROT_READ, mmap.PROT_READ | mmap.PROT_WRITE
    assert file_mmap_rules(0, 1, read, shared, rw) == (PAGE, True)
    assert file_mmap_rules(PAGE, 3 * PAGE, write, shared | 0x03, rw) == (3 * PAGE, True)  # SHARED_VALIDATE
    assert file_mmap_rules(0, PAGE, read, private, rw) == (PAGE, False)
    # A shared mapping of a read-only open is not VM_SHARED: the device's mmap refuses it.
    assert file_mmap_rules(0, PAGE, read, shared, os.O_RDONLY) == (PAGE, False)
    assert rule_errno(0, PAGE, write, shared, os.O_RDONLY) == errno.EACCES
    assert rule_errno(0, PAGE, read, shared, os.O_WRONLY) == errno.EACCES
    assert rule_errno(0, PAGE, read, private, os.O_WRONLY) == errno.EACCES
    assert rule_errno(0x10, PAGE, read, shared, rw) == errno.EINVAL
    assert rule_errno(0, 0, read, shared, rw) == errno.EINVAL
    assert rule_errno(0, PAGE, read, 0, rw) == errno.EINVAL
    assert rule_errno(0, (1 << 64) - 1, read, shared, rw) == errno.ENOMEM



def test_unsealed_model_memory_is_never_handed_to_a_client():
    sealed = os.memfd_create("sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    unsealed = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    try:
        os.ftruncate(sealed, 4096)
        fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        Server._check_seals(sealed, "sealed model")
        with pytest.raises(VfioError) as e:
            Server._check_seals(unsealed, "unsealed model")
        assert e.value.errno == errno.EPERM
    finally:
        os.close(sealed)
        os.close(unsealed)
