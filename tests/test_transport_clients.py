"""The serving layer through real syscalls: C clients against a running Server.

Each test starts a Server for the default topology (one QEMU edu at
0000:00:02.0 in IOMMU group 2) and runs a C client written only against
<linux/vfio.h>; the client prints one ``name=value`` line per observation (a
negative value is -errno).  Needs root and /dev/fuse; every mount is taken
down by the fixture, even on failure.

The transport is FUSE (this host has no CUSE); inside a VM with cuse.ko the
same tests run on CUSE nodes with
``scripts/vm --mode cuse -- env CUSE_VFIO_TEST_TRANSPORT=cuse .venv/bin/python -m pytest tests/test_transport_clients.py``.
"""

import errno
import fcntl
import logging
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time

import pytest

from cuse_vfio.machine import Machine
from serving_support import CLIENT_TIMEOUT, TRANSPORT, parse_values, serving, unmount
from cuse_vfio.machine.topology import load
from cuse_vfio.dispatch import GroupNode
from cuse_vfio.transport import handles
from cuse_vfio.transport.server import Server


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"),
    pytest.mark.skipif(TRANSPORT == "cuse" and not os.path.exists("/dev/cuse"), reason="needs /dev/cuse"),
]

EDU_ID = 0x11E81234
NOBODY, SOMEBODY_ELSE = 65534, 65533

