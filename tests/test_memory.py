"""Client memory as DMA reaches it: bound to the process image that mapped it."""

import ctypes
import errno
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from cuse_vfio.errors import VfioError
from cuse_vfio.memory import ProcessImage, ProcessMemory, process_image

# A child that shows a buffer, then (on a line from us) execs a new program that
# puts other bytes at the same address, and says when it has.
CHILD = r"""
import ctypes, mmap, os, sys
ADDR = 0x200000000
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
assert libc.mmap(ADDR, 4096, 3, 0x22 | 0x100000, -1, 0) == ADDR  # MAP_PRIVATE|ANONYMOUS|FIXED_NOREPLACE
ctypes.memmove(ADDR, sys.argv[1].encode(), len(sys.argv[1]))
print("ready", flush=True)
if sys.stdin.readline().strip() == "exec":
    os.execv(sys.executable, [sys.executable, __file__, "the next program's secret"])
sys.stdin.readline()
"""


@pytest.fixture
def child(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), "mapped bytes"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    proc.kill()
    proc.wait()


def test_an_image_reads_and_writes_the_memory_it_was_opened_on(child):
    image = process_image(child.pid)
    assert image.read(0x200000000, 12) == b"mapped bytes"
    image.write(0x200000000, b"DMA")
    assert image.read(0x200000000, 12) == b"DMAped bytes"
    assert process_image(child.pid) is image  # shared while it is the current image
    with pytest.raises(VfioError) as e:
        image.read(0x1000, 8)  # unmapped
    assert e.value.errno == errno.EFAULT


def test_pieces_move_in_one_copy_in_order_and_stop_at_the_first_that_fails(child):
    image = process_image(child.pid)
    base = 0x200000000
    assert image.readv([(base + 7, 5), (base, 6), (base + 6, 1)]) == b"bytesmapped "
    assert image.writev([(base + 7, 2), (base, 3)], b"BYDMA")
    assert image.read(base, 12) == b"DMAped BYtes"
    # An unmapped piece: nothing past it moves, what precedes it is written, and None / False
    # tell the caller to go piece by piece to learn which one failed.
    assert image.readv([(base, 3), (0x1000, 4)]) is None
    assert image.writev([(base, 2), (0x1000, 2), (base + 4, 2)], b"abXYcd") is False
    assert image.read(base, 12) == b"abAped BYtes"
    # After exec the old image moves nothing, in one copy as alone.
    child.stdin.write("exec\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "ready"
    assert image.readv([(base, 3), (base + 3, 3)]) is None
    assert image.writev([(base, 3), (base + 3, 3)], b"secret") is False
    assert ProcessMemory(child.pid).read(base, 8) == b"the next"


def test_after_exec_the_old_image_moves_nothing_and_a_new_one_is_made(child):
    image = process_image(child.pid)
    child.stdin.write("exec\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "ready"
    # A pid-bound view now sees the new program...
    assert ProcessMemory(child.pid).read(0x200000000, 25) == b"the next program's secret"
    # ...the image DMA mappings hold does not, in either direction.
    with pytest.raises(VfioError) as e:
        image.read(0x200000000, 8)
    assert e.value.errno == errno.EFAULT and "exec" in e.value.strerror
    with pytest.raises(VfioError):
        image.write(0x200000000, b"overwrite")
    assert ProcessMemory(child.pid).read(0x200000000, 25) == b"the next program's secret"
    fresh = process_image(child.pid)
    assert fresh is not image and fresh.read(0x200000000, 8) == b"the next"


@pytest.mark.parametrize("procmap_query", [True, False], ids=["PROCMAP_QUERY", "maps-file"])
def test_probe_checks_permissions_and_the_image(child, monkeypatch, procmap_query):
    # Both ways a probe asks the kernel (PROCMAP_QUERY from 6.11, /proc/<pid>/maps before) agree.
    from cuse_vfio.memory import process
    monkeypatch.setattr(process, "_have_procmap_query", procmap_query and process._have_procmap_query)
    image = ProcessImage(child.pid)
    image.probe(0x200000000, 4096, write=True)
    with pytest.raises(VfioError) as e:
        image.probe(0x200000000, 8192, write=False)
    assert e.value.errno == errno.EFAULT and "0x200001000" in e.value.strerror
    child.stdin.write("exec\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "ready"  # the next program
    with pytest.raises(VfioError) as e:
        image.probe(0x200000000, 4096, write=False)
    assert e.value.errno == errno.EFAULT and "exec" in e.value.strerror


def _nobody():
    os.setgid(65534)
    os.setuid(65534)  # drops CAP_IPC_LOCK with the rest


LOCKED_CHILD = r"""
#include <stdio.h>
#include <sys/mman.h>
int main(void) {
    char *p = mmap((void *)0x200000000, 16 * 4096, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (p == MAP_FAILED) return 1;
    p[0] = 'x';
    printf("ready\n");
    fflush(stdout);
    return getchar() == EOF ? 0 : 0;
}
"""


@pytest.fixture
def locked_child():
    """A process of user nobody (no CAP_IPC_LOCK) with RLIMIT_MEMLOCK of 4 pages and 16 pages of memory."""
    where = tempfile.mkdtemp(prefix="cuse-vfio-test-")  # nobody must reach it: pytest's tmp_path is 0700
    os.chmod(where, 0o755)
    src, exe = os.path.join(where, "child.c"), os.path.join(where, "child")
    with open(src, "w") as f:
        f.write(LOCKED_CHILD)
    subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)

    def prepare():
        import resource
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (4 * 4096, 4 * 4096))
        _nobody()

    proc = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=prepare)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(where, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as nobody")
def test_pinned_bytes_count_against_rlimit_memlock_without_cap_ipc_lock(locked_child):
    image = ProcessImage(locked_child.pid)
    image.account_pinned(3 * 4096)
    image.account_pinned(4096)
    with pytest.raises(VfioError) as e:
        image.account_pinned(4096)
    assert e.value.errno == errno.ENOMEM and "RLIMIT_MEMLOCK" in e.value.strerror
    image.release_pinned(2 * 4096)
    image.account_pinned(2 * 4096)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as nobody")
def test_type1_map_is_enomem_past_the_limit_and_unmap_gives_the_pages_back(locked_child):
    from cuse_vfio.iommu import Type1Driver
    from cuse_vfio.uapi import VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_TYPE1v2_IOMMU

    class Owner:
        pid = locked_child.pid
        memory = process_image(locked_child.pid)

    iommu = Type1Driver().open(VFIO_TYPE1v2_IOMMU)
    rw = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE
    iommu.map(0x100000, 4 * 4096, 0x200000000, rw, Owner)
    with pytest.raises(VfioError) as e:
        iommu.map(0x200000, 4096, 0x200000000 + 4 * 4096, rw, Owner)
    assert e.value.errno == errno.ENOMEM
    assert iommu.unmap(0x100000, 4 * 4096, 0) == 4 * 4096
    iommu.map(0x200000, 4096, 0x200000000 + 4 * 4096, rw, Owner)
    assert Owner.memory.pinned == 4096
    iommu.release()
    assert Owner.memory.pinned == 0
