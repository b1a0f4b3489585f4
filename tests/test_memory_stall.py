"""How long a DMA waits for client memory that stalls: never past the short check on a serving thread.

A model may DMA inside a register write, which the serving loop answers
(virtio-net moves a transmit ring on the doorbell write).  The kernel pinned
those pages at MAP_DMA, so a real DMA never waits for a fault: on the loop, a
copy not done by STALL_CHECK is a fault; on a device's own thread (edu's
timer, NVMe's I/O thread) the copy gets the whole bounded wait.  The memory
here is a page of a FUSE file whose daemon holds every read, with the FUSE
check taken away, as memory whose stall nothing names (slow media) would be.
"""

import errno
import os
import subprocess
import sys
import threading
import time

import pytest
from serving_support import CLIENT_TIMEOUT
from test_transport_stall import stalling_file_system

from cuse_vfio.errors import VfioError
from cuse_vfio.memory import ProcessImage, process, serving_thread
from cuse_vfio.memory._copier import lib as copier

pytest.importorskip("mfusepy")

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")

# A child with the stalling file's page mapped; it says where.
CHILD = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
fd = os.open(sys.argv[1], os.O_RDWR)
addr = libc.mmap(None, 4096, 3, 0x02, fd, 0)  # PROT_READ|PROT_WRITE, MAP_PRIVATE
print(addr, flush=True)
sys.stdin.readline()
"""


def test_a_dma_on_a_serving_thread_faults_where_a_device_thread_waits(tmp_path, monkeypatch):
    monkeypatch.setattr(process, "STALL_LIMIT", 3600.0)  # a device thread waits until the daemon answers
    monkeypatch.setattr(process, "fuse_backing", lambda pid, addr, size: None)
    with stalling_file_system(tmp_path) as (page_file, armed):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(page_file)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        try:
            addr = int(child.stdout.readline())
            image = ProcessImage(child.pid)
            results = {}

            def dma(name, serving):
                if serving:
                    serving_thread()
                try:
                    results[name] = image.read(addr, 8)
                except VfioError as e:
                    results[name] = e
                finally:
                    serving_thread(False)

            print("a DMA read on a serving thread: a fault, while the memory still stalls")
            loop = threading.Thread(target=dma, args=("serving", True))
            loop.start()
            loop.join(CLIENT_TIMEOUT)
            assert not loop.is_alive()
            fault = results["serving"]
            assert isinstance(fault, VfioError) and fault.errno == errno.EFAULT, fault
            assert "serving thread" in fault.strerror and armed.exists()

            print("the same DMA on a device's thread waits for the memory")
            device = threading.Thread(target=dma, args=("device", False))
            device.start()
            wait_for = time.monotonic() + CLIENT_TIMEOUT
            while copier.cv_copy_stalled(child.pid) < 2:  # the abandoned copy and this one
                assert time.monotonic() < wait_for, "the device thread's copy did not stall"
                time.sleep(0.01)
            assert device.is_alive() and "device" not in results
            armed.unlink()
            device.join(CLIENT_TIMEOUT)
            assert results["device"] == bytes(8)
            while copier.cv_copy_stalled(child.pid):  # the abandoned copy ends too, now that the page came
                assert time.monotonic() < wait_for, "a stalled copy did not end"
                time.sleep(0.01)
            image.close()
        finally:  # before the file system goes: the child's mapping would keep it
            child.kill()
            child.wait()