CLIENT_C = r"""
/* A VFIO client written only against <linux/vfio.h>: one check per line, name=value. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <linux/vfio.h>

#define DEVICE "0000:00:02.0"
#define CFG(off) (((off_t)VFIO_PCI_CONFIG_REGION_INDEX << 40) + (off))
#define BAR0(off) (((off_t)VFIO_PCI_BAR0_REGION_INDEX << 40) + (off))

static char node[4096];
static const char *dir;
static int group_id;

static const char *path(const char *name) { snprintf(node, sizeof node, "%s/%s", dir, name); return node; }
static int rc(int r) { return r < 0 ? -errno : r; } /* result or -errno */
static void say(const char *k, long v) { printf("%s=%ld\n", k, v); fflush(stdout); }

static int open_group(void) { char g[16]; snprintf(g, sizeof g, "%d", group_id); return open(path(g), O_RDWR); }

static void wait_stdin(void) { char c; while (read(0, &c, 1) > 0) ; }

static uint32_t rd32(int d, off_t off) { uint32_t v = 0; if (pread(d, &v, 4, off) != 4) say("pread_failed", -errno); return v; }
static void wr32(int d, off_t off, uint32_t v) { if (pwrite(d, &v, 4, off) != 4) say("pwrite_failed", -errno); }
static void wr64(int d, off_t off, uint64_t v) { if (pwrite(d, &v, 8, off) != 8) say("pwrite_failed", -errno); }
static uint64_t rd64(int d, off_t off) { uint64_t v = 0; if (pread(d, &v, 8, off) != 8) say("pread_failed", -errno); return v; }

static int cmd_container(void)
{
	int c = open(path("vfio"), O_RDWR);
	say("open", rc(c));
	say("api", rc(ioctl(c, VFIO_GET_API_VERSION)));
	say("type1", rc(ioctl(c, VFIO_CHECK_EXTENSION, VFIO_TYPE1_IOMMU)));
	say("type1v2", rc(ioctl(c, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU)));
	say("bogus_ext", rc(ioctl(c, VFIO_CHECK_EXTENSION, 1000)));
	say("set_iommu_without_group", rc(ioctl(c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)));
	say("unknown_ioctl", rc(ioctl(c, _IO(VFIO_TYPE, VFIO_BASE + 60))));
	return 0;
}

static int cmd_status(void)
{
	int g = open_group();
	struct vfio_group_status st = { .argsz = sizeof st };
	long page = sysconf(_SC_PAGESIZE);
	char *m = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	say("open", rc(g));
	say("status", rc(ioctl(g, VFIO_GROUP_GET_STATUS, &st)));
	say("flags", st.flags);
	st.argsz = 4;
	st.flags = 0x5a;
	say("argsz4", rc(ioctl(g, VFIO_GROUP_GET_STATUS, &st)));
	say("argsz4_flags_untouched", st.flags == 0x5a);
	say("badptr", rc(ioctl(g, VFIO_GROUP_GET_STATUS, (void *)8)));
	mprotect(m + page, page, PROT_NONE);
	/* argsz readable, flags in the PROT_NONE page */
	*(uint32_t *)(m + page - 4) = 8;
	say("straddle", rc(ioctl(g, VFIO_GROUP_GET_STATUS, m + page - 4)));
	/* a read-only struct: readable but the kernel cannot write flags back */
	struct vfio_group_status *ro = (void *)m;
	ro->argsz = sizeof *ro;
	mprotect(m, page, PROT_READ);
	say("readonly", rc(ioctl(g, VFIO_GROUP_GET_STATUS, ro)));
	return 0;
}

static int cmd_set_container(void)
{
	int c = open(path("vfio"), O_RDWR), g = open_group(), other = open("/dev/null", O_RDWR), bad = -1, closed = 999;
	struct vfio_group_status st = { .argsz = sizeof st };

	say("minus_one", rc(ioctl(g, VFIO_GROUP_SET_CONTAINER, &bad)));
	say("not_open", rc(ioctl(g, VFIO_GROUP_SET_CONTAINER, &closed)));
	say("dev_null", rc(ioctl(g, VFIO_GROUP_SET_CONTAINER, &other)));
	say("group_fd", rc(ioctl(g, VFIO_GROUP_SET_CONTAINER, &g)));
	say("badptr", rc(ioctl(g, VFIO_GROUP_SET_CONTAINER, (void *)8)));
	say("container", rc(ioctl(g, VFIO_GROUP_SET_CONTAINER, &c)));
	ioctl(g, VFIO_GROUP_GET_STATUS, &st);
	say("flags_set", st.flags);
	say("again", rc(ioctl(g, VFIO_GROUP_SET_CONTAINER, &c)));
	say("set_iommu", rc(ioctl(c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)));
	say("unset", rc(ioctl(g, VFIO_GROUP_UNSET_CONTAINER)));
	ioctl(g, VFIO_GROUP_GET_STATUS, &st);
	say("flags_unset", st.flags);
	return 0;
}

static int setup(int *cp, int *gp)
{
	int c = open(path("vfio"), O_RDWR), g = open_group();

	if (c < 0 || g < 0 || ioctl(g, VFIO_GROUP_SET_CONTAINER, &c) || ioctl(c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)) {
		say("setup", -errno);
		return -1;
	}
	*cp = c;
	*gp = g;
	return 0;
}

/* close() of a device fd, then at once UNSET_CONTAINER, many times: the
 * kernel has released the device when close returns, so the group is free.
 * Every other round the last ioctl before the close is one the server runs
 * on a worker (PCI_HOT_RESET; ENODEV on the root bus): its hold on the
 * device fd ends before its answer, as the kernel's fdput does. */
static int cmd_close_unset(void)
{
	int c, g, i, busy = 0;
	struct { struct vfio_pci_hot_reset hr; int32_t fd; } reset = {
		.hr = { .argsz = sizeof(reset), .count = 1 },
	};

	if (setup(&c, &g))
		return 1;
	reset.fd = g;
	for (i = 0; i < 50; i++) {
		int d = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, DEVICE);
		if (d < 0) {
			say("device", -errno);
			return 1;
		}
		if (i % 2)
			ioctl(d, VFIO_DEVICE_PCI_HOT_RESET, &reset);
		close(d);
		if (ioctl(g, VFIO_GROUP_UNSET_CONTAINER)) {
			busy++;
			while (ioctl(g, VFIO_GROUP_UNSET_CONTAINER) && errno == EBUSY)
				usleep(1000);
		}
		if (ioctl(g, VFIO_GROUP_SET_CONTAINER, &c) || ioctl(c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)) {
			say("setup_again", -errno);
			return 1;
		}
	}
	say("unset_busy", busy);
	return 0;
}

static int cmd_device_fd(void)
{
	int c, g, d;

	if (setup(&c, &g))
		return 1;
	d = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, DEVICE);
	say("device", rc(d));
	if (d >= 0) {
		say("cloexec", !!(fcntl(d, F_GETFD) & FD_CLOEXEC));
		say("id", rd32(d, CFG(0)));
	}
	say("unknown_device", rc(ioctl(g, VFIO_GROUP_GET_DEVICE_FD, "0000:00:09.0")));
	return 0;
}

static int wait_efd(int efd, int ms)
{
	struct pollfd p = { .fd = efd, .events = POLLIN };
	uint64_t n = 0;

	if (poll(&p, 1, ms) != 1)
		return 0;
	if (read(efd, &n, 8) != 8)
		return -1;
	return (int)n;
}

static int set_irq_eventfd(int d, uint32_t index, uint32_t action, int efd)
{
	char buf[sizeof(struct vfio_irq_set) + sizeof(int)];
	struct vfio_irq_set *s = (void *)buf;

	s->argsz = sizeof buf;
	s->flags = VFIO_IRQ_SET_DATA_EVENTFD | action;
	s->index = index;
	s->start = 0;
	s->count = 1;
	memcpy(s->data, &efd, sizeof efd);
	return ioctl(d, VFIO_DEVICE_SET_IRQS, s);
}

static int cmd_flow(int hold)
{
	int c, g, d, i;
	struct vfio_device_info info = { .argsz = sizeof info };
	struct vfio_region_info reg = { .argsz = sizeof reg, .index = VFIO_PCI_CONFIG_REGION_INDEX };

	if (setup(&c, &g))
		return 1;
	d = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, DEVICE);
	say("device", rc(d));
	if (d < 0)
		return 1;
	say("cloexec", !!(fcntl(d, F_GETFD) & FD_CLOEXEC));
	say("id", rd32(d, CFG(0)));
	say("info", rc(ioctl(d, VFIO_DEVICE_GET_INFO, &info)));
	say("info_flags", info.flags);
	say("num_regions", info.num_regions);
	say("num_irqs", info.num_irqs);
	say("config_info", rc(ioctl(d, VFIO_DEVICE_GET_REGION_INFO, &reg)));
	say("config_offset_is_index_40", reg.offset == ((uint64_t)VFIO_PCI_CONFIG_REGION_INDEX << 40));
	say("config_size", reg.size);

	/* memory + bus master on, then the edu liveness register through BAR0 */
	uint16_t cmd = 0;
	pread(d, &cmd, 2, CFG(4));
	cmd |= 0x6;
	pwrite(d, &cmd, 2, CFG(4));
	wr32(d, BAR0(4), 0x12345678);
	say("liveness", rd32(d, BAR0(4)));

	/* DMA through the emulated IOMMU into this process's memory */
	long page = sysconf(_SC_PAGESIZE);
	char *buf = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	struct vfio_iommu_type1_dma_map map = { .argsz = sizeof map, .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
						.vaddr = (uintptr_t)buf, .iova = 0x100000, .size = page };
	strcpy(buf, "hello through the iommu");
	say("map_dma", rc(ioctl(c, VFIO_IOMMU_MAP_DMA, &map)));
	wr64(d, BAR0(0x80), 0x100000);  /* src: RAM */
	wr64(d, BAR0(0x88), 0x40000);   /* dst: the device buffer */
	wr64(d, BAR0(0x90), 32);
	wr64(d, BAR0(0x98), 1);         /* RUN, RAM -> device */
	for (i = 0; i < 10000 && (rd64(d, BAR0(0x98)) & 1); i++)
		usleep(1000);
	wr64(d, BAR0(0x80), 0x40000);
	wr64(d, BAR0(0x88), 0x100000 + 2048);
	wr64(d, BAR0(0x90), 32);
	wr64(d, BAR0(0x98), 1 | 2);     /* RUN, device -> RAM */
	for (i = 0; i < 10000 && (rd64(d, BAR0(0x98)) & 1); i++)
		usleep(1000);
	say("dma_roundtrip", strcmp(buf + 2048, "hello through the iommu") == 0);

	/* INTx: a trigger eventfd the server signals, an unmask eventfd it watches */
	int trig = eventfd(0, EFD_CLOEXEC), unmask = eventfd(0, EFD_CLOEXEC);
	say("intx_trigger", rc(set_irq_eventfd(d, VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, trig)));
	say("intx_unmask", rc(set_irq_eventfd(d, VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_UNMASK, unmask)));
	say("not_an_eventfd", rc(set_irq_eventfd(d, VFIO_PCI_ERR_IRQ_INDEX + 1, VFIO_IRQ_SET_ACTION_TRIGGER, g)));
	wr32(d, BAR0(0x60), 1);         /* raise */
	say("irq1", wait_efd(trig, 10000));
	wr32(d, BAR0(0x64), 1);         /* ack: the line drops, INTx stays masked */
	wr32(d, BAR0(0x60), 1);         /* raise again: masked, nothing yet */
	uint64_t one = 1;
	write(unmask, &one, 8);         /* unmask: still pending, so it fires again */
	say("irq2", wait_efd(trig, 10000));

	if (hold) {
		say("ready", 1);
		wait_stdin();
	}
	return 0;
}

static int cmd_hold_group(void)
{
	int g = open_group();

	say("open", rc(g));
	wait_stdin();
	return 0;
}

static int cmd_devname(void)
{
	long page = sysconf(_SC_PAGESIZE);
	int c, g;
	char *m = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char *edge = m + page - sizeof(DEVICE);

	if (setup(&c, &g))
		return 1;
	memcpy(edge, DEVICE, sizeof(DEVICE));  /* the NUL is the page's last byte */
	mprotect(m + page, page, PROT_NONE);
	int d = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, edge);
	say("at_page_end", d >= 0);
	memset(m + page - 8, 'x', 8);          /* no NUL before the unmapped page */
	say("unterminated", rc(ioctl(g, VFIO_GROUP_GET_DEVICE_FD, m + page - 8)));
	say("badptr", rc(ioctl(g, VFIO_GROUP_GET_DEVICE_FD, (void *)8)));
	return 0;
}

static int cmd_eio(void)
{
	int c, g, d;

	if (setup(&c, &g))
		return 1;
	d = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, DEVICE);
	say("device", rc(d));
	uint32_t v;
	say("broken_read", pread(d, &v, 4, CFG(0x10)) < 0 ? -errno : 0);
	say("id_after", rd32(d, CFG(0)));
	say("api_after", rc(ioctl(c, VFIO_GET_API_VERSION)));
	return 0;
}

static int cmd_api_loop(long n)
{
	int c = open(path("vfio"), O_RDWR);
	struct timespec a, b;
	long i;

	clock_gettime(CLOCK_MONOTONIC, &a);
	for (i = 0; i < n; i++)
		if (ioctl(c, VFIO_GET_API_VERSION) != 0)
			return 1;
	clock_gettime(CLOCK_MONOTONIC, &b);
	say("ns_per_op", ((b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec)) / n);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 4)
		return 2;
	dir = argv[1];
	group_id = atoi(argv[2]);
	if (!strcmp(argv[3], "container")) return cmd_container();
	if (!strcmp(argv[3], "status")) return cmd_status();
	if (!strcmp(argv[3], "set-container")) return cmd_set_container();
	if (!strcmp(argv[3], "device-fd")) return cmd_device_fd();
	if (!strcmp(argv[3], "flow")) return cmd_flow(0);
	if (!strcmp(argv[3], "flow-hold")) return cmd_flow(1);
	if (!strcmp(argv[3], "hold-group")) return cmd_hold_group();
	if (!strcmp(argv[3], "devname")) return cmd_devname();
	if (!strcmp(argv[3], "close-unset")) return cmd_close_unset();
	if (!strcmp(argv[3], "eio")) return cmd_eio();
	if (!strcmp(argv[3], "api-loop")) return cmd_api_loop(argc > 4 ? atol(argv[4]) : 20000);
	return 2;
}

"""


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    d = tmp_path_factory.mktemp("client")
    src = d / "client.c"
    src.write_text(CLIENT_C)
    exe = d / "vfio-client"
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-o", str(exe), str(src)], check=True)
    return str(exe)



