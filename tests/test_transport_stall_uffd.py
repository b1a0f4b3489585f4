"""A client whose memory stalls without a FUSE file costs the serving loop only the short check.

The client below puts its ioctl arguments in pages it watches with
userfaultfd: a fault there (the server's process_vm_readv/writev included)
waits until the client's handler thread says so, and the test tells it when.
While its argument's copy is stalled the server goes on serving everyone else
(another client's whole edu flow); the stalled request is finished by the
stall pool once the fault ends, and nothing of it is left behind.  Its stalled
copies count per process, however many threads it has.  A write-back that
stalls after the handler acted (UNMAP_DMA's size) leaves the action done and
the caller gets EFAULT, as a failing copy_to_user gives.

No assertion here measures time: STALL_LIMIT is made long so that the order
of events alone decides what each step sees.
"""

import errno
import os
import queue
import subprocess
import threading
import time

import pytest
from serving_support import CLIENT_TIMEOUT, TRANSPORT, parse_values, serving
from test_transport_clients import CLIENT_C
from test_transport_stall import TOPOLOGY, build

from cuse_vfio.machine import Machine
from cuse_vfio.machine.topology import parse
from cuse_vfio.memory import process
from cuse_vfio.memory._copier import lib as copier
from cuse_vfio.transport.server import Server

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"),
    # CUSE ioctls are unrestricted: the kernel copies the argument in the client's own thread
    pytest.mark.skipif(TRANSPORT != "fuse", reason="FUSE ioctls only: the server copies the argument"),
]

UFFD_CLIENT_C = r"""
/* Group 3's owner, whose ioctl arguments lie in pages it watches with userfaultfd.
 * MODE status: GROUP_GET_STATUS with the argument in a missing page;
 * MODE threads N: N threads doing that, each with its own page;
 * MODE map: MAP_DMA with the argument in a missing page (read under the model's lock);
 * MODE unmap: UNMAP_DMA with its argument in a write-protected page, then MAP_DMA again.
 * A handler thread says "fault=1" for each fault and, on a line of stdin, ends them all:
 * "release" (the page's bytes appear / writes are allowed) or "fail" (the page is unmapped, as
 * when stdin closes). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <linux/vfio.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_PAGES 16
static int uffd, npages, wp, g, c;
static long psize;
static char *pages[MAX_PAGES];
static char release_src[65536] __attribute__((aligned(65536)));   /* what a missing page holds once released */

static void say(const char *k, long v) { printf("%s=%ld\n", k, v); fflush(stdout); }
static long rc(long r) { return r < 0 ? -errno : r; }

static char *stalling_page(const void *content, size_t len)
{
	char *p = mmap(NULL, psize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	int mode = wp ? UFFDIO_REGISTER_MODE_WP : UFFDIO_REGISTER_MODE_MISSING;
	struct uffdio_register reg = { .range = { (uintptr_t)p, psize }, .mode = mode };

	if (p == MAP_FAILED) { say("mmap", -errno); exit(1); }
	if (wp)
		memcpy(p, content, len);
	else
		memcpy(release_src, content, len);
	if (ioctl(uffd, UFFDIO_REGISTER, &reg)) { say("register", -errno); exit(1); }
	if (wp) {
		struct uffdio_writeprotect w = { .range = reg.range, .mode = UFFDIO_WRITEPROTECT_MODE_WP };
		if (ioctl(uffd, UFFDIO_WRITEPROTECT, &w)) { say("writeprotect", -errno); exit(1); }
	}
	pages[npages++] = p;
	return p;
}

static void end_faults(int fail)
{
	for (int i = 0; i < npages; i++) {
		struct uffdio_range r = { (uintptr_t)pages[i], psize };
		if (fail) {
			munmap(pages[i], psize);   /* the fault, woken, finds nothing mapped: EFAULT */
			ioctl(uffd, UFFDIO_WAKE, &r);
		} else if (wp) {
			struct uffdio_writeprotect w = { .range = r, .mode = 0 };
			ioctl(uffd, UFFDIO_WRITEPROTECT, &w);
		} else {
			struct uffdio_copy cp = { .dst = r.start, .src = (uintptr_t)release_src, .len = psize };
			ioctl(uffd, UFFDIO_COPY, &cp);
		}
	}
}

static void *handler(void *arg)
{
	struct pollfd fds[2] = { { .fd = uffd, .events = POLLIN }, { .fd = 0, .events = POLLIN } };
	char line[64];

	for (;;) {
		if (poll(fds, 2, -1) < 0)
			continue;
		if (fds[0].revents & POLLIN) {
			struct uffd_msg m;
			while (read(uffd, &m, sizeof m) == sizeof m)
				if (m.event == UFFD_EVENT_PAGEFAULT)
					say("fault", 1);
		}
		if (fds[1].revents & (POLLIN | POLLHUP)) {
			ssize_t n = read(0, line, sizeof line - 1);
			if (n <= 0) {   /* stdin closed: whatever still waits fails, and nothing more will */
				end_faults(1);
				return NULL;
			}
			line[n] = 0;
			end_faults(!strncmp(line, "fail", 4));
		}
	}
}

static void *get_status(void *page)
{
	long r = rc(ioctl(g, VFIO_GROUP_GET_STATUS, page));

	say("status", r);
	if (r == 0 && npages == 1)
		say("flags", ((struct vfio_group_status *)page)->flags);
	return NULL;
}

int main(int argc, char **argv)
{
	char path[4096];
	const char *mode = argv[2];
	pthread_t h, t[MAX_PAGES];
	struct vfio_group_status st = { .argsz = sizeof st };
	char *buf;
	struct vfio_iommu_type1_dma_map map = { .argsz = sizeof map, .iova = 0x100000,
						.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE };
	struct vfio_iommu_type1_dma_unmap unmap = { .argsz = sizeof unmap, .iova = 0x100000 };

	psize = sysconf(_SC_PAGESIZE);
	buf = mmap(NULL, psize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	map.vaddr = (uintptr_t)buf;
	map.size = unmap.size = psize;
	wp = !strcmp(mode, "unmap");
	uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);   /* poll() wants it non-blocking */
	struct uffdio_api api = { .api = UFFD_API, .features = wp ? UFFD_FEATURE_PAGEFAULT_FLAG_WP : 0 };
	if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api)) { say("userfaultfd", -errno); return 1; }
	snprintf(path, sizeof path, "%s/vfio", argv[1]);
	c = open(path, O_RDWR);
	snprintf(path, sizeof path, "%s/3", argv[1]);
	g = open(path, O_RDWR);
	if (c < 0 || g < 0 || ioctl(g, VFIO_GROUP_SET_CONTAINER, &c) || ioctl(c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)) {
		say("setup", -errno);
		return 1;
	}
	pthread_create(&h, NULL, handler, NULL);
	if (!strcmp(mode, "status")) {
		get_status(stalling_page(&st, sizeof st));
	} else if (!strcmp(mode, "threads")) {
		int n = atoi(argv[3]);
		for (int i = 0; i < n; i++)
			pthread_create(&t[i], NULL, get_status, stalling_page(&st, sizeof st));
		for (int i = 0; i < n; i++)
			pthread_join(t[i], NULL);
	} else if (!strcmp(mode, "map")) {
		say("map", rc(ioctl(c, VFIO_IOMMU_MAP_DMA, stalling_page(&map, sizeof map))));
	} else {
		say("map", rc(ioctl(c, VFIO_IOMMU_MAP_DMA, &map)));
		say("unmap", rc(ioctl(c, VFIO_IOMMU_UNMAP_DMA, stalling_page(&unmap, sizeof unmap))));
		say("remap", rc(ioctl(c, VFIO_IOMMU_MAP_DMA, &map)));
	}
	say("done", 1);
	pthread_join(h, NULL);
	return 0;
}
"""


