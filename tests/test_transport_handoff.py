"""The pieces under the serving layer: the fd hand-off socket, client memory and fds, eventfds.

The hand-off is spoken here the way csrc/preload.c speaks it: connect, wait
for the greeting, send a 4-byte token, receive a 4-byte status and maybe an
fd by SCM_RIGHTS; or send an mmap request (OP_MMAP and the caller's mmap
arguments), receive status, start and maybe the memfd.  Waits are bounded by generous timeouts that only turn a
hang into a failure.
"""

import array
import ctypes
import errno
import mmap
import os
import select
import socket
import struct
import threading
import time

import pytest

from cuse_vfio.errors import VfioError
from cuse_vfio.memory import ProcessMemory, fetch_fd, pidfd_getfd, tgid_of
from cuse_vfio.transport.eventfd import ClientEventfd, EventfdPoller, is_eventfd
from cuse_vfio.transport import handoff as handoff_module
from cuse_vfio.transport.handoff import (
    CLOSED,
    HELLO,
    MMAP_REPLY,
    MMAP_REQUEST,
    NOT_MINE,
    OP_MMAP,
    TOKEN_MIN,
    Handoff,
    NotADeviceFile,
)

BOUND = 10.0


@pytest.fixture
def handoff(tmp_path):
    h = Handoff(str(tmp_path / "handoff.sock"), ttl=60)
    h.start()
    yield h
    h.stop()


def connect(h):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(BOUND)
    s.connect(h.path)
    assert s.recv(1) == HELLO
    return s


def redeem(s, token):
    s.sendall(struct.pack("<I", token))
    data, ancdata, _, _ = s.recvmsg(4, socket.CMSG_SPACE(4))
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload)
    status = struct.unpack("<i", data)[0]
    if status == 0:
        assert s.recv(1) == CLOSED  # the server's copy is closed now
    return status, (fds[0] if fds else None)


def ask_map(s, fd, offset=0, length=4096, prot=3, flags=1):
    s.sendall(MMAP_REQUEST.pack(OP_MMAP, fd, prot, flags, offset, length))
    data, ancdata, _, _ = s.recvmsg(MMAP_REPLY.size, socket.CMSG_SPACE(4), socket.MSG_WAITALL)
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload)
    status, _, start = MMAP_REPLY.unpack(data)
    return status, start, (fds[0] if fds else None)


def wait_eof(fd):
    ready, _, _ = select.select([fd], [], [], BOUND)
    assert ready, "the offered fd was never closed"
    assert os.read(fd, 1) == b""


def test_a_token_is_good_once_for_its_process(handoff):
    s = connect(handoff)
    assert handoff.has_client(os.getpid())
    r, w = os.pipe()
    token = handoff.offer(os.getpid(), w, "a pipe")
    assert token >= TOKEN_MIN
    status, fd = redeem(s, token)
    assert status == 0 and fd is not None
    os.write(fd, b"x")
    assert os.read(r, 1) == b"x"
    os.close(fd)
    os.set_blocking(r, False)
    assert os.read(r, 1) == b""  # ours was the last copy: the server closed its own before CLOSED
    assert redeem(s, token) == (errno.ENOENT, None)
    s.close()


def test_another_process_cannot_redeem_a_token(handoff):
    r, w = os.pipe()
    token = handoff.offer(os.getpid() + 100000, w, "someone else's pipe")
    s = connect(handoff)
    assert redeem(s, token) == (errno.EPERM, None)
    assert handoff.pending() == 1
    s.close()
    os.close(r)


def test_a_wrong_token_closes_the_connection(handoff):
    s = connect(handoff)
    assert redeem(s, TOKEN_MIN + 12345) == (errno.ENOENT, None)
    assert s.recv(1) == b""  # no second guess on this connection
    s.close()