@pytest.fixture
def machine():
    records = []
    m = Machine(load(None), trace=records.append)
    m.trace_records = records
    yield m
    m.close()


def new_server(machine, tmp_path, groups):
    # CUSE nodes can only appear under /dev (devtmpfs).
    dev_dir = "/dev/cuse-vfio-test" if TRANSPORT == "cuse" else str(tmp_path / "vfio")
    return Server(machine.dispatcher, groups, transport=TRANSPORT, dev_dir=dev_dir,
                  runtime_dir=str(tmp_path / "run"))


@pytest.fixture
def server(machine, tmp_path):
    s = new_server(machine, tmp_path, machine.topology.groups.values())
    with serving(s):
        yield s



def run(client, server, command, env=True, extra=(), **popen):
    proc = subprocess.run([client, server.dev_dir, "2", command, *extra], capture_output=True, text=True,
                          env=server.client_env(os.environ) if env else dict(os.environ),
                          timeout=CLIENT_TIMEOUT, **popen)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return parse_values(proc.stdout)


class Held:
    """A client that keeps its fds until its stdin closes (or it is killed)."""

    def __init__(self, client, server, command, env=True):
        self.proc = subprocess.Popen([client, server.dev_dir, "2", command], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True,
                                     env=server.client_env(os.environ) if env else dict(os.environ))
        self.values = {}

    def read_until(self, key):
        for line in self.proc.stdout:
            name, _, value = line.strip().partition("=")
            self.values[name] = int(value)
            if name == key:
                return self.values
        raise AssertionError(f"client ended before {key}: {self.values}")

    def finish(self):
        self.proc.stdin.close()
        assert self.proc.wait(timeout=CLIENT_TIMEOUT) == 0