class Lines:
    """A client's name=value lines as they come, read by a thread: waiting for one is an event, not a clock."""

    def __init__(self, proc):
        self.proc = proc
        self._lines: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for line in self.proc.stdout:
            name, _, value = line.strip().partition("=")
            self._lines.put((name, int(value)))
        self._lines.put(None)

    def next(self):
        item = self._lines.get(timeout=CLIENT_TIMEOUT)
        assert item is not None, "the client ended"
        return item

    def until(self, want):
        """Lines up to the one named ``want``: {name: [values]}."""
        seen = {}
        while True:
            name, value = self.next()
            seen.setdefault(name, []).append(value)
            if name == want:
                return seen

    def none_yet(self):
        return self._lines.empty()


def eventually(condition, what):
    """Wait (bounded, never measured) until ``condition()`` holds."""
    deadline = time.monotonic() + CLIENT_TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _loop_threads():
    return sum(1 for t in threading.enumerate() if t.name == "cuse-vfio-loop" and t.is_alive())


@pytest.fixture
def stall_setup(tmp_path, monkeypatch):
    # A stalled copy is waited for until the test ends the fault, never until a clock runs out.
    monkeypatch.setattr(process, "STALL_LIMIT", 3600.0)
    machine = Machine(parse(TOPOLOGY, "<uffd stall test topology>"))
    server = Server(machine.dispatcher, machine.topology.groups.values(), transport="fuse",
                    dev_dir=str(tmp_path / "vfio"), runtime_dir=str(tmp_path / "run"))
    clients = {"uffd": build(tmp_path, "uffd-client", UFFD_CLIENT_C), "flow": build(tmp_path, "vfio-client", CLIENT_C)}
    procs = []

    def start(*args):
        proc = subprocess.Popen([clients["uffd"], server.dev_dir, *args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=server.client_env(os.environ))
        procs.append(proc)
        return proc, Lines(proc)

    def flow(group="2", what="flow"):
        proc = subprocess.Popen([clients["flow"], server.dev_dir, group, what], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=server.client_env(os.environ))
        try:
            out, err = proc.communicate(timeout=CLIENT_TIMEOUT)
        except subprocess.TimeoutExpired:
            # Not served: whatever it waits for waits behind a stall, so end the stalls first
            # (a request the server has taken is answered before its client can go).
            for stalling in procs:
                stalling.stdin.close()
            proc.kill()
            proc.communicate()
            raise AssertionError(f"{what} on group {group} was not served while a client stalled") from None
        assert proc.returncode == 0, out + err
        return parse_values(out)

    try:
        with serving(server):
            yield server, start, flow
            for proc in procs:
                if not proc.stdin.closed:
                    proc.stdin.close()
                assert proc.wait(timeout=CLIENT_TIMEOUT) == 0
            print("nothing is left: no stalled copy, every copier idle, one thread serving the loop, "
                  "no handle held, group 3 opens again")
            eventually(lambda: copier.cv_copy_stalled(-1) == 0 and copier.cv_copy_busy() == 0, "copiers left busy")
            eventually(lambda: _loop_threads() == 1, "a loop thread that stalled did not leave the loop")
            eventually(lambda: len(server.handles) == 0, "handles left open")
            assert flow("3", "status")["status"] == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        machine.close()


@pytest.mark.parametrize("ioctl, mode, answer", [
    ("GROUP_GET_STATUS", "status", {"status": [0], "flags": [0x3]}),  # VIABLE | CONTAINER_SET
    ("MAP_DMA (whose handler reads under the model's lock)", "map", {"map": [0]}),
])
def test_a_stalled_argument_read_waits_off_the_loop_while_others_are_served(stall_setup, ioctl, mode, answer):
    server, start, flow = stall_setup
    print(f"client A: {ioctl} with its argument in a page whose fault A holds")
    a, lines = start(mode)
    assert lines.next() == ("fault", 1)  # the server's copy of A's argument waits in A's fault now
    eventually(lambda: copier.cv_copy_stalled(a.pid) == 1, "the copy is not counted as stalled")

    print("client B's whole edu flow is served meanwhile; A's ioctl is still unanswered after it")
    values = flow()
    assert values["map_dma"] == 0 and values["dma_roundtrip"] == 1
    assert values["irq1"] == 1 and values["irq2"] == 1
    assert lines.none_yet()

    print("A's fault ends: the copy already running completes the request (no second copy faults)")
    a.stdin.write("release\n")
    a.stdin.flush()
    assert lines.until("done") == {**answer, "done": [1]}


def test_stalled_copies_count_per_process_not_per_thread(stall_setup):
    server, start, flow = stall_setup
    cap = copier.CV_COPY_MAX_STALLED
    threads = cap + 2
    print(f"client A: {threads} threads, each GROUP_GET_STATUS with its argument in a page whose fault A holds")
    a, lines = start("threads", str(threads))
    seen = {}
    while len(seen.get("fault", [])) < cap or len(seen.get("status", [])) < threads - cap:
        name, value = lines.next()
        seen.setdefault(name, []).append(value)
    print(f"the first {cap} stall; the process has no more: the others fail at once, before any copy")
    assert seen == {"fault": [1] * cap, "status": [-errno.EFAULT] * (threads - cap)}
    assert copier.cv_copy_stalled(a.pid) == cap
    assert flow("2", "container")["api"] == 0  # and the loop serves others

    a.stdin.write("release\n")
    a.stdin.flush()
    seen = lines.until("done")
    assert seen == {"status": [0] * cap, "done": [1]}


def test_a_stalled_write_back_leaves_the_action_done_and_fails_with_efault(stall_setup):
    server, start, flow = stall_setup
    print("client A: UNMAP_DMA with its argument in a write-protected page: the read passes, the write-back stalls")
    a, lines = start("unmap")
    assert lines.until("fault") == {"map": [0], "fault": [1]}
    print("the loop serves others while the write-back waits")
    assert flow("2", "container")["api"] == 0
    assert lines.none_yet()

    print("A's page goes away: the write-back fails, UNMAP_DMA gives EFAULT, and the unmap stands")
    a.stdin.write("fail\n")
    a.stdin.flush()
    assert lines.until("done") == {"unmap": [-errno.EFAULT], "remap": [0], "done": [1]}
