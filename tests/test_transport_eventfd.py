"""Eventfds fetched from a client: signals never block the caller and saturate as eventfd_signal does,
cancels never wait."""

import os
import select
import threading
import time

from cuse_vfio.memory import fetch_fd
from cuse_vfio.transport.eventfd import ClientEventfd, EventfdPoller

BOUND = 10.0
FULL = (1 << 64) - 2  # the counter's maximum: any further write blocks (or EAGAIN)


def nothing_more(fd, seconds=0.2):
    """Nothing arrives on ``fd`` for a while (the count that did not fit was dropped)."""
    return not select.select([fd], [], [], seconds)[0]


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def returns_within(fn, seconds):
    done = threading.Event()

    def run():
        fn()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(seconds)


def test_signal_does_not_block_on_a_full_blocking_eventfd():
    # The client's eventfd is blocking (its choice; the server must not change
    # O_NONBLOCK, shared with the client) and its counter is at the top.
    poller = EventfdPoller()
    client_side = os.eventfd(0)
    os.eventfd_write(client_side, FULL)
    efd = ClientEventfd(fetch_fd(os.getpid(), client_side), poller)
    try:
        assert returns_within(efd.signal, 1.0), "signal() blocked on a full eventfd"
        assert returns_within(lambda: efd.signal(5), 1.0)
        assert os.get_blocking(client_side)
        # Saturated, as eventfd_signal's counter is: the client reads the top, and that is all.
        assert os.eventfd_read(client_side) == FULL
        assert nothing_more(client_side)
        # A count larger than the room: what fits is added.
        os.eventfd_write(client_side, FULL - 2)
        efd.signal(5)
        assert os.eventfd_read(client_side) == FULL
        assert nothing_more(client_side)
    finally:
        efd.release()
        poller.stop()
    os.close(client_side)


def test_release_after_a_saturated_signal_neither_blocks_nor_leaks():
    poller = EventfdPoller()
    client_side = os.eventfd(0)
    os.eventfd_write(client_side, FULL)
    before = open_fds()
    efd = ClientEventfd(fetch_fd(os.getpid(), client_side), poller)
    efd.signal(3)
    assert returns_within(efd.release, 1.0)
    deadline = time.monotonic() + BOUND
    while open_fds() != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert open_fds() == before, "a duplicate of a released eventfd was kept"
    assert returns_within(poller.stop, BOUND)
    assert os.eventfd_read(client_side) == FULL  # the undeliverable count was dropped
    os.close(client_side)


def test_cancel_does_not_wait_for_a_running_callback():
    # The device layer cancels holding its lock; the callback (INTx unmask)
    # takes that lock: cancel() must return at once, not wait for the poller.
    poller = EventfdPoller()
    client_side = os.eventfd(0)
    before = open_fds()
    efd = ClientEventfd(fetch_fd(os.getpid(), client_side), poller)
    lock = threading.Lock()
    entered, calls = threading.Event(), []

    def callback():
        entered.set()
        with lock:
            calls.append(1)

    try:
        with lock:
            cancel = efd.watch(callback)
            os.eventfd_write(client_side, 1)
            assert entered.wait(BOUND)
            t0 = time.monotonic()
            cancel()
            efd.release()
            assert time.monotonic() - t0 < 1.0, "cancel() waited for the poller"
        # The running callback completed harmlessly; later writes call nothing.
        deadline = time.monotonic() + BOUND
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls == [1]
        os.eventfd_write(client_side, 1)
        time.sleep(0.1)
        assert calls == [1]
        # The poller closed its duplicate once it let go of it.
        while open_fds() != before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert open_fds() == before
    finally:
        poller.stop()
    os.close(client_side)


def test_a_non_blocking_eventfd_is_signalled_before_signal_returns():
    # QEMU's and DPDK's eventfds are non-blocking: no thread hop, the count is there at once.
    poller = EventfdPoller()
    client_side = os.eventfd(0, os.EFD_NONBLOCK)
    efd = ClientEventfd(fetch_fd(os.getpid(), client_side), poller)
    try:
        efd.signal(2)
        assert os.eventfd_read(client_side) == 2
        # Full: EAGAIN, and the count is dropped (saturated); one short: what fits.
        os.eventfd_write(client_side, FULL)
        assert returns_within(lambda: efd.signal(4), 1.0)
        assert os.eventfd_read(client_side) == FULL
        assert nothing_more(client_side)
        os.eventfd_write(client_side, FULL - 1)
        efd.signal(4)
        assert os.eventfd_read(client_side) == FULL
        assert nothing_more(client_side)
    finally:
        efd.release()
        poller.stop()
    os.close(client_side)


def test_a_blocking_eventfd_with_room_is_signalled_before_signal_returns():
    # A blocking file with room for the count is written from the raising thread too.
    poller = EventfdPoller()
    client_side = os.eventfd(0)
    efd = ClientEventfd(fetch_fd(os.getpid(), client_side), poller)
    try:
        efd.signal()
        assert select.select([client_side], [], [], 0)[0], "the signal went through another thread"
        assert os.eventfd_read(client_side) == 1
        # One short of full: the first signal fills it, the next is dropped.
        os.eventfd_write(client_side, FULL - 1)
        efd.signal()
        assert returns_within(efd.signal, 1.0)
        assert os.eventfd_read(client_side) == FULL
        assert nothing_more(client_side)
    finally:
        efd.release()
        poller.stop()
    os.close(client_side)


def test_an_inline_signal_a_client_blocks_is_freed(monkeypatch):
    # The client clears O_NONBLOCK and fills its counter between the server's
    # check and its write: the write blocks, and the guard thread consumes the
    # counter it waits on, so the raising thread goes on.
    from cuse_vfio.transport import eventfd

    real = eventfd.fcntl.fcntl
    monkeypatch.setattr(eventfd.fcntl, "fcntl",
                        lambda fd, cmd, *a: real(fd, cmd, *a) | os.O_NONBLOCK if cmd == eventfd.fcntl.F_GETFL
                        else real(fd, cmd, *a))
    poller = EventfdPoller()
    client_side = os.eventfd(0)
    os.eventfd_write(client_side, FULL)
    efd = ClientEventfd(fetch_fd(os.getpid(), client_side), poller)
    try:
        assert returns_within(lambda: efd.signal(7), BOUND), "a raced inline write stayed blocked"
        assert os.eventfd_read(client_side) == 7
    finally:
        efd.release()
        poller.stop()
    os.close(client_side)
