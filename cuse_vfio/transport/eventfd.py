"""A client's eventfd, fetched into the server: interrupts signal it, unmask eventfds are watched.

``ClientEventfd`` is what ``caller.get_eventfd(fd)`` returns (the kernel's
``eventfd_ctx``): ``signal()`` adds to the counter the client (or KVM, or
QEMU's irqfd) reads; ``watch(callback)`` is the other direction, used for
INTx unmask eventfds the client writes.  One ``EventfdPoller`` thread serves
every watch of a server.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import struct
import threading
from typing import Callable, Dict, List, Optional

from ..errors import VfioError

log = logging.getLogger(__name__)
_COUNT = struct.Struct("<Q")


def is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


class ClientEventfd:
    """One fetched eventfd; owns its fd until ``release``."""

    def __init__(self, fd: int, poller: "EventfdPoller", owner: str = ""):
        self.fd = fd
        self.poller = poller
        self.owner = owner
        self._watches: List[Callable[[], None]] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ClientEventfd(fd={self.fd}{', ' + self.owner if self.owner else ''})"

    def signal(self, value: int = 1) -> None:
        fd = self.fd
        if fd < 0:
            return
        try:
            os.write(fd, _COUNT.pack(value))
        except BlockingIOError:
            pass  # the counter is saturated: the client has not read it, an interrupt is pending anyway
        except OSError as e:
            log.warning("%r: signal failed: %s", self, e.strerror)

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` each time the client writes the eventfd; returns the cancel function."""
        if self.fd < 0:
            raise VfioError(errno.EBADF, f"{self!r} is released")
        cancel = self.poller.add(self.fd, callback)
        with self._lock:
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
            os.close(fd)


class EventfdPoller:
    """A thread that waits for any watched eventfd to become readable, consumes it, calls back."""

    def __init__(self):
        self._lock = threading.Lock()
        self._watches: Dict[int, List[Callable[[], None]]] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._idle = threading.Condition(self._lock)
        self._polling: frozenset = frozenset()

    def add(self, fd: int, callback: Callable[[], None]) -> Callable[[], None]:
        with self._lock:
            if self._stopping:
                raise VfioError(errno.ESHUTDOWN, "the server is stopping")
            self._watches.setdefault(fd, []).append(callback)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cuse-vfio-eventfd", daemon=True)
                self._thread.start()
        self._wake()

        def cancel() -> None:
            with self._lock:
                callbacks = self._watches.get(fd)
                if callbacks and callback in callbacks:
                    callbacks.remove(callback)
                    if not callbacks:
                        del self._watches[fd]
                # The fd may be closed right after: make sure poll() lets go of it first.
                gone = fd not in self._watches
                if gone and fd in self._polling and threading.current_thread() is not self._thread:
                    self._wake()
                    self._idle.wait_for(lambda: fd not in self._polling or self._stopping, timeout=5)

        return cancel

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    self._polling = frozenset()
                    self._idle.notify_all()
                    return
                fds = frozenset(self._watches)
                self._polling = fds
                self._idle.notify_all()
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            for fd in fds:
                poller.register(fd, select.POLLIN)
            events = poller.poll()
            for fd, mask in events:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                if not self._consume(fd):
                    continue
                with self._lock:
                    callbacks = list(self._watches.get(fd, ()))
                for callback in callbacks:
                    try:
                        callback()
                    except Exception:
                        log.exception("eventfd %d: watch callback failed", fd)

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

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            thread = self._thread
        self._wake()
        if thread is not None:
            thread.join(timeout=5)
        os.close(self._wake_r)
        os.close(self._wake_w)
