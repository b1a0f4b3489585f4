"""End to end: C clients under ``cuse-vfio run`` (and ``serve``), through real syscalls, on FUSE.

Each test starts the command line as a user would (``python -m cuse_vfio run
--transport fuse -- CMD``; ``CUSE_VFIO_TEST_TRANSPORT=cuse`` for CUSE), so the server, the sysfs view, the private mount
namespace, the hand-off library and the teardown are all the real ones.  The
clients are written only against <linux/vfio.h> and open the nodes where a
client expects them, /dev/vfio/vfio and /dev/vfio/2; each prints one
``name=value`` line per observation (a negative value is -errno).
Multi-process cases (two clients racing, a client killed mid-session) fork
inside one client and hand results over pipes, so nothing here waits on a
clock.  Needs root and /dev/fuse; every test checks that no mount and no
directory is left behind.
"""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

#: fuse here; CUSE_VFIO_TEST_TRANSPORT=cuse runs the same tests on CUSE (inside scripts/vm)
TRANSPORT = os.environ.get("CUSE_VFIO_TEST_TRANSPORT", "fuse")

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse")
                                or (TRANSPORT == "cuse" and not os.path.exists("/dev/cuse")),
                                reason=f"needs root, /dev/fuse (and /dev/cuse for {TRANSPORT})")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDU = "0000:00:02.0"
TIMEOUT = 120  # a bound for a hung run, never a measurement