def device_opens(machine):
    return sum(d.open_count for g in machine.vfio.groups() for d in g.devices)


def test_nodes_have_the_topology_modes(server):
    assert sorted(os.listdir(server.dev_dir)) == ["2", "vfio"]
    assert os.stat(server.container_path).st_mode & 0o777 == 0o666
    assert os.stat(server.group_path(2)).st_mode & 0o777 == 0o600
    # Every user reaches the hand-off socket by its name; nobody lists or changes the directory.
    assert os.stat(server.runtime_dir).st_mode & 0o777 == 0o711
    assert os.stat(server.socket_path).st_mode & 0o777 == 0o666
    assert os.stat(server.device_mount).st_mode & 0o777 == 0o700


def test_container_ioctls(client, server):
    v = run(client, server, "container")
    assert v["open"] >= 0
    assert v["api"] == 0
    assert v["type1"] == 1 and v["type1v2"] == 1
    assert v["bogus_ext"] == 0
    assert v["set_iommu_without_group"] == -errno.EINVAL
    assert v["unknown_ioctl"] == -errno.EINVAL  # no IOMMU driver to pass it to yet


def test_group_status_argument_rules(client, server):
    v = run(client, server, "status")
    assert v["status"] == 0 and v["flags"] == 1  # VIABLE
    assert v["argsz4"] == -errno.EINVAL and v["argsz4_flags_untouched"] == 1
    assert v["badptr"] == -errno.EFAULT
    assert v["straddle"] == -errno.EFAULT
    assert v["readonly"] == -errno.EFAULT


