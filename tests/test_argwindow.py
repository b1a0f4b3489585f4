"""An ioctl argument's window (transport.argwindow): the handler sees its own writes, the client gets them in order.

The window is read before the handler runs and written back after it; in
between, a handler's reads and writes must look exactly as if every one of
them went to the client's memory, including those that reach past the window.
The client here is this process itself (process_vm_readv on one's own pid).
"""

import ctypes
import os
import time

import pytest

from cuse_vfio.memory import inline
from cuse_vfio.transport.argwindow import WINDOWED, ArgWindow
from cuse_vfio.uapi.ioctls import VFIO_GET_API_VERSION, VFIO_GROUP_GET_STATUS, VFIO_IOMMU_MAP_DMA, NodeKind


def _client(data: bytes):
    buf = ctypes.create_string_buffer(data, len(data))
    return buf, ctypes.addressof(buf)


def _window(addr: int, size: int) -> ArgWindow:
    return ArgWindow(os.getpid(), addr, bytearray(ctypes.string_at(addr, size)))


def test_reads_inside_come_from_the_window_and_see_the_handlers_writes():
    buf, addr = _client(bytes(range(64)))
    w = _window(addr, 32)
    buf[0:4] = b"\xff" * 4  # a change after the window was read is not seen inside it
    assert w.read(addr, 4) == bytes(range(4))
    w.write(addr + 8, b"ABCD")
    assert w.read(addr + 6, 6) == bytes([6, 7]) + b"ABCD"
    assert buf.raw[8:12] == bytes(range(8, 12)), "a write inside the window waits for the write-back"
    assert w.dirty() == (addr + 8, b"ABCD")


def test_a_read_past_the_window_overlays_what_the_handler_wrote():
    buf, addr = _client(bytes(range(64)))
    w = _window(addr, 16)
    w.write(addr + 12, b"WXYZ")
    assert w.read(addr + 10, 10) == bytes([10, 11]) + b"WXYZ" + bytes(range(16, 20))


def test_a_write_across_the_window_edge_goes_to_the_client_and_into_the_window():
    buf, addr = _client(bytes(64))
    w = _window(addr, 16)
    w.write(addr + 4, b"aa")
    w.write(addr + 14, b"bbbb")  # half in, half out
    assert buf.raw[14:18] == b"bbbb"
    assert w.read(addr + 14, 2) == b"bb"
    w.write(addr + 2, b"c")
    assert w.dirty() == (addr + 2, b"c\0aa")


def test_written_bytes_reach_the_client_after_the_earlier_pending_writes():
    buf, addr = _client(bytes(64))
    w = _window(addr, 16)
    w.write(addr, b"late")
    w.pending = [(addr + 32, b"first")]  # a write through the copier that stalled earlier
    w.finish_writes()
    assert buf.raw[32:37] == b"first" and buf.raw[0:4] == b"late"
    assert w.dirty() is None and not w.pending


def test_an_inline_copy_moves_the_bytes_of_this_process():
    buf, addr = _client(b"0123456789")
    owner = inline.watch(lambda: None)  # the guard runs from the first owner on
    got = bytearray(10)
    deadline = time.monotonic() + 10
    while (n := inline.copy(inline.READ, os.getpid(), addr, got, 10, owner)) == inline.NOT_MADE:
        assert time.monotonic() < deadline, "the guard never started"
        time.sleep(0.01)
    inline.unwatch(owner)
    assert n == 10 and bytes(got) == b"0123456789"
    assert inline.copy(inline.WRITE, os.getpid(), addr, b"abc", 3, 0) == 3
    assert buf.raw[:3] == b"abc"
    assert inline.copy(inline.READ, os.getpid(), 8, got, 4, 0) < 0  # a fault is -errno, not a crash


@pytest.mark.parametrize("kind, cmd, windowed", [
    (NodeKind.GROUP, VFIO_GROUP_GET_STATUS, True),
    (NodeKind.CONTAINER, VFIO_IOMMU_MAP_DMA, True),
    (NodeKind.CONTAINER, VFIO_GET_API_VERSION, False),  # no argument: nothing to read ahead
    (NodeKind.DEVICE, VFIO_GROUP_GET_STATUS, False),  # numbers mean different things on other nodes
])
def test_only_struct_arguments_are_read_ahead(kind, cmd, windowed):
    assert (cmd in WINDOWED[kind]) is windowed