CLIENT_C = r"""
/* A VFIO client for the end-to-end tests: only <linux/vfio.h>, one name=value per line. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vfio.h>

#define DEVICE "0000:00:02.0"
#define CFG(off) (((off_t)VFIO_PCI_CONFIG_REGION_INDEX << 40) + (off))
#define BAR0(off) (((off_t)VFIO_PCI_BAR0_REGION_INDEX << 40) + (off))

static char dir[2048] = "/dev/vfio";
static long page;

static const char *node(const char *name)
{
	static char path[4096];
	snprintf(path, sizeof path, "%s/%s", dir, name);
	return path;
}
static int rc(long r) { return r < 0 ? -errno : (int)r; }
static void say(const char *k, long v) { printf("%s=%ld\n", k, v); fflush(stdout); }

static int setup(int *cp, int *gp)
{
	int c = open(node("vfio"), O_RDWR), g = open(node("2"), O_RDWR);

	if (c < 0 || g < 0 || ioctl(g, VFIO_GROUP_SET_CONTAINER, &c) || ioctl(c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)) {
		say("setup", -errno);
		return -1;
	}
	*cp = c;
	*gp = g;
	return 0;
}

static int map(int c, void *vaddr, uint64_t iova, uint64_t size, uint32_t flags)
{
	struct vfio_iommu_type1_dma_map m = { .argsz = sizeof m, .flags = flags,
					      .vaddr = (uintptr_t)vaddr, .iova = iova, .size = size };
	return rc(ioctl(c, VFIO_IOMMU_MAP_DMA, &m));
}

static void wr64(int d, off_t off, uint64_t v) { if (pwrite(d, &v, 8, off) != 8) say("pwrite_failed", -errno); }
static uint64_t rd64(int d, off_t off) { uint64_t v = 0; if (pread(d, &v, 8, off) != 8) say("pread_failed", -errno); return v; }

/* edu DMA; returns once the device has finished (the run bit drops). */
static int edu_dma(int d, uint64_t src, uint64_t dst, uint64_t count, uint64_t cmd)
{
	wr64(d, BAR0(0x80), src);
	wr64(d, BAR0(0x88), dst);
	wr64(d, BAR0(0x90), count);
	wr64(d, BAR0(0x98), cmd);
	for (int i = 0; i < 100000; i++) {
		if (!(rd64(d, BAR0(0x98)) & 1))
			return 0;
		usleep(100);
	}
	return -1;
}

static void bus_master(int d)
{
	uint16_t cmd = 0;
	pread(d, &cmd, 2, CFG(4));
	cmd |= 0x6;
	pwrite(d, &cmd, 2, CFG(4));
}

/* Every errno rule of the core a client can reach. */
static int cmd_errnos(void)
{
	int c = open(node("vfio"), O_RDWR), c2 = open(node("vfio"), O_RDWR), g = open(node("2"), O_RDWR);
	int null = open("/dev/null", O_RDWR), minus_one = -1;
	struct vfio_group_status st = { .argsz = 4 };
	char *buf = mmap(NULL, 4 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	say("open_container", c >= 0);
	say("open_group", g >= 0);
	say("status_argsz_4", rc(ioctl(g, VFIO_GROUP_GET_STATUS, &st)));
	say("status_bad_pointer", rc(ioctl(g, VFIO_GROUP_GET_STATUS, (void *)8)));
	say("set_container_minus_one", rc(ioctl(g, VFIO_GROUP_SET_CONTAINER, &minus_one)));
	say("set_container_dev_null", rc(ioctl(g, VFIO_GROUP_SET_CONTAINER, &null)));
	say("unset_without_container", rc(ioctl(g, VFIO_GROUP_UNSET_CONTAINER)));
	say("set_iommu_without_group", rc(ioctl(c2, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)));
	say("device_fd_without_container", rc(ioctl(g, VFIO_GROUP_GET_DEVICE_FD, DEVICE)));
	say("set_container", rc(ioctl(g, VFIO_GROUP_SET_CONTAINER, &c)));
	say("set_container_twice", rc(ioctl(g, VFIO_GROUP_SET_CONTAINER, &c)));
	say("device_fd_before_set_iommu", rc(ioctl(g, VFIO_GROUP_GET_DEVICE_FD, DEVICE)));
	say("set_iommu", rc(ioctl(c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)));
	say("device_fd_unknown_name", rc(ioctl(g, VFIO_GROUP_GET_DEVICE_FD, "0000:00:09.0")));
	int d = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, DEVICE);
	say("device_fd", d >= 0);
	say("device_fd_cloexec", d >= 0 && (fcntl(d, F_GETFD) & FD_CLOEXEC) != 0);
	say("unset_with_device_open", rc(ioctl(g, VFIO_GROUP_UNSET_CONTAINER)));
	say("map", map(c, buf, 0x100000, 2 * page, VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE));
	say("map_overlap", map(c, buf, 0x100000 + page, 2 * page, VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE));
	say("map_unaligned_iova", map(c, buf, 0x200800, page, VFIO_DMA_MAP_FLAG_READ));
	say("map_unaligned_size", map(c, buf, 0x300000, page + 8, VFIO_DMA_MAP_FLAG_READ));
	say("map_unaligned_vaddr", map(c, buf + 8, 0x400000, page, VFIO_DMA_MAP_FLAG_READ));
	close(d);
	say("unset_after_device_closed", rc(ioctl(g, VFIO_GROUP_UNSET_CONTAINER)));
	return 0;
}

/* Two processes open the group at once: one wins, the other gets EBUSY. */
static int cmd_race(void)
{
	int results[2], go[2], i;
	pid_t kids[2];

	if (pipe(results) || pipe(go))
		return 2;
	for (i = 0; i < 2; i++) {
		kids[i] = fork();
		if (kids[i] == 0) {
			int g = open(node("2"), O_RDWR), r = g < 0 ? -errno : 0;
			char c;
			close(go[1]);
			write(results[1], &r, sizeof r);
			read(go[0], &c, 1);   /* hold the group until the parent has both answers */
			_exit(0);
		}
	}
	int r[2];
	read(results[0], &r[0], sizeof r[0]);
	read(results[0], &r[1], sizeof r[1]);
	say("opened", (r[0] == 0) + (r[1] == 0));
	say("ebusy", (r[0] == -EBUSY) + (r[1] == -EBUSY));
	close(go[1]);
	for (i = 0; i < 2; i++)
		waitpid(kids[i], NULL, 0);
	return 0;
}

/* A client holding group, container, device fd and a DMA mapping is SIGKILLed. */
static int cmd_killed(void)
{
	int ready[2], c, g, d;
	pid_t kid;

	if (pipe(ready))
		return 2;
	kid = fork();
	if (kid == 0) {
		char *buf = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
		int ok = setup(&c, &g) == 0 && map(c, buf, 0x100000, page, VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE) == 0 &&
			 (d = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, DEVICE)) >= 0;
		write(ready[1], &ok, sizeof ok);
		for (;;)
			pause();
	}
	int ok = 0;
	read(ready[0], &ok, sizeof ok);
	say("child_ready", ok);
	kill(kid, SIGKILL);
	waitpid(kid, NULL, 0);
	/* At once: no sleep, no retry. */
	g = open(node("2"), O_RDWR);
	say("reopen", g >= 0 ? 0 : -errno);
	c = open(node("vfio"), O_RDWR);
	say("set_container", rc(ioctl(g, VFIO_GROUP_SET_CONTAINER, &c)));
	say("set_iommu", rc(ioctl(c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)));
	char *buf = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	say("map_same_iova", map(c, buf, 0x100000, page, VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE));
	d = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, DEVICE);
	say("device_fd", d >= 0 ? 0 : -errno);
	uint32_t id = 0;
	pread(d, &id, 4, CFG(0));
	say("id", id);
	return 0;
}

/* GET_DEVICE_FD, for a run without the hand-off library. */
static int cmd_device(void)
{
	int c, g;

	if (setup(&c, &g))
		return 1;
	say("device_fd", rc(ioctl(g, VFIO_GROUP_GET_DEVICE_FD, DEVICE)));
	say("api_after", rc(ioctl(c, VFIO_GET_API_VERSION)));
	return 0;
}

/* DMA the IOMMU must refuse: nothing moves, the fault log says why. */
static int cmd_faults(void)
{
	int c, g, d, i;
	unsigned char *rw = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	unsigned char *ro = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	unsigned char saved_rw[4096], saved_ro[4096];

	if (setup(&c, &g))
		return 1;
	for (i = 0; i < page; i++) {
		rw[i] = (unsigned char)(i * 13 + 5);
		ro[i] = (unsigned char)(i * 7 + 3);
	}
	say("map_rw", map(c, rw, 0x100000, page, VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE));
	say("map_ro", map(c, ro, 0x200000, page, VFIO_DMA_MAP_FLAG_READ));
	d = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, DEVICE);
	say("device_fd", d >= 0);
	bus_master(d);
	/* Fill the edu buffer with something else than RAM holds. */
	memset(rw, 0xEE, 64);
	say("load_buffer", edu_dma(d, 0x100000, 0x40000, 64, 1));
	for (i = 0; i < 64; i++)
		rw[i] = (unsigned char)(i * 13 + 5);
	memcpy(saved_rw, rw, page);
	memcpy(saved_ro, ro, page);
	/* device -> RAM: straddling the end of the mapping, wholly unmapped, into a read-only mapping */
	say("straddle", edu_dma(d, 0x40000, 0x100000 + page - 32, 64, 1 | 2));
	say("unmapped", edu_dma(d, 0x40000, 0x900000, 64, 1 | 2));
	say("read_only", edu_dma(d, 0x40000, 0x200000, 64, 1 | 2));
	say("rw_unchanged", memcmp(saved_rw, rw, page) == 0);
	say("ro_unchanged", memcmp(saved_ro, ro, page) == 0);
	/* and a DMA that is allowed still works afterwards */
	say("allowed", edu_dma(d, 0x40000, 0x100000 + 256, 64, 1 | 2));
	say("allowed_arrived", rw[256] == 0xEE && rw[256 + 63] == 0xEE);
	return 0;
}

int main(int argc, char **argv)
{
	const char *d = getenv("VFIO_DIR");

	if (d)
		snprintf(dir, sizeof dir, "%s", d);
	page = sysconf(_SC_PAGESIZE);
	if (argc < 2)
		return 2;
	if (!strcmp(argv[1], "errnos")) return cmd_errnos();
	if (!strcmp(argv[1], "race")) return cmd_race();
	if (!strcmp(argv[1], "killed")) return cmd_killed();
	if (!strcmp(argv[1], "device")) return cmd_device();
	if (!strcmp(argv[1], "faults")) return cmd_faults();
	return 2;
}
"""


