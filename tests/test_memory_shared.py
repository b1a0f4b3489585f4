"""DMA memory that is a shared file of memory: the server maps the client's pages itself.

A client's memfd (QEMU's memory-backend-memfd), MAP_SHARED|MAP_ANONYMOUS
memory or hugetlbfs pages (DPDK's) mapped for DMA are mapped into the server
too, and a model's DMA there is a copy in the server, with no copier: the
client sees every byte at once.  A client that truncates the file makes the
DMA fault (SIGBUS caught), never the server crash; a mapping that goes takes
the server's mapping with it; everything else (private memory, FUSE files)
keeps the copier.
"""

import errno
import os
import signal
import subprocess
import sys

import pytest

from cuse_vfio.errors import VfioError
from cuse_vfio.iommu import Type1Driver
from cuse_vfio.iommu.faults import CLIENT_MEMORY, UNMAPPED, VADDR_INVALIDATED, WRITE_NOT_PERMITTED
from cuse_vfio.memory import process, process_image, shared
from cuse_vfio.uapi import (
    VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_VADDR,
    VFIO_DMA_MAP_FLAG_WRITE,
    VFIO_DMA_UNMAP_FLAG_ALL,
    VFIO_DMA_UNMAP_FLAG_VADDR,
    VFIO_TYPE1v2_IOMMU,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: /proc/PID/map_files and another's memory")



RW = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE
IOVA = 0x100000

# A client with SIZE bytes of DMA memory made as argv[1] says, its first bytes "client bytes" (but a
# "file" as it is); it
# prints the address, then answers lines: "peek OFF N" (hex), "poke OFF HEX", "truncate N",
# "remap" (other memory at the same address), "map" (a second mapping of the same pages), "split"
# (another memfd over the second half).
CHILD = r"""
import ctypes, mmap, os, sys
kind, size = sys.argv[1], int(sys.argv[2])
flags, fd = mmap.MAP_SHARED, -1
if kind in ("memfd", "private", "hugetlb"):
    fd = os.memfd_create("dma-ram", os.MFD_HUGETLB if kind == "hugetlb" else 0)
    os.ftruncate(fd, size)
    flags = mmap.MAP_PRIVATE if kind == "private" else mmap.MAP_SHARED
elif kind == "devshm":
    fd = os.open(sys.argv[3], os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
elif kind == "anon":
    flags = mmap.MAP_PRIVATE
elif kind == "file":  # a file as it is, untouched (a FUSE file: no byte of it is read)
    fd = os.open(sys.argv[3], os.O_RDWR)
m = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
if kind != "file":
    m[:12] = b"client bytes"
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
print(addr, flush=True)
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "peek":
        print(ctypes.string_at(addr + int(cmd[1]), int(cmd[2])).hex(), flush=True)
    elif cmd[0] == "poke":
        ctypes.memmove(addr + int(cmd[1]), bytes.fromhex(cmd[2]), len(cmd[2]) // 2)
        print("ok", flush=True)
    elif cmd[0] == "truncate":
        os.ftruncate(fd, int(cmd[1]))
        print("ok", flush=True)
    elif cmd[0] == "remap":  # anonymous memory over the DMA range: MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED
        assert libc.mmap(addr, size, 3, 0x32, -1, 0) == addr
        print("ok", flush=True)
    elif cmd[0] == "map":
        print(libc.mmap(None, size, 3, mmap.MAP_SHARED, fd, 0), flush=True)
    elif cmd[0] == "split":  # a second memfd over the second half: two VMAs of two files
        second = os.memfd_create("dma-ram-2")
        os.ftruncate(second, size // 2)
        assert libc.mmap(addr + size // 2, size // 2, 3, mmap.MAP_SHARED | 0x10, second, 0) == addr + size // 2
        ctypes.memmove(addr + size // 2, b"second file", 11)
        print("ok", flush=True)
"""


class Client:
    """The child above, as the IOMMU's owner of a mapping (``core.ops.Caller``: pid, memory)."""

    def __init__(self, kind, size=1 << 20, *extra):
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, kind, str(size), *extra],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.addr = int(self.proc.stdout.readline())
        self.pid = self.proc.pid
        self.memory = process_image(self.pid)

    def ask(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def peek(self, off, n):
        return bytes.fromhex(self.ask(f"peek {off} {n}"))

    def close(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def client(request):
    made = []

    def make(kind, size=1 << 20, *extra):
        made.append(Client(kind, size, *extra))
        return made[-1]

    yield make
    for c in made:
        c.close()


@pytest.fixture
def iommu():
    iommu = Type1Driver().open(VFIO_TYPE1v2_IOMMU)
    yield iommu
    iommu.release()
    assert shared.windows_vmas() == 0, "a window outlived its container"


@pytest.fixture(params=[True, False], ids=["PROCMAP_QUERY", "maps-file"])
def vma_source(request, monkeypatch):
    """The test twice: MAP_DMA learns the client's VMAs from PROCMAP_QUERY (Linux 6.11), and from
    /proc/PID/maps as on an older kernel (only that, on one)."""
    monkeypatch.setattr(process, "_have_procmap_query", request.param and process._have_procmap_query)


def no_copier(monkeypatch):
    """Every copy through the copier fails the test: what follows must not use it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the copier was used")
    monkeypatch.setattr(process, "bounded_copy", refuse)


def server_maps(name="/memfd:dma-ram"):
    """The server's own mappings of the client's file."""
    with open("/proc/self/maps") as maps:
        return [line.split()[:2] for line in maps if name in line]


def test_dma_to_a_memfd_is_a_copy_in_the_server_that_the_client_sees(vma_source, client, iommu, monkeypatch):
    c = client("memfd")
    iommu.map(IOVA, 1 << 20, c.addr, RW, c)
    window = iommu.mappings()[0].shared
    assert window is not None and server_maps() == [[f"{window.address:x}-{window.address + (1 << 20):x}", "rw-s"]]
    no_copier(monkeypatch)
    space = iommu.dma_space

    print("reads see the client's bytes, writes are in the client's memory at once")
    assert space.dma_read(IOVA, 12) == b"client bytes"
    space.dma_write(IOVA + 7, b"BYTES")
    assert c.peek(0, 12) == b"client BYTES"
    assert c.ask(f"poke {0x3000} {b'written by the client'.hex()}") == "ok"
    assert space.dma_read(IOVA + 0x3000, 21) == b"written by the client"

    print("scatter lists and transfers over pages, in one copy each")
    assert space.dma_readv([(IOVA + 7, 5), (IOVA + 0x3000, 7), (IOVA, 6)]) == b"BYTESwrittenclient"
    space.dma_writev([(IOVA + 0xFFE, 4), (IOVA + 0x5000, 2)], b"edgeOK")
    assert c.peek(0xFFE, 4) == b"edge" and c.peek(0x5000, 2) == b"OK"
    space.dma_write(IOVA + (1 << 20) - 3, b"end")
    assert c.peek((1 << 20) - 3, 3) == b"end"

    print("the IOMMU's rules are the same: outside the mapping faults, dirty pages are tracked")
    with pytest.raises(VfioError) as e:
        space.dma_read(IOVA + (1 << 20) - 2, 4)
    assert e.value.errno == errno.EFAULT and e.value.reason == UNMAPPED
    iommu.start_dirty_tracking()
    iommu.driver.precise_dirty = True
    dma = iommu.mappings()[0]
    space.dma_write(IOVA + 0x7000, b"x")
    assert dma.dirty is not None and any(dma.dirty)
    iommu.stop_dirty_tracking()


def test_a_read_only_mapping_gets_a_read_only_window(client, iommu):
    c = client("memfd")
    iommu.map(IOVA, 1 << 20, c.addr, VFIO_DMA_MAP_FLAG_READ, c)
    assert iommu.mappings()[0].shared is not None and server_maps()[0][1] == "r--s"
    assert iommu.dma_space.dma_read(IOVA, 6) == b"client"
    with pytest.raises(VfioError) as e:
        iommu.dma_space.dma_write(IOVA, b"no")
    assert e.value.reason == WRITE_NOT_PERMITTED
    assert c.peek(0, 6) == b"client"


def test_shared_anonymous_memory_and_dev_shm_files_get_windows(vma_source, client, iommu, tmp_path):
    anon = client("anon-shared")  # MAP_SHARED|MAP_ANONYMOUS: shmem too (the nvme client's memory)
    iommu.map(IOVA, 1 << 20, anon.addr, RW, anon)
    path = f"/dev/shm/cuse-vfio-test-{os.getpid()}"
    try:
        shm = client("devshm", 1 << 20, path)
    finally:
        os.unlink(path)
    iommu.map(2 * IOVA, 1 << 20, shm.addr, RW, shm)
    assert all(dma.shared is not None for dma in iommu.mappings())
    iommu.dma_space.dma_write(IOVA, b"ANON")
    iommu.dma_space.dma_write(2 * IOVA, b"SHM!")
    assert anon.peek(0, 12) == b"ANONnt bytes" and shm.peek(0, 12) == b"SHM!nt bytes"


def test_after_map_dma_the_pages_stay_reached_whatever_the_client_maps_at_the_vaddr(client, iommu):
    # The kernel pinned them at MAP_DMA: the device keeps reaching those pages, not the new memory.
    c = client("memfd")
    iommu.map(IOVA, 1 << 20, c.addr, RW, c)
    second = int(c.ask("map"))  # the same pages, seen at a second address
    assert c.ask("remap") == "ok"
    iommu.dma_space.dma_write(IOVA, b"pinned")
    assert c.peek(0, 12) == bytes(12)  # the new anonymous memory at the old vaddr is untouched
    assert c.peek(second - c.addr, 12) == b"pinned bytes"
    assert iommu.dma_space.dma_read(IOVA, 12) == b"pinned bytes"


def test_a_range_over_two_files_gets_one_window_of_two_pieces(vma_source, client, iommu):
    c = client("memfd")
    assert c.ask("split") == "ok"
    half = 1 << 19
    iommu.map(IOVA, 1 << 20, c.addr, RW, c)
    window = iommu.mappings()[0].shared
    assert window is not None and window.vmas == 2 and len(server_maps("/memfd:dma-ram")) == 2
    space = iommu.dma_space
    assert space.dma_read(IOVA + half, 11) == b"second file"
    space.dma_write(IOVA + half - 2, b"ACROSS")  # the end of the first file, the start of the second
    assert c.peek(half - 2, 13) == b"ACROSSnd file"
    assert space.dma_readv([(IOVA, 6), (IOVA + half + 4, 7)]) == b"clientnd file"
    iommu.unmap(IOVA, 1 << 20)
    assert server_maps("/memfd:dma-ram") == [] and shared.windows_vmas() == 0


def test_a_scatter_list_that_leaves_the_window_is_moved_entry_by_entry(client, iommu):
    c, anon = client("memfd"), client("anon")
    iommu.map(IOVA, 1 << 20, c.addr, RW, c)
    iommu.map(IOVA + (1 << 20), 1 << 20, anon.addr, RW, anon)  # right after it, through the copier
    space = iommu.dma_space
    assert space.dma_readv([(IOVA, 6), (IOVA + (1 << 20) + 7, 5)]) == b"clientbytes"
    space.dma_writev([(IOVA + 0x100, 2), (IOVA + (1 << 20) - 1, 2), (IOVA + (1 << 20) + 0x100, 2)], b"AAxyBB")
    assert c.peek(0x100, 2) == b"AA" and c.peek((1 << 20) - 1, 1) == b"x"
    assert anon.peek(0, 1) == b"y" and anon.peek(0x100, 2) == b"BB"
    space.dma_writev([(IOVA + 0x300, 2)], b"EEEE")  # more data than entries: what they cover
    assert c.peek(0x300, 4) == b"EE\0\0"
    assert space.dma_readv(iter([(IOVA + 7, 5), (IOVA, 6)])) == b"bytesclient"  # any iterable
    print("an entry the IOMMU refuses: what precedes it is written, then the fault")
    with pytest.raises(VfioError) as e:
        space.dma_writev([(IOVA + 0x200, 2), (0x9000000, 2)], b"CCDD")
    assert e.value.reason == UNMAPPED and c.peek(0x200, 2) == b"CC"
    with pytest.raises(VfioError) as e:
        space.dma_readv([(IOVA, 2), (0x9000000, 2)])
    assert e.value.reason == UNMAPPED


def test_a_truncated_memfd_faults_the_dma_and_the_server_goes_on(client, iommu):
    c = client("memfd")
    iommu.map(IOVA, 1 << 20, c.addr, RW, c)
    assert c.ask(f"truncate {0x2000}") == "ok"
    space = iommu.dma_space
    before = iommu.driver.fault_log.total

    print("past the new end of the file: SIGBUS in the server, a fault in the log")
    for attempt in (lambda: space.dma_read(IOVA + 0x2000, 8),
                    lambda: space.dma_write(IOVA + 0x4000, b"lost"),
                    lambda: space.dma_readv([(IOVA, 8), (IOVA + 0x3000, 8)]),
                    lambda: space.dma_writev([(IOVA + 0x10, 2), (IOVA + 0x8000, 2)], b"okno"),
                    lambda: space.dma_read(IOVA + 0x1000, 0x2000)):  # crosses the end
        with pytest.raises(VfioError) as e:
            attempt()
        assert e.value.errno == errno.EFAULT and e.value.reason == CLIENT_MEMORY
        assert "SIGBUS" in str(e.value)
    faults = iommu.driver.fault_log.faults()
    assert iommu.driver.fault_log.total == before + 5 and faults[-1].reason == CLIENT_MEMORY

    print("what is left of the file is still reached, and a write before a fault stays written")
    assert space.dma_read(IOVA, 12) == b"client bytes"
    assert c.peek(0x10, 2) == b"ok"
    space.dma_write(IOVA + 0x1FFF, b"!")
    assert c.peek(0x1FFF, 1) == b"!"


def test_every_way_a_mapping_goes_drops_the_window(vma_source, client, iommu):
    c = client("memfd", 4 << 20)
    for i in range(4):
        iommu.map(IOVA * (i + 1), 1 << 20, c.addr + i * (1 << 20), RW, c)
    assert len(server_maps()) == 4 and shared.windows_vmas() == 4

    print("UNMAP_DMA of one mapping")
    assert iommu.unmap(IOVA, 1 << 20) == 1 << 20
    assert len(server_maps()) == 3

    print("UNMAP_DMA with VADDR invalidates: no window until MAP_DMA with VADDR gives a new one")
    assert iommu.unmap(2 * IOVA, 1 << 20, VFIO_DMA_UNMAP_FLAG_VADDR) == 1 << 20
    assert len(server_maps()) == 2 and iommu.dmas.containing(2 * IOVA).shared is None
    with pytest.raises(VfioError) as e:
        iommu.dma_space.dma_read(2 * IOVA, 6)
    assert e.value.reason == VADDR_INVALIDATED
    iommu.map(2 * IOVA, 1 << 20, c.addr + 3 * (1 << 20), VFIO_DMA_MAP_FLAG_VADDR, c)
    assert len(server_maps()) == 3
    c.ask(f"poke {3 << 20} {b'fourth'.hex()}")
    assert iommu.dma_space.dma_read(2 * IOVA, 6) == b"fourth"

    print("UNMAP_DMA of all, then the container's release")
    assert iommu.unmap(0, 0, VFIO_DMA_UNMAP_FLAG_ALL) == 3 << 20
    assert server_maps() == [] and shared.windows_vmas() == 0
    iommu.map(IOVA, 1 << 20, c.addr, RW, c)
    assert len(server_maps()) == 1
    iommu.release()
    assert server_maps() == [] and shared.windows_vmas() == 0


def test_a_map_that_fails_after_the_probe_leaves_no_window(client, iommu, monkeypatch):
    c = client("memfd")

    def over_the_limit(size):
        raise VfioError(errno.ENOMEM, "past RLIMIT_MEMLOCK")
    monkeypatch.setattr(type(c.memory), "account_pinned", lambda self, size: over_the_limit(size))
    with pytest.raises(VfioError) as e:
        iommu.map(IOVA, 1 << 20, c.addr, RW, c)
    assert e.value.errno == errno.ENOMEM
    assert server_maps() == [] and shared.windows_vmas() == 0


def test_private_and_anonymous_memory_keep_the_copier(vma_source, client, iommu):
    for kind in ("private", "anon"):
        c = client(kind)
        iommu.map(IOVA, 1 << 20, c.addr, RW, c)
        assert iommu.mappings()[0].shared is None, kind
        iommu.dma_space.dma_write(IOVA, b"COPIER")
        assert c.peek(0, 12) == b"COPIER bytes"
        iommu.unmap(IOVA, 1 << 20)
    assert server_maps() == []


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_a_shared_mapping_of_a_fuse_file_keeps_the_copier_and_is_never_opened(vma_source, client, iommu, tmp_path):
    pytest.importorskip("mfusepy")
    from test_transport_stall import stalling_file_system

    with stalling_file_system(tmp_path) as (page_file, armed):
        c = client("file", 4096, str(page_file))  # MAP_SHARED of the FUSE file (its reads held)
        try:
            iommu.map(IOVA, 4096, c.addr, RW, c)
            assert iommu.mappings()[0].shared is None and armed.exists()
            with open("/proc/self/maps") as maps:
                assert str(page_file) not in maps.read()
            iommu.unmap(IOVA, 4096)
        finally:  # before the file system goes: the child's mapping would keep it
            c.close()


HUGEPAGES_2M = "/sys/kernel/mm/hugepages/hugepages-2048kB"


def _hugepages(name):
    with open(f"{HUGEPAGES_2M}/{name}") as f:
        return int(f.read())


def _set_hugepages(count):
    with open(f"{HUGEPAGES_2M}/nr_hugepages", "w") as f:
        f.write(str(count))


@pytest.fixture
def a_free_huge_page():
    """A free 2 MiB huge page: one more is reserved when none is free (as the DPDK stage does), and
    given back after (nr_hugepages one less than it is then, whatever others did meanwhile)."""
    if not os.path.isdir(HUGEPAGES_2M):
        pytest.skip("this kernel has no 2 MiB huge pages")
    added = 0
    if _hugepages("free_hugepages") < 1:
        print("reserving a 2 MiB huge page (nr_hugepages + 1)")
        _set_hugepages(_hugepages("nr_hugepages") + 1)
        added = 1
    try:
        if _hugepages("free_hugepages") < 1:
            pytest.skip("the kernel gave no free 2 MiB huge page (memory too fragmented?)")
        yield
    finally:
        if added:
            _set_hugepages(_hugepages("nr_hugepages") - added)


def test_hugetlbfs_pages_get_a_window_at_their_own_alignment(vma_source, a_free_huge_page, client, iommu):
    c = client("hugetlb", 2 << 20)
    # 8 KiB in the middle of the huge page: the window maps the whole page, aligned as the client's
    iommu.map(IOVA, 0x2000, c.addr + 0x1000, RW, c)
    window = iommu.mappings()[0].shared
    assert window is not None and (window.address - 0x1000) % (2 << 20) == 0
    iommu.dma_space.dma_write(IOVA, b"huge")
    assert c.peek(0x1000, 4) == b"huge"
    assert iommu.dma_space.dma_read(IOVA + 0x1000, 4) == c.peek(0x2000, 4)
    iommu.unmap(IOVA, 0x2000)
    assert server_maps() == []


GUARDED = r"""
import ctypes, mmap, os, signal, sys
from cuse_vfio.memory._copier import ffi, lib
if sys.argv[1] == "chained":
    signal.signal(signal.SIGBUS, lambda *a: print("the handler before the guard ran", flush=True))
assert lib.cv_shared_guard() == 0
fd = os.memfd_create("x")
os.ftruncate(fd, 8192)
m = mmap.mmap(fd, 8192)
os.ftruncate(fd, 0)
src = ffi.from_buffer(m)
dst = ffi.new("char[]", 16)
print("guarded copy:", lib.cv_shared_copy(dst, src, 16), flush=True)
if sys.argv[1] == "chained":
    os.kill(os.getpid(), signal.SIGBUS)
    print("still here", flush=True)
else:
    ctypes.string_at(ctypes.addressof(ctypes.c_char.from_buffer(m)), 1)  # not guarded
    print("not reached", flush=True)
"""


@pytest.mark.parametrize("case", ["unguarded", "chained"])
def test_a_sigbus_outside_a_guarded_copy_is_not_swallowed(case):
    proc = subprocess.run([sys.executable, "-c", GUARDED, case], capture_output=True, text=True, timeout=60)
    assert f"guarded copy: {-errno.EFAULT}" in proc.stdout, proc.stdout + proc.stderr
    if case == "chained":
        assert proc.returncode == 0 and "the handler before the guard ran\nstill here" in proc.stdout
    else:
        assert proc.returncode == -signal.SIGBUS and "not reached" not in proc.stdout


def test_a_window_that_cannot_be_made_leaves_the_copier(client, iommu, monkeypatch):
    monkeypatch.setattr(shared, "MAX_WINDOW_VMAS", 0)
    c = client("memfd")
    iommu.map(IOVA, 1 << 20, c.addr, RW, c)
    assert iommu.mappings()[0].shared is None and server_maps() == []
    iommu.dma_space.dma_write(IOVA, b"COPIED")
    assert c.peek(0, 6) == b"COPIED"

