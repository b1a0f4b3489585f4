"""A client's eventfd, fetched into the server: interrupts signal it, unmask eventfds are watched.

``ClientEventfd`` is what ``caller.get_eventfd(fd)`` returns (the kernel's
``eventfd_ctx``): ``signal()`` adds to the counter the client (or KVM, or
QEMU's irqfd) reads; ``watch(callback)`` is the other direction, used for
INTx unmask eventfds the client writes.  One ``EventfdPoller`` per server
serves every eventfd with two threads:

* the *watch* thread waits for any watched eventfd to become readable,
  consumes it and calls back;
* the *guard* thread watches over signals.  ``signal()`` is the kernel's
  ``eventfd_signal``: it adds to the counter at once, from the raising
  thread, never blocks, and at the top of the counter it saturates (what
  does not fit is dropped; the client's counter is not zero, so it has its
  interrupt).  The kernel's counter tops out at 2^64-1, one more than a
  write can reach, so a full counter here reads 2^64-2.  The client owns the
  file's blocking mode (``O_NONBLOCK`` is per open file description, shared
  with the client, so the server must not change it; ``RWF_NOWAIT`` is
  refused for eventfd writes): a non-blocking file is written at once, a
  full counter answering EAGAIN; a blocking one is asked first whether it
  has room (``POLLOUT``: room for 1; a larger count reads the room from
  fdinfo).  A client that clears ``O_NONBLOCK`` (or fills its counter)
  between the check and the write would block the raising thread: the guard
  wakes every second, and a write older than that has the client's counter
  consumed so it completes; a client that races its own writes can at worst
  lose its count, never hold the serving loop or a device lock.

The signal is the interrupt's hot path: no thread hop, no lock but the
eventfd's own, two system calls (``F_GETFL``, the write) for a non-blocking
file, nothing allocated but the write's start time.

The watch thread works on its own duplicate of each watched eventfd and is
the only one to close it, so ``release()`` and ``cancel()`` close nothing it
may still be polling, never wait, and a number reused by a later open is
never touched.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import struct
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

from ..errors import VfioError

log = logging.getLogger(__name__)
_COUNT = struct.Struct("<Q")
_ONE = _COUNT.pack(1)
_F_GETFL = fcntl.F_GETFL
_O_NONBLOCK = os.O_NONBLOCK
#: The largest counter an eventfd holds; a write that would pass it blocks.
_EFD_MAX = (1 << 64) - 2
#: How long a signal's write may block before the guard consumes the counter it waits on.
_INLINE_PATIENCE = 1.0


def is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def _room(fd: int) -> int:
    """How much can be added to the eventfd's counter right now (0 if unknown)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"eventfd-count:"):
                    return max(0, _EFD_MAX - int(line.split()[1], 16))
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class ClientEventfd:
    """One fetched eventfd; owns its fd until ``release``."""

    def __init__(self, fd: int, poller: "EventfdPoller", owner: str = ""):
        self.fd = fd
        self.poller = poller
        self.owner = owner
        self._watches: List[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._room_poll: Optional[select.poll] = None

    def __repr__(self) -> str:
        return f"ClientEventfd(fd={self.fd}{', ' + self.owner if self.owner else ''})"

    def signal(self, value: int = 1) -> None:
        """Add ``value`` to the client's counter now, saturating at its top; never blocks (eventfd_signal)."""
        with self._lock:
            fd = self.fd
            if fd < 0 or value <= 0:
                return
            poller = self.poller
            if not poller.guarding and not poller.start_guard():
                return  # the server is stopping
            # Listed while the write is under way, for the guard to unblock (see the module).
            inline = poller.inline
            inline[self] = time.monotonic()
            try:
                if fcntl.fcntl(fd, _F_GETFL) & _O_NONBLOCK:
                    try:
                        os.write(fd, _ONE if value == 1 else _COUNT.pack(value))
                        return
                    except BlockingIOError:
                        if value == 1:
                            return  # full: saturated
                elif value == 1:
                    if self._has_room(fd):
                        os.write(fd, _ONE)
                    return
                room = min(value, _room(fd))  # a count larger than the room: what fits
                if room:
                    os.write(fd, _COUNT.pack(room))
            except BlockingIOError:
                pass  # the client filled it meanwhile: saturated
            except OSError as e:
                log.warning("%r: signal failed: %s", self, e.strerror)
            finally:
                del inline[self]

    def _has_room(self, fd: int) -> bool:
        """A blocking file: whether a write of 1 would not block (eventfd's POLLOUT)."""
        if self._room_poll is None:
            self._room_poll = select.poll()
            self._room_poll.register(fd, select.POLLOUT)
        return bool(self._room_poll.poll(0))

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` each time the client writes the eventfd; returns the cancel function.

        Cancelling never waits: a callback already running may still complete.
        """
        with self._lock:
            if self.fd < 0:
                raise VfioError(errno.EBADF, f"{self!r} is released")
            cancel = self.poller.add(self.fd, callback, key=self)
            self._watches.append(cancel)

        def cancel_once() -> None:
            with self._lock:
                if cancel in self._watches:
                    self._watches.remove(cancel)
            cancel()

        return cancel_once

    def release(self) -> None:
        with self._lock:
            fd, self.fd = self.fd, -1
            watches, self._watches = self._watches, []
        for cancel in watches:
            cancel()
        if fd >= 0:
            self.poller.forget(self)  # the guard no longer reads it once this returns
            os.close(fd)


class _Watched:
    """One watched eventfd: the watch thread's duplicate and the callbacks (replaced, never changed)."""

    __slots__ = ("fd", "callbacks")

    def __init__(self, fd: int):
        self.fd = fd
        self.callbacks: Tuple[Callable[[], None], ...] = ()


class EventfdPoller:
    """The watch thread and the guard thread of a server's eventfds (see the module)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._stopping = False
        # The watch thread: keyed by the ClientEventfd (or the fd for direct callers).
        self._watched: Dict[object, _Watched] = {}
        self._unwatched: List[int] = []  # duplicates no longer watched, for the watch thread to close
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: Optional[threading.Thread] = None
        self._watch_exited = False
        self._watch_set_changed = False  # for the watch thread to update its poll set
        # The guard thread.
        self._gwake_r, self._gwake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._guard: Optional[threading.Thread] = None
        #: signals under way: eventfd -> when its write started.  Signalling threads add and
        #: remove entries without the lock (the eventfd's own lock orders them); the guard reads
        #: it under the lock, which keeps a listed fd open (release() forgets under it first).
        self.inline: Dict[ClientEventfd, float] = {}
        #: the guard thread runs (until the server stops)
        self.guarding = False

    # -- watches -----------------------------------------------------------------------
    def add(self, fd: int, callback: Callable[[], None], key: object = None) -> Callable[[], None]:
        if key is None:
            key = fd
        with self._lock:
            if self._stopping:
                raise VfioError(errno.ESHUTDOWN, "the server is stopping")
            watched = self._watched.get(key)
            if watched is None:
                watched = self._watched[key] = _Watched(os.dup(fd))
                self._watch_set_changed = True
            watched.callbacks += (callback,)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cuse-vfio-eventfd", daemon=True)
                self._thread.start()
        _wake(self._wake_w)

        def cancel() -> None:
            # Never waits (the caller may hold a lock a running callback wants):
            # the watch thread closes its duplicate once it no longer polls it.
            with self._lock:
                if self._watched.get(key) is not watched or callback not in watched.callbacks:
                    return
                i = watched.callbacks.index(callback)
                watched.callbacks = watched.callbacks[:i] + watched.callbacks[i + 1:]
                if watched.callbacks:
                    return
                del self._watched[key]
                self._watch_set_changed = True
                if self._watch_exited:
                    _close(watched.fd)
                    return
                self._unwatched.append(watched.fd)
            _wake(self._wake_w)

        return cancel

    def _run(self) -> None:
        # One poll set, changed only when the watched eventfds change (not each interrupt).
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        by_fd: Dict[int, _Watched] = {}
        try:
            while True:
                with self._lock:
                    closing, self._unwatched = self._unwatched, []
                    if self._stopping:
                        break
                    now = None
                    if self._watch_set_changed:
                        self._watch_set_changed = False
                        now = {w.fd: w for w in self._watched.values()}
                if now is not None:
                    for fd in by_fd.keys() - now.keys():
                        poller.unregister(fd)
                    for fd in now.keys() - by_fd.keys():
                        poller.register(fd, select.POLLIN)
                    by_fd = now
                for fd in closing:  # out of the poll set above, nor in any later one
                    _close(fd)
                for fd, mask in poller.poll():
                    if fd == self._wake_r:
                        _drain(self._wake_r)
                        continue
                    watched = by_fd[fd]
                    with self._lock:
                        # Under the lock (the read never blocks): once cancel()
                        # returned, a later write stays unread by the server.
                        if watched.fd in self._unwatched or not self._consume(fd):
                            continue
                        callbacks = watched.callbacks
                    for callback in callbacks:
                        try:
                            callback()
                        except Exception:
                            log.exception("eventfd %d: watch callback failed", fd)
        finally:
            with self._lock:
                self._watch_exited = True
                closing = self._unwatched + [w.fd for w in self._watched.values()]
                self._unwatched = []
                self._watched.clear()
            for fd in closing:
                _close(fd)

    @staticmethod
    def _consume(fd: int) -> bool:
        # RWF_NOWAIT: the fd's O_NONBLOCK belongs to the client's open file
        # description too, so it must not be changed; a nowait read never
        # blocks even if someone else consumed the count first.
        try:
            os.preadv(fd, [bytearray(8)], -1, os.RWF_NOWAIT)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP:
                os.read(fd, 8)
                return True
            return False

    # -- the guard of signals ------------------------------------------------------------
    def start_guard(self) -> bool:
        """The guard thread runs from the first signal on; False once the server is stopping."""
        with self._lock:
            if not self._stopping and self._guard is None:
                self._guard = threading.Thread(target=self._guard_run, name="cuse-vfio-eventfd-guard", daemon=True)
                self._guard.start()
                self.guarding = True
            return self.guarding

    def forget(self, key: "ClientEventfd") -> None:
        """``key`` is being released: once this returns, the guard no longer reads its fd."""
        with self._lock:
            self.inline.pop(key, None)  # (its signal returned already: nothing is listed)

    def _guard_run(self) -> None:
        wake = select.poll()
        wake.register(self._gwake_r, select.POLLIN)
        while not self._stopping:
            # A timeout, so a signal a client blocks is seen (see the module).
            if wake.poll(_INLINE_PATIENCE * 1000):
                _drain(self._gwake_r)
            if self.inline:
                self._unblock_inline()

    def _unblock_inline(self) -> None:
        """Consume the counter a signal has waited on too long, so its write completes."""
        stale = time.monotonic() - _INLINE_PATIENCE
        # Under the lock: an fd listed now stays open until it is released (release()
        # forgets its eventfd under this lock before it closes the fd).  The read never
        # blocks.  A snapshot: signalling threads add and remove entries without the lock.
        with self._lock:
            for key, since in list(self.inline.items()):
                fd = key.fd  # -1: released since, so that write is over
                if since < stale and fd >= 0:
                    log.warning("%r: a signal waited on a full counter for over %.0f s (the client made its "
                                "eventfd blocking and filled it); its count is consumed", key, _INLINE_PATIENCE)
                    self._consume(fd)

    # -- teardown ----------------------------------------------------------------------
    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self.guarding = False
            threads = [(self._thread, self._wake_r, self._wake_w), (self._guard, self._gwake_r, self._gwake_w)]
        for _, _, w in threads:
            _wake(w)
        for thread, r, w in threads:
            if thread is not None:
                thread.join(timeout=5)
                if thread.is_alive():
                    # Stuck in a callback: it still uses its pipe.
                    log.warning("%s did not stop; leaving it", thread.name)
                    continue
            _close(r)
            _close(w)
        with self._lock:  # duplicates of a watch thread that never started
            if self._thread is None:
                for watched in self._watched.values():
                    _close(watched.fd)
                self._watched.clear()


def _wake(fd: int) -> None:
    try:
        os.write(fd, b"x")
    except (BlockingIOError, OSError):
        pass


def _drain(fd: int) -> None:
    try:
        os.read(fd, 4096)
    except (BlockingIOError, OSError):
        pass