# -- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e-client")
    (d / "client.c").write_text(CLIENT_C)
    exe = d / "vfio-e2e-client"
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-o", str(exe), str(d / "client.c")], check=True)
    return str(exe)


@pytest.fixture(scope="module")
def edu_client(tmp_path_factory):
    exe = tmp_path_factory.mktemp("edu-client") / "vfio-edu-client"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(exe),
                    os.path.join(ROOT, "examples", "vfio-edu-client.c")], check=True)
    return str(exe)


def _mounts():
    with open("/proc/mounts") as f:
        return [line.split()[1].replace("\\040", " ") for line in f]


@pytest.fixture
def rt(tmp_path):
    """The runtime directory of the run; afterwards nothing of it may be left, mounted or not."""
    watched = (str(tmp_path), "/dev/vfio", "/dev/cuse-vfio", "/sys/bus/pci", "/sys/kernel/iommu_groups",
               "/sys/module", "/sys/devices/virtual", "/sys/class")
    before = [m for m in _mounts() if m.startswith(watched)]
    had_dev_vfio = os.path.exists("/dev/vfio")
    path = tmp_path / "rt"
    yield str(path)
    after = [m for m in _mounts() if m.startswith(watched)]
    assert after == before, f"mounts left behind: {sorted(set(after) - set(before))}"
    assert not path.exists(), f"{path} left behind: {os.listdir(path)}"
    assert os.path.exists("/dev/vfio") == had_dev_vfio


