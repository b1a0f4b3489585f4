"""Device fds to clients: one-time tokens redeemed over a Unix socket with SCM_RIGHTS.

A FUSE or CUSE server cannot create an fd in its caller, so
VFIO_GROUP_GET_DEVICE_FD answers with a token and the server keeps the
device file open meanwhile.  The client's LD_PRELOAD library
(csrc/preload.c) connects before making the ioctl and waits for the
greeting, so at ioctl time the server knows this process can receive an fd;
after the ioctl it sends the token and receives the fd.

A token is good once, only for the process (tgid, by SO_PEERCRED) that
asked, and only for ``ttl`` seconds, or until that process's last
connection closes.  A token that is not redeemed has its device file
closed, which releases the device fd as the client's close would.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import secrets
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Dict, Optional

log = logging.getLogger(__name__)

#: Tokens live above any fd number (fs.nr_open is at most 2^30 - 8), so the
#: library can tell a token from a real kernel fd.
TOKEN_MIN = 1 << 30
HELLO = b"R"
_TOKEN = struct.Struct("<I")
_STATUS = struct.Struct("<i")
_UCRED = struct.Struct("3i")


@dataclass
class _Offer:
    token: int
    pid: int
    fd: int
    what: str
    deadline: float


class Handoff:
    """The socket, its thread, and the tokens on offer."""

    def __init__(self, path: str, ttl: float = 5.0):
        self.path = path
        self.ttl = ttl
        self._lock = threading.Lock()
        self._offers: Dict[int, _Offer] = {}
        self._clients: Dict[socket.socket, int] = {}  # connection -> peer pid
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._listener: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        listener.bind(self.path)
        # Anyone who can reach the (0700) directory may connect; the peer's
        # pid, not the socket's mode, decides who gets which fd.
        os.chmod(self.path, 0o666)
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        self._sel.register(listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name="cuse-vfio-handoff", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close every offer (releasing its device file) and the socket."""
        with self._lock:
            self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            offers, self._offers = list(self._offers.values()), {}
        for offer in offers:
            self._discard(offer, "the server is stopping")
        for conn in list(self._clients):
            conn.close()
        self._clients.clear()
        if self._listener is not None:
            self._listener.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- what the caller side asks ----------------------------------------
    def has_client(self, pid: int) -> bool:
        """Whether process ``pid`` is connected (its ioctl went through the preload library)."""
        with self._lock:
            return pid in self._clients.values()

    def offer(self, pid: int, fd: int, what: str) -> int:
        """Keep ``fd`` for process ``pid``; the token it redeems it with. Takes ownership of ``fd``."""
        with self._lock:
            if self._stopping:
                os.close(fd)
                raise OSError(errno.ESHUTDOWN, "the server is stopping")
            while True:
                token = TOKEN_MIN + secrets.randbelow(TOKEN_MIN)
                if token not in self._offers:
                    break
            self._offers[token] = _Offer(token, pid, fd, what, time.monotonic() + self.ttl)
        self._wake()  # a new deadline
        return token

    def pending(self) -> int:
        with self._lock:
            return len(self._offers)

    # -- the thread ----------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                deadline = min((o.deadline for o in self._offers.values()), default=None)
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            for key, _ in self._sel.select(timeout):
                try:
                    if key.data == "wake":
                        os.read(self._wake_r, 4096)
                    elif key.data == "listen":
                        self._accept()
                    else:
                        self._serve(key.fileobj)
                except Exception:
                    log.exception("fd hand-off: request failed")
            self._expire()

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        pid, _uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        conn.setblocking(True)
        conn.settimeout(2.0)
        with self._lock:
            self._clients[conn] = pid
        self._sel.register(conn, selectors.EVENT_READ, "client")
        try:
            conn.sendall(HELLO)
        except OSError:
            self._drop(conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(_TOKEN.size, socket.MSG_WAITALL)
        except OSError:
            data = b""
        if len(data) != _TOKEN.size:
            self._drop(conn)
            return
        (token,) = _TOKEN.unpack(data)
        with self._lock:
            pid = self._clients.get(conn)
            offer = self._offers.get(token)
            if offer is not None and offer.pid == pid:
                del self._offers[token]
        if offer is None:
            log.warning("fd hand-off: pid %s presented token %d, which is unknown or expired", pid, token)
            self._reply(conn, errno.ENOENT)
            return
        if offer.pid != pid:
            log.warning("fd hand-off: pid %s presented the token of pid %d (%s): refused", pid, offer.pid, offer.what)
            self._reply(conn, errno.EPERM)
            return
        try:
            self._reply(conn, 0, offer.fd)
        finally:
            # The fd in flight keeps the open alive; ours must go, or the
            # client's close would never be the last one.
            os.close(offer.fd)
        log.debug("fd hand-off: %s sent to pid %d", offer.what, pid)

    @staticmethod
    def _reply(conn: socket.socket, status: int, fd: Optional[int] = None) -> None:
        ancillary = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        try:
            conn.sendmsg([_STATUS.pack(status)], ancillary)
        except OSError as e:
            log.warning("fd hand-off: the client went away before its answer: %s", e.strerror)

    def _drop(self, conn: socket.socket) -> None:
        try:
            self._sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        with self._lock:
            pid = self._clients.pop(conn, None)
            orphans = []
            if pid is not None and pid not in self._clients.values():
                # The process has no connection left: nobody can redeem its tokens.
                orphans = [o for o in self._offers.values() if o.pid == pid]
                for o in orphans:
                    del self._offers[o.token]
        conn.close()
        for offer in orphans:
            self._discard(offer, f"pid {pid} closed its hand-off connection without fetching it")

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [o for o in self._offers.values() if o.deadline <= now]
            for o in expired:
                del self._offers[o.token]
        for offer in expired:
            self._discard(offer, f"pid {offer.pid} did not fetch it within {self.ttl:g} s")

    @staticmethod
    def _discard(offer: _Offer, why: str) -> None:
        log.warning("device fd of %s released: %s", offer.what, why)
        # Closing our only copy is the client's close: the file's release
        # releases the device fd in the core.
        os.close(offer.fd)