def test_a_token_is_refused_once_the_connecting_process_has_exited(handoff):
    # A child connects; the parent keeps the connection after the child exits
    # (as a process that inherited it would): the child's token is not sent.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(BOUND)
    pid = os.fork()
    if pid == 0:
        try:
            s.connect(handoff.path)
            os._exit(0 if s.recv(1) == HELLO else 1)
        finally:
            os._exit(2)
    assert os.waitpid(pid, 0)[1] == 0
    deadline = time.monotonic() + BOUND
    while not handoff.has_client(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    r, w = os.pipe()
    token = handoff.offer(pid, w, "the child's pipe")
    status, fd = redeem(s, token)
    assert (status, fd) == (errno.ESRCH, None)
    assert s.recv(1) == b""
    wait_eof(r)  # the connection is gone, and the offer with it
    s.close()
    os.close(r)


def test_an_unredeemed_token_expires_and_closes_its_file(tmp_path):
    h = Handoff(str(tmp_path / "sock"), ttl=0.01)
    h.start()
    try:
        r, w = os.pipe()
        h.offer(os.getpid() + 100000, w, "a pipe")
        wait_eof(r)
        assert h.pending() == 0
    finally:
        h.stop()


def test_closing_the_connection_drops_the_process_tokens(handoff):
    s = connect(handoff)
    r, w = os.pipe()
    handoff.offer(os.getpid(), w, "a pipe")
    s.close()
    wait_eof(r)
    assert not handoff.has_client(os.getpid())


def test_stop_closes_what_is_on_offer(tmp_path):
    h = Handoff(str(tmp_path / "sock"), ttl=60)
    h.start()
    r, w = os.pipe()
    h.offer(os.getpid(), w, "a pipe")
    h.stop()
    wait_eof(r)
    assert not os.path.exists(h.path)


@pytest.mark.parametrize("peer_pidfd", ["SO_PEERPIDFD", "pidfd_open"])
def test_an_mmap_request_is_answered_by_the_mapper(tmp_path, monkeypatch, peer_pidfd):
    if peer_pidfd == "pidfd_open":  # a kernel before 6.5: no such socket option
        monkeypatch.setattr(handoff_module, "SO_PEERPIDFD", 9999)
    memfd = os.memfd_create("test")
    os.ftruncate(memfd, 3 * mmap.PAGESIZE)
    calls = []

    def mapper(peer, fd, offset, length, prot, flags):
        # The peer's fds are reached through a pidfd taken when it connected.
        mine = pidfd_getfd(peer.pidfd, memfd)
        assert os.path.samestat(os.fstat(mine), os.fstat(memfd))
        os.close(mine)
        calls.append((peer.pid, fd, offset, length, prot, flags))
        if fd == 1:
            return memfd, 2 * mmap.PAGESIZE
        if fd == 2:
            raise VfioError(errno.EINVAL, "not mappable")
        if fd == 3:
            raise NotADeviceFile("a pipe")
        raise RuntimeError("a bug in the mapper")

    h = Handoff(str(tmp_path / "sock"), ttl=60, mapper=mapper)
    h.start()
    try:
        s = connect(h)
        status, start, fd = ask_map(s, 1, offset=5 << 40, length=100, prot=1, flags=0x8001)
        assert (status, start) == (0, 2 * mmap.PAGESIZE) and fd is not None
        assert calls == [(os.getpid(), 1, 5 << 40, 100, 1, 0x8001)]
        os.write(fd, b"same file")
        assert os.pread(memfd, 9, 0) == b"same file"
        os.close(fd)
        os.fstat(memfd)  # the mapper's memfd is only sent, never closed
        # Several answers on one connection, and a token after them.
        assert ask_map(s, 2)[:2] == (errno.EINVAL, 0) and ask_map(s, 2)[2] is None
        assert ask_map(s, 3) == (NOT_MINE, 0, None)
        assert ask_map(s, 4) == (errno.EIO, 0, None)
        r, w = os.pipe()
        token = h.offer(os.getpid(), w, "a pipe")
        assert redeem(s, token)[0] == 0
        s.close()
        os.close(r)
    finally:
        h.stop()
        os.close(memfd)


def test_without_a_mapper_nothing_is_a_device_file(handoff):
    s = connect(handoff)
    assert ask_map(s, 0) == (NOT_MINE, 0, None)
    s.close()


def test_a_slow_or_bad_client_holds_nobody_up(handoff):
    slow = connect(handoff)
    slow.sendall(MMAP_REQUEST.pack(OP_MMAP, 0, 0, 0, 0, 0)[:7])  # and then nothing
    bad = connect(handoff)
    bad.sendall(struct.pack("<I", 12345))  # neither a token nor an operation
    assert bad.recv(1) == b""  # disconnected
    s = connect(handoff)
    r, w = os.pipe()
    token = handoff.offer(os.getpid(), w, "a pipe")
    status, fd = redeem(s, token)
    assert status == 0
    os.close(fd)
    s.close()
    slow.close()
    bad.close()
    os.close(r)


def test_one_user_cannot_hold_every_connection(handoff, monkeypatch):
    monkeypatch.setattr(handoff_module, "MAX_CONNECTIONS_PER_UID", 2)
    a, b = connect(handoff), connect(handoff)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(BOUND)
    c.connect(handoff.path)
    assert c.recv(1) == b""  # refused: this uid holds its share
    a.close()
    deadline = time.monotonic() + BOUND
    while handoff.connections() > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    d = connect(handoff)  # a connection closed, so another is welcome
    for s in (b, c, d):
        s.close()


# -- memory and fds of another process -----------------------------------------------
def test_process_memory_reads_writes_and_faults():
    buf = ctypes.create_string_buffer(b"0123456789")
    mem = ProcessMemory(os.getpid())
    assert mem.read(ctypes.addressof(buf) + 2, 3) == b"234"
    mem.write(ctypes.addressof(buf), b"ab")
    assert buf.value == b"ab23456789"
    with pytest.raises(VfioError) as e:
        mem.read(16, 4)
    assert e.value.errno == errno.EFAULT
    area = mmap.mmap(-1, 2 * mmap.PAGESIZE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(area))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(base + mmap.PAGESIZE), mmap.PAGESIZE, 0) == 0
    with pytest.raises(VfioError) as e:  # straddles into the PROT_NONE page: short transfer
        mem.read(base + mmap.PAGESIZE - 4, 8)
    assert e.value.errno == errno.EFAULT
    assert libc.mprotect(ctypes.c_void_p(base), 2 * mmap.PAGESIZE, 3) == 0