def cli(*args, timeout=TIMEOUT):
    """Run the command line; a hung run gets SIGTERM (so it still tears down) before the test fails."""
    proc = subprocess.Popen([sys.executable, "-m", "cuse_vfio", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(f"cuse-vfio {' '.join(args)} hung; stdout: {out}; stderr: {err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(rt, *cmd, options=()):
    return cli("run", "--transport", TRANSPORT, "--runtime-dir", rt, *options, "--", *cmd)


def values(text):
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"-?\d+", value):
            out[key] = int(value)
    return out


def run_client(rt, client, command, options=(), wrapper=()):
    done = run(rt, *wrapper, client, command, options=options)
    assert done.returncode == 0, done.stdout + done.stderr
    return values(done.stdout), done


# -- the flow --------------------------------------------------------------------------
def test_the_edu_client_passes_every_step(rt, edu_client):
    done = run(rt, edu_client)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = done.stdout.splitlines()
    assert steps[-1] == "PASSED: 0 failure(s)"
    assert not [s for s in steps[:-1] if not s.startswith("ok ")]
    text = done.stdout
    for step in ("edu ID register 0x010000ed", "edu liveness inverts", "edu factorial 10! = 3628800",
                 "edu DMA round trip of 64 bytes", "MSI arrived on the eventfd", "INTx arrived on the eventfd",
                 "INTx stays masked until unmasked (automask)", "unmask: the pending INTx arrives",
                 "device fd is close-on-exec"):
        assert step in text
    assert f"{TRANSPORT.upper()} transport" in done.stderr


def test_a_client_of_another_user_owning_the_group_completes_the_flow(edu_client, tmp_path):
    """The topology gives /dev/vfio/2 to "nobody"; the client drops root before it starts."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv(1)")
    topology = tmp_path / "nobody.toml"
    topology.write_text('[[device]]\nbdf = "0000:00:02.0"\nmodel = "edu"\ngroup = 2\n\n'
                        '[group.2]\nowner = "nobody"\nmode = "0600"\n')
    # pytest's own tmp dirs are root-only: the program and the runtime dir must be reachable by nobody
    public = tempfile.mkdtemp(prefix="cuse-vfio-e2e.")
    rt = os.path.join(public, "rt")
    try:
        os.chmod(public, 0o755)
        exe = shutil.copy(edu_client, public)
        done = run(rt, "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", exe,
                   options=("--topology", str(topology)))
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.splitlines()[-1] == "PASSED: 0 failure(s)"
        # another user is refused the group, as the node's owner and mode say
        other = run(rt, "setpriv", "--reuid=daemon", "--regid=daemon", "--clear-groups", exe,
                    options=("--topology", str(topology)))
        assert other.returncode == 1 and "FAIL open /dev/vfio/2" in other.stdout
        assert not os.path.exists(rt) and not [m for m in _mounts() if m.startswith(public)]
    finally:
        shutil.rmtree(public)


# -- errno rules -------------------------------------------------------------------------
def test_every_errno_rule_a_client_can_reach(rt, client):
    v, _ = run_client(rt, client, "errnos")
    assert v["open_container"] == 1 and v["open_group"] == 1
    assert v["status_argsz_4"] == -errno.EINVAL
    assert v["status_bad_pointer"] == -errno.EFAULT
    assert v["set_container_minus_one"] == -errno.EBADF
    assert v["set_container_dev_null"] == -errno.EINVAL
    assert v["unset_without_container"] == -errno.EINVAL
    assert v["set_iommu_without_group"] == -errno.EINVAL
    assert v["device_fd_without_container"] == -errno.EINVAL
    assert v["set_container"] == 0
    assert v["set_container_twice"] == -errno.EINVAL
    assert v["device_fd_before_set_iommu"] == -errno.EINVAL
    assert v["set_iommu"] == 0
    assert v["device_fd_unknown_name"] == -errno.ENODEV
    assert v["device_fd"] == 1 and v["device_fd_cloexec"] == 1
    assert v["unset_with_device_open"] == -errno.EBUSY
    assert v["map"] == 0
    assert v["map_overlap"] == -errno.EEXIST
    assert v["map_unaligned_iova"] == -errno.EINVAL
    assert v["map_unaligned_size"] == -errno.EINVAL
    assert v["map_unaligned_vaddr"] == -errno.EINVAL
    assert v["unset_after_device_closed"] == 0


# -- processes -----------------------------------------------------------------------------
def test_two_clients_race_for_one_group(rt, client):
    v, _ = run_client(rt, client, "race")
    assert v["opened"] == 1 and v["ebusy"] == 1


def test_a_client_killed_mid_session_leaves_the_group_free(rt, client):
    v, _ = run_client(rt, client, "killed")
    assert v["child_ready"] == 1
    assert v["reopen"] == 0
    assert v["set_container"] == 0 and v["set_iommu"] == 0
    assert v["map_same_iova"] == 0
    assert v["device_fd"] == 0 and v["id"] == 0x11E81234


def test_a_client_without_the_hand_off_library_gets_an_errno_and_the_log_says_why(rt, client):
    v, done = run_client(rt, client, "device", wrapper=("env", "-u", "LD_PRELOAD"))
    assert v["device_fd"] == -errno.EOPNOTSUPP
    assert v["api_after"] == 0
    log = [line for line in done.stderr.splitlines() if "hand-off library" in line]
    assert log, done.stderr
    assert "cuse-vfio run" in log[0] and "LD_PRELOAD=" in log[0]


# -- IOMMU faults ------------------------------------------------------------------------------
def test_dma_the_iommu_refuses_moves_nothing_and_is_logged(rt, client, tmp_path):
    fault_log = tmp_path / "faults.jsonl"
    v, done = run_client(rt, client, "faults", options=("--fault-log", str(fault_log)))
    assert v["map_rw"] == 0 and v["map_ro"] == 0 and v["device_fd"] == 1
    assert v["load_buffer"] == 0 and v["straddle"] == 0 and v["unmapped"] == 0 and v["read_only"] == 0
    assert v["rw_unchanged"] == 1 and v["ro_unchanged"] == 1
    assert v["allowed"] == 0 and v["allowed_arrived"] == 1

    records = [json.loads(line) for line in fault_log.read_text().splitlines()]
    assert [(r["device"], r["iova"], r["length"], r["direction"]) for r in records] == [
        (EDU, 0x100000 + os.sysconf("SC_PAGESIZE") - 32, 64, "write"),
        (EDU, 0x900000, 64, "write"),
        (EDU, 0x200000, 64, "write"),
    ]
    assert [r["reason"] for r in records] == ["unmapped", "unmapped", "write-not-permitted"]
    # logged as they happened, and counted at the end
    logged = [line for line in done.stderr.splitlines() if "IOMMU fault:" in line]
    assert len(logged) == 3 and "iova 0x900000" in logged[1] and EDU in logged[1]
    assert "3 IOMMU fault(s)" in done.stderr
    shown = cli("faults", str(fault_log))
    assert shown.returncode == 0
    assert shown.stdout.splitlines()[-1] == "IOMMU faults: 3 (2 unmapped, 1 write-not-permitted)"


# -- trace -------------------------------------------------------------------------------------
def test_trace_is_json_lines_that_cuse_vfio_trace_prints(rt, client, tmp_path):
    trace = tmp_path / "trace.jsonl"
    run_client(rt, client, "errnos", options=("--trace", str(trace)))
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    status = [r for r in records if r.get("ioctl") == "VFIO_GROUP_GET_STATUS"]
    assert status and status[0]["node"] == "2" and status[0]["pid"] > 0
    assert any(r.get("ioctl") == "VFIO_IOMMU_MAP_DMA" and r.get("errno") == "EEXIST" for r in records)
    table = cli("trace", str(trace))
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split()[:5] == ["time", "pid", "node", "ioctl", "result"]
    assert len(lines) == len(records) + 1
    assert any("VFIO_IOMMU_MAP_DMA" in line and "EEXIST" in line for line in lines)
    assert any("VFIO_GROUP_GET_DEVICE_FD" in line and "ENODEV" in line for line in lines)


# -- what CMD sees -----------------------------------------------------------------------------
def test_cmd_sees_the_nodes_and_the_sysfs_view_and_the_host_does_not(rt):
    host_devices = sorted(os.listdir("/sys/bus/pci/devices"))
    script = (f"ls /dev/vfio; readlink /sys/bus/pci/devices/{EDU}/iommu_group; "
              f"cat /sys/bus/pci/devices/{EDU}/vendor /sys/bus/pci/devices/{EDU}/device; "
              f"basename $(readlink /sys/bus/pci/devices/{EDU}/driver); "
              "ls /sys/kernel/iommu_groups/2/devices; ls /sys/bus/pci/drivers/vfio-pci | grep 0000; "
              "ls /dev/null /dev/pts >/dev/null && echo dev-intact; "
              "echo preload=${LD_PRELOAD##*/} socket=${CUSE_VFIO_SOCKET:+set}")
    done = run(rt, "sh", "-c", script)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["2", "vfio"]
    assert lines[2].endswith("/2") and lines[2].endswith("kernel/iommu_groups/2")
    assert lines[3:5] == ["0x1234", "0x11e8"]
    assert lines[5] == "vfio-pci"
    assert lines[6] == EDU and lines[7] == EDU
    assert lines[8] == "dev-intact"
    assert lines[9] == "preload=libcuse_vfio_preload.so socket=set"
    assert sorted(os.listdir("/sys/bus/pci/devices")) == host_devices


def test_cmd_sees_the_vfio_modules_and_the_iommu_unit_as_dpdk_reads_them(rt):
    """DPDK's EAL stats /sys/module/vfio, reads the noiommu switch and the IOMMU's cap; the host keeps its own."""
    host_modules = sorted(os.listdir("/sys/module"))
    script = ("test -d /sys/module/vfio && echo vfio-loaded; "
              "cat /sys/module/vfio/parameters/enable_unsafe_noiommu_mode; "
              "cat /sys/module/vfio_iommu_type1/parameters/dma_entry_limit; "
              "basename $(readlink -f /sys/bus/pci/drivers/vfio-pci/module); "
              f"cat /sys/bus/pci/devices/{EDU}/iommu/intel-iommu/cap; "
              "readlink -f /sys/class/iommu/dmar0; "
              f"test -e /sys/bus/pci/devices/{EDU}/max_vfs || echo no-max_vfs; "
              f"ls /sys/module | grep -c . ")
    done = run(rt, "sh", "-c", script, options=("--noiommu",))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:7] == ["vfio-loaded", "Y", "65535", "vfio_pci", "d2008c22260206",
                         "/sys/devices/virtual/iommu/dmar0", "no-max_vfs"]
    # every module of the host is still there beside the emulated ones
    assert int(lines[7]) == len(set(host_modules) | {"irqbypass", "vfio", "vfio_iommu_type1", "vfio_pci",
                                                      "vfio_pci_core", "vfio_virqfd"})
    assert sorted(os.listdir("/sys/module")) == host_modules


def test_run_exits_with_cmds_status(rt):
    assert run(rt, "sh", "-c", "exit 7").returncode == 7


def test_run_reports_a_signal_as_128_plus_it(tmp_path):
    rt = str(tmp_path / "rt")
    assert run(rt, "sh", "-c", "kill -KILL $$").returncode == 128 + signal.SIGKILL
    assert not os.path.exists(rt)


def test_a_missing_command_is_127_with_a_sentence(rt):
    done = run(rt, "no-such-command-here")
    assert done.returncode == 127
    assert "no-such-command-here: command not found" in done.stderr
    assert "Traceback" not in done.stderr


def test_sigterm_to_run_reaches_cmd_and_everything_is_torn_down(rt):
    proc = subprocess.Popen([sys.executable, "-m", "cuse_vfio", "run", "--transport", TRANSPORT, "--runtime-dir", rt,
                             "--", "sh", "-c", "echo started; exec sleep 1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline() == "started\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- serve -------------------------------------------------------------------------------------
def test_serve_prints_what_a_client_needs_and_stops_cleanly_on_sigterm(rt, client):
    proc = subprocess.Popen([sys.executable, "-m", "cuse_vfio", "serve", "--transport", TRANSPORT,
                             "--runtime-dir", rt], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        said = {}
        for line in proc.stdout:
            key, _, value = line.rstrip("\n").partition(": ")
            said[key] = value
            if key == "ready":
                break
        assert said["transport"].startswith(TRANSPORT.upper())
        dev = os.path.dirname(said["container"])
        assert said["group 2"].startswith(os.path.join(dev, "2")) and EDU in said["group 2"]
        sysfs = said["sysfs view"].split()[0]
        with open(os.path.join(sysfs, "bus/pci/devices", EDU, "vendor")) as f:
            assert f.read() == "0x1234\n"
        env = dict(os.environ, VFIO_DIR=dev)
        for assignment in said["client environment"].split():
            name, _, value = assignment.partition("=")
            env[name] = value
        assert env["LD_PRELOAD"].endswith("libcuse_vfio_preload.so") and os.path.exists(env["CUSE_VFIO_SOCKET"])
        done = subprocess.run([client, "device"], env=env, capture_output=True, text=True, timeout=TIMEOUT)
        assert values(done.stdout) == {"device_fd": values(done.stdout)["device_fd"], "api_after": 0}
        assert values(done.stdout)["device_fd"] >= 3
        proc.send_signal(signal.SIGTERM)
        rest = proc.stdout.read()
        assert proc.wait(timeout=TIMEOUT) == 0, proc.stderr.read()
        assert "stopping (SIGTERM)" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