def test_set_container_takes_only_a_container_fd(client, server):
    v = run(client, server, "set-container")
    assert v["minus_one"] == -errno.EBADF
    assert v["not_open"] == -errno.EBADF
    assert v["dev_null"] == -errno.EINVAL
    assert v["group_fd"] == -errno.EINVAL
    assert v["badptr"] == -errno.EFAULT
    assert v["container"] == 0 and v["flags_set"] == 3  # VIABLE | CONTAINER_SET
    assert v["again"] == -errno.EINVAL
    assert v["set_iommu"] == 0
    assert v["unset"] == 0 and v["flags_unset"] == 1


def test_full_flow_with_a_real_device_fd(client, server, machine):
    v = run(client, server, "flow")
    assert v["device"] >= 3 and v["cloexec"] == 1
    assert v["id"] == EDU_ID
    assert v["info"] == 0 and v["info_flags"] == 0x2  # VFIO_DEVICE_FLAGS_PCI; edu on a root bus has no reset
    assert v["num_regions"] == 9 and v["num_irqs"] == 5
    assert v["config_info"] == 0 and v["config_offset_is_index_40"] == 1 and v["config_size"] == 256
    assert v["liveness"] == ~0x12345678 & 0xFFFFFFFF
    assert v["map_dma"] == 0 and v["dma_roundtrip"] == 1
    assert v["intx_trigger"] == 0 and v["intx_unmask"] == 0
    assert v["not_an_eventfd"] == -errno.EINVAL
    assert v["irq1"] == 1 and v["irq2"] == 1


def test_unset_container_right_after_closing_the_device_fd(client, server):
    """The device file's release is queued when close() returns; the group's next ioctl serves it first."""
    assert run(client, server, "close-unset")["unset_busy"] == 0


def test_device_name_at_the_end_of_a_page(client, server):
    v = run(client, server, "devname")
    assert v["at_page_end"] == 1
    assert v["unterminated"] == -errno.EFAULT
    assert v["badptr"] == -errno.EFAULT