def test_process_memory_probe_is_what_pinning_checks():
    mem = ProcessMemory(os.getpid())
    area = mmap.mmap(-1, 3 * mmap.PAGESIZE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(area))
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    try:
        mem.probe(base, 3 * page, write=True)
        assert libc.mprotect(ctypes.c_void_p(base + page), page, 1) == 0  # PROT_READ
        mem.probe(base, 3 * page, write=False)
        with pytest.raises(VfioError) as e:
            mem.probe(base, 3 * page, write=True)
        assert e.value.errno == errno.EFAULT
        mem.probe(base + 2 * page, page, write=True)
        assert libc.mprotect(ctypes.c_void_p(base + 2 * page), page, 0) == 0  # PROT_NONE
        with pytest.raises(VfioError):
            mem.probe(base + page, 2 * page, write=False)
        with pytest.raises(VfioError):
            mem.probe(16, 8, write=False)
    finally:
        libc.mprotect(ctypes.c_void_p(base), 3 * page, 3)


def test_tid_to_tgid():
    started, finish = threading.Event(), threading.Event()
    tids = []

    def worker():
        tids.append(threading.get_native_id())
        started.set()
        finish.wait(BOUND)

    t = threading.Thread(target=worker)
    t.start()
    assert started.wait(BOUND)
    assert tids[0] != os.getpid() and tgid_of(tids[0]) == os.getpid()
    finish.set()
    t.join()
    # join() returns when the thread's tid is cleared, a moment before the kernel
    # releases the task and its /proc entry: wait for that, then the tid is unknown.
    deadline = time.monotonic() + BOUND
    while os.path.exists(f"/proc/{tids[0]}") and time.monotonic() < deadline:
        time.sleep(0.001)
    with pytest.raises(VfioError) as e:
        tgid_of(tids[0])  # that thread has exited and been released
    assert e.value.errno == errno.ESRCH


def test_fetch_fd_is_fdget():
    r, w = os.pipe()
    mine = fetch_fd(os.getpid(), w)
    assert mine not in (r, w) and not os.get_inheritable(mine)
    os.write(mine, b"y")
    assert os.read(r, 1) == b"y"
    os.close(mine)
    for bad in (-1, 1 << 20):
        with pytest.raises(VfioError) as e:
            fetch_fd(os.getpid(), bad)
        assert e.value.errno == errno.EBADF
    os.close(r)
    os.close(w)


# -- eventfds ----------------------------------------------------------------------------
def read_total(efd, want):
    """Signals are delivered by a thread: add up reads until ``want`` arrived (or BOUND)."""
    total, deadline = 0, time.monotonic() + BOUND
    while total < want and time.monotonic() < deadline:
        if select.select([efd], [], [], 0.05)[0]:
            total += os.eventfd_read(efd)
    return total


def test_client_eventfd_signal_and_watch():
    poller = EventfdPoller()
    client_side = os.eventfd(0)
    ours = fetch_fd(os.getpid(), client_side)
    assert is_eventfd(ours) and not is_eventfd(0)
    efd = ClientEventfd(ours, poller)
    try:
        efd.signal()
        efd.signal(2)
        assert read_total(client_side, 3) == 3

        fired = threading.Event()
        cancel = efd.watch(fired.set)
        os.eventfd_write(client_side, 1)
        assert fired.wait(BOUND)
        cancel()
        # Cancelled: a write stays unread by the server.
        os.eventfd_write(client_side, 5)
        efd.signal(1)
        assert read_total(client_side, 6) == 6
    finally:
        efd.release()
        poller.stop()
    assert efd.fd == -1
    efd.signal()  # after release: nothing, no error
    os.close(client_side)
