"""Client memory as DMA reaches it: bound to the process image that mapped it."""

import ctypes
import errno
import os
import subprocess
import sys

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


def test_probe_checks_permissions_and_the_image(child):
    image = ProcessImage(child.pid)
    image.probe(0x200000000, 4096, write=True)
    with pytest.raises(VfioError):
        image.probe(0x200000000, 8192, write=False)