def test_two_processes_race_for_one_group(client, server):
    a = Held(client, server, "hold-group")
    b = Held(client, server, "hold-group")
    try:
        results = sorted([a.read_until("open")["open"], b.read_until("open")["open"]])
    finally:
        a.finish()
        b.finish()
    assert results[0] == -errno.EBUSY and results[1] >= 3


def test_killed_client_leaves_nothing_behind(client, server, machine):
    held = Held(client, server, "flow-hold")
    values = held.read_until("ready")
    assert values["device"] >= 3 and values["irq2"] == 1
    held.proc.send_signal(signal.SIGKILL)
    held.proc.wait(timeout=CLIENT_TIMEOUT)
    # At once: the group opens again; its open is served after the dead
    # process's releases (device file included), as after a kernel exit.
    fd = os.open(server.group_path(2), os.O_RDWR)
    try:
        assert device_opens(machine) == 0
        assert machine.vfio.group(2).container is None
    finally:
        os.close(fd)
    v = run(client, server, "flow")
    assert v["device"] >= 3 and v["id"] == EDU_ID and v["irq1"] == 1


def test_client_without_the_preload_library_gets_an_errno(client, server, machine, caplog):
    caplog.set_level(logging.WARNING, logger="cuse_vfio.transport.server")
    v = run(client, server, "device-fd", env=False)
    assert v["device"] == -errno.EOPNOTSUPP
    assert v["unknown_device"] == -errno.ENODEV
    sentences = [r.getMessage() for r in caplog.records if "hand-off library" in r.getMessage()]
    assert sentences and "LD_PRELOAD=" + server.preload_library in sentences[0]
    assert "cuse-vfio run" in sentences[0]
    # The device file the core opened for it was released at once.
    assert device_opens(machine) == 0
    assert server._handoff.pending() == 0


def test_preloaded_client_that_cannot_reach_the_socket_is_told_so(client, server, machine, caplog, tmp_path):
    caplog.set_level(logging.WARNING, logger="cuse_vfio.transport.server")
    env = server.client_env(os.environ)
    env["CUSE_VFIO_SOCKET"] = str(tmp_path / "no-such.sock")
    proc = subprocess.run([client, server.dev_dir, "2", "device-fd"], capture_output=True, text=True, env=env,
                          timeout=CLIENT_TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert parse_values(proc.stdout)["device"] == -errno.EOPNOTSUPP
    sentences = [r.getMessage() for r in caplog.records if "never reached the hand-off socket" in r.getMessage()]
    assert sentences and server.socket_path in sentences[0]
    assert device_opens(machine) == 0


def test_exception_inside_the_server_is_eio_and_serving_goes_on(client, server, monkeypatch):
    original = handles.region_ops

    def broken_ops(file_object):
        # the read op an open binds: one offset of it fails with a bug of the server
        read, write = original(file_object)

        def broken(size, offset):
            if offset == (7 << 40) + 0x10:
                raise RuntimeError("a bug in the server")
            return read(size, offset)
        return broken, write

    monkeypatch.setattr(handles, "region_ops", broken_ops)
    v = run(client, server, "eio")
    assert v["device"] >= 3
    assert v["broken_read"] == -errno.EIO
    assert v["id_after"] == EDU_ID and v["api_after"] == 0


def test_trace_records_come_from_the_dispatcher(client, server, machine):
    run(client, server, "status")
    names = [r["ioctl"] for r in machine.trace_records if "ioctl" in r]
    assert "VFIO_GROUP_GET_STATUS" in names
    status = next(r for r in machine.trace_records if r.get("ioctl") == "VFIO_GROUP_GET_STATUS")
    assert status["pid"] > 0 and status["node"] == "2"


def test_stop_releases_what_clients_still_hold(client, machine, tmp_path):
    s = new_server(machine, tmp_path, [2])
    s.start()
    held = Held(client, s, "flow-hold")
    try:
        held.read_until("ready")
        assert device_opens(machine) == 1
        s.stop()
        assert device_opens(machine) == 0
        assert not os.path.ismount(s.dev_dir) and not os.path.ismount(s.device_mount)
        assert not os.path.exists(s.container_path) and not os.path.exists(s.group_path(2))
        assert machine.vfio.group(2).container is None and not machine.vfio.group(2).opened
    finally:
        held.proc.kill()
        held.proc.wait()
        s.stop()
        unmount(s.dev_dir)
        unmount(s.device_mount)


def test_an_unredeemed_device_fd_is_released(machine, tmp_path, caplog):
    """A token nobody fetches: its device file is closed, the core sees the device fd released."""
    caplog.set_level(logging.WARNING)
    s = new_server(machine, tmp_path, [2])
    s.handoff_ttl = 0.05
    s.start()
    try:
        # This process plays a client with the library: connected, greeted, then the raw ioctl.
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(CLIENT_TIMEOUT)
        conn.connect(s.socket_path)
        assert conn.recv(1) == b"R"
        c = os.open(s.container_path, os.O_RDWR)
        g = os.open(s.group_path(2), os.O_RDWR)
        fcntl.ioctl(g, 0x3B68, struct.pack("<i", c))      # VFIO_GROUP_SET_CONTAINER
        fcntl.ioctl(c, 0x3B66, 3)                         # VFIO_SET_IOMMU, TYPE1v2
        # A token comes back only once the core opened the device; the offer may
        # expire at any moment from here on, so the open itself is not sampled.
        token = fcntl.ioctl(g, 0x3B6A, bytearray(b"0000:00:02.0\0"))  # VFIO_GROUP_GET_DEVICE_FD
        assert token >= 1 << 30
        deadline = time.monotonic() + CLIENT_TIMEOUT
        while device_opens(machine) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert device_opens(machine) == 0
        assert any("did not fetch it within 0.05 s" in r.getMessage() for r in caplog.records)
        conn.close()
        os.close(g)
        os.close(c)
    finally:
        s.stop()
        unmount(s.dev_dir)
        unmount(s.device_mount)


@pytest.fixture
def shared_dir():
    """A directory every user can reach (pytest's own are 0700): the client, the nodes, the runtime dir."""
    d = tempfile.mkdtemp(prefix="cuse-vfio-clients.")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_an_unprivileged_owner_of_the_group_gets_its_device_fd(client, machine, shared_dir):
    exe = os.path.join(shared_dir, "vfio-client")
    shutil.copy(client, exe)
    os.chmod(exe, 0o755)
    dev_dir = "/dev/cuse-vfio-test" if TRANSPORT == "cuse" else os.path.join(shared_dir, "vfio")
    s = Server(machine.dispatcher, [GroupNode(2, uid=NOBODY, gid=NOBODY, mode=0o600)], transport=TRANSPORT,
               dev_dir=dev_dir, runtime_dir=os.path.join(shared_dir, "run"))
    try:
        s.start()
        st = os.stat(s.group_path(2))
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o600)
        v = run(exe, s, "device-fd", user=NOBODY, group=NOBODY, extra_groups=[])
        assert v["device"] >= 3 and v["cloexec"] == 1
        assert v["id"] == EDU_ID
        assert v["unknown_device"] == -errno.ENODEV
        # Another unprivileged user reaches the node but may not open it.
        v = run(exe, s, "status", user=SOMEBODY_ELSE, group=SOMEBODY_ELSE, extra_groups=[])
        assert v["open"] == -errno.EACCES
    finally:
        mounts = (s.dev_dir, s.device_mount if s.runtime_dir else None)
        s.stop()
        for path in mounts:
            unmount(path)


def _mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def test_stop_is_bounded_and_leaves_nothing_mounted(machine, tmp_path):
    # A deferred request that never ends and a loop that does not stop: stop()
    # gives up on both after its bound, and detaches the mounts first.
    s = new_server(machine, tmp_path, machine.topology.groups.values())
    s.STOP_TIMEOUT = 0.5
    s.start()
    mounts = [x.where for x in s._sessions if x.kind == "fuse"]
    assert mounts and all(_mounted(m) for m in mounts)
    stuck = threading.Event()
    s._workers.submit(stuck.wait)
    loop, real_stop = s._loop, s._loop.stop
    loop.stop = lambda: None
    stopped = threading.Event()
    threading.Thread(target=lambda: (s.stop(), stopped.set()), daemon=True).start()
    try:
        assert stopped.wait(8), "stop() did not return"
        assert not any(_mounted(m) for m in mounts)
    finally:
        stuck.set()
        real_stop()
        s._loop_thread.join(10)
        stopped.wait(10)
        for session in s._sessions:
            session.free()
        loop.free()
        if s.eventfd_poller is not None:
            s.eventfd_poller.stop()
        for path in mounts:
            unmount(path)
