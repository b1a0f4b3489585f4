"""The hand-off socket: device fds to clients by SCM_RIGHTS, and the memory behind their mmaps.

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

FUSE cannot share the model's pages through an mmap of a device file, so the
library also asks here when its process maps a device fd: the ``mapper``
(the server) looks at the fd *in the peer's own fd table*, so a process is
answered only for a device file it holds, and answers with the memfd of the
region and the offset in it; the library maps that memfd.  The peer's table
is reached through a pidfd taken when it connected (SO_PEERPIDFD, or
pidfd_open of its SO_PEERCRED pid where the kernel predates 6.5), so a
connection handed to another process after its own died, whose pid came
back as someone else's, asks about nobody's fds.

The protocol (csrc/handoff.h is its one definition; the ctypes structs below
are checked against it by tests/test_uapi_layout.py), on a stream
connection in the host's byte order: the server greets with ``HELLO``; then
any number of requests, each a u32 first:

* ``>= TOKEN_MIN``: a token.  Answer: ``cv_token_reply`` (i32 status, 0 or an
  errno), with the device fd by SCM_RIGHTS when it is 0; then, once the
  server has closed its own copy of that fd, ``CLOSED`` (one byte), which the
  library waits for: the client's close is then the last one, and the
  device file's release is queued when it returns, as the kernel's close has
  released a VFIO device by then.
* ``OP_MMAP``: the rest of a ``cv_mmap_request`` (i32 fd, i32 prot, i32
  flags, u64 offset, u64 length: the caller's mmap arguments).  Answer:
  ``cv_mmap_reply`` (i32 status: 0, an errno, or ``NOT_MINE``: not a device
  file of this server, map it as any file; u32 reserved; u64 start in the
  memfd), the memfd by SCM_RIGHTS when 0.

The socket is reachable by every local user (its directory is 0711): the
peer's pid, never the socket's mode, decides what it gets.  The thread never
waits for one client: requests are read without blocking, and a peer that
sends garbage, floods or does not read its answers is disconnected.
"""

from __future__ import annotations

import array
import ctypes
import errno
import logging
import os
import secrets
import selectors
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, cast

from ..errors import VfioError
from ..memory import pidfd_open

log = logging.getLogger(__name__)

# -- the wire format of csrc/handoff.h ---------------------------------------------
#: Tokens live above any fd number (fs.nr_open is at most 2^30 - 8), so the
#: library can tell a token from a real kernel fd, and a request's first u32
#: from an operation.
TOKEN_MIN = 1 << 30          # CV_TOKEN_MIN
HELLO = b"R"                 # CV_HANDOFF_HELLO
CLOSED = b"C"                # CV_HANDOFF_CLOSED
OP_MMAP = 1                  # CV_OP_MMAP
#: An mmap answer: the fd is no device file of this server (the library maps it itself).
NOT_MINE = -1                # CV_NOT_MINE


class cv_token_reply(ctypes.Structure):
    _fields_ = [("status", ctypes.c_int32)]


class cv_mmap_request(ctypes.Structure):
    _fields_ = [("op", ctypes.c_uint32), ("fd", ctypes.c_int32), ("prot", ctypes.c_int32),
                ("flags", ctypes.c_int32), ("offset", ctypes.c_uint64), ("length", ctypes.c_uint64)]


class cv_mmap_reply(ctypes.Structure):
    _fields_ = [("status", ctypes.c_int32), ("reserved", ctypes.c_uint32), ("start", ctypes.c_uint64)]


#: the structs of this format, by their C name (the layout test compiles each)
WIRE_STRUCTS = {c.__name__: c for c in (cv_token_reply, cv_mmap_request, cv_mmap_reply)}
#: its constants, by their C name
WIRE_CONSTANTS = {"CV_TOKEN_MIN": TOKEN_MIN, "CV_HANDOFF_HELLO": HELLO[0], "CV_HANDOFF_CLOSED": CLOSED[0],
                  "CV_OP_MMAP": OP_MMAP,
                  "CV_NOT_MINE": NOT_MINE}

_CODES = {ctypes.c_uint32: "I", ctypes.c_int32: "i", ctypes.c_uint64: "Q"}


def _packing(ctype) -> struct.Struct:
    """A struct.Struct that packs ``ctype``'s fields in order (the format has no padding: checked)."""
    fmt = "=" + "".join(_CODES[t] for _, t in ctype._fields_)
    packing = struct.Struct(fmt)
    if packing.size != ctypes.sizeof(ctype):
        raise TypeError(f"{ctype.__name__} has padding: give it explicit fields")
    return packing


_U32 = struct.Struct("=I")  # the first word of every request
_STATUS = _packing(cv_token_reply)
MMAP_REQUEST = _packing(cv_mmap_request)   # op, fd, prot, flags, offset, length
MMAP_REPLY = _packing(cv_mmap_reply)       # status, reserved, start
_UCRED = struct.Struct("3i")
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5
#: Connections one user may hold at once; more are refused, so that nobody can
#: keep the others from their device fds by opening connections.
MAX_CONNECTIONS_PER_UID = 64
_MAX_BUFFERED = 4096


class NotADeviceFile(Exception):
    """What a mapper raises for an fd that is not one of the server's device files."""


@dataclass
class Peer:
    """The process at the other end of a connection, as it was when it connected."""

    pid: int
    uid: int
    pidfd: int  # what to take its fds through (pidfd_getfd): never another process
    buf: bytearray = field(default_factory=bytearray)


#: ``mapper(peer, fd, offset, length, prot, flags) -> (memfd, start)``: the memfd
#: stays the mapper's (it is only sent).  Raises VfioError or NotADeviceFile.
Mapper = Callable[[Peer, int, int, int, int, int], Tuple[int, int]]


@dataclass
class _Offer:
    token: int
    pid: int
    fd: int
    what: str
    deadline: float


class Handoff:
    """The socket, its thread, and the tokens on offer."""

    def __init__(self, path: str, ttl: float = 5.0, mapper: Optional[Mapper] = None):
        self.path = path
        self.ttl = ttl
        self.mapper = mapper
        self._lock = threading.Lock()
        self._offers: Dict[int, _Offer] = {}
        self._clients: Dict[socket.socket, Peer] = {}
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
        # Any local user may connect (the directory is 0711): the peer's pid,
        # not the socket's mode, decides who gets which fd.
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
        for conn, peer in list(self._clients.items()):
            conn.close()
            os.close(peer.pidfd)
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
            return any(peer.pid == pid for peer in self._clients.values())

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

    def connections(self) -> int:
        with self._lock:
            return len(self._clients)

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
                        self._serve(cast(socket.socket, key.fileobj))  # only connections are registered so
                except Exception:
                    log.exception("fd hand-off: request failed")
            self._expire()

    def _accept(self) -> None:
        assert self._listener is not None  # registered only once listening
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        with self._lock:
            held = sum(1 for peer in self._clients.values() if peer.uid == uid)
        if held >= MAX_CONNECTIONS_PER_UID:
            log.warning("fd hand-off: uid %d (pid %d) already holds %d connections: refused", uid, pid, held)
            conn.close()
            return
        pidfd = _peer_pidfd(conn, pid)
        if pidfd is None:
            conn.close()  # it is gone already
            return
        with self._lock:
            self._clients[conn] = Peer(pid, uid, pidfd)
        conn.setblocking(False)
        self._sel.register(conn, selectors.EVENT_READ, "client")
        if not self._send(conn, [HELLO]):
            self._drop(conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(_MAX_BUFFERED)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        peer = self._clients.get(conn)
        if not data or peer is None:
            self._drop(conn)
            return
        buf = peer.buf
        buf += data
        while len(buf) >= _U32.size:
            (op,) = _U32.unpack_from(buf)
            if op >= TOKEN_MIN:
                del buf[:_U32.size]
                ok = self._redeem(conn, peer, op)
            elif op == OP_MMAP:
                if len(buf) < MMAP_REQUEST.size:
                    break
                _, fd, prot, flags, offset, length = MMAP_REQUEST.unpack_from(buf)
                del buf[:MMAP_REQUEST.size]
                ok = self._map(conn, peer, fd, offset, length, prot, flags)
            else:
                log.warning("fd hand-off: pid %d sent request %d, which is none of ours: disconnected", peer.pid, op)
                ok = False
            if not ok:
                self._drop(conn)
                return
        if len(buf) > _MAX_BUFFERED:
            self._drop(conn)

    def _redeem(self, conn: socket.socket, peer: Peer, token: int) -> bool:
        """Send the fd behind ``token``; False (the connection is dropped) on any refusal."""
        pid = peer.pid
        try:
            # As map_device_file: the process that connected must still be
            # the one alive under its pid (not a child that inherited the
            # connection after it exited, nor a reuse of the pid).
            signal.pidfd_send_signal(peer.pidfd, 0)
        except ProcessLookupError:
            log.warning("fd hand-off: pid %d has exited, but its connection presented a token: refused", pid)
            self._send(conn, [_STATUS.pack(errno.ESRCH)])
            return False
        except OSError as e:
            if e.errno != errno.EPERM:  # EPERM: alive, only not ours to signal
                log.warning("fd hand-off: pid %d cannot be checked (%s): refused", pid, e.strerror)
                self._send(conn, [_STATUS.pack(errno.ESRCH)])
                return False
        with self._lock:
            offer = self._offers.get(token)
            if offer is not None and offer.pid == pid:
                del self._offers[token]
        if offer is None:
            # No second guess on the same connection.
            log.warning("fd hand-off: pid %s presented token %d, which is unknown or expired: disconnected", pid, token)
            self._send(conn, [_STATUS.pack(errno.ENOENT)])
            return False
        if offer.pid != pid:
            log.warning("fd hand-off: pid %s presented the token of pid %d (%s): refused, disconnected",
                        pid, offer.pid, offer.what)
            self._send(conn, [_STATUS.pack(errno.EPERM)])
            return False
        try:
            sent = self._send(conn, [_STATUS.pack(0)], offer.fd)
        finally:
            # The fd in flight keeps the open alive; ours must go, or the
            # client's close would never be the last one.
            os.close(offer.fd)
        # The library returns the fd to its caller only now: a close the client makes at once is the last.
        sent = sent and self._send(conn, [CLOSED])
        log.debug("fd hand-off: %s sent to pid %d", offer.what, pid)
        return sent

    def _map(self, conn: socket.socket, peer: Peer, fd: int, offset: int, length: int, prot: int, flags: int) -> bool:
        memfd, start, pid = None, 0, peer.pid
        if self.mapper is None:
            status = NOT_MINE
        else:
            try:
                memfd, start = self.mapper(peer, fd, offset, length, prot, flags)
                status = 0
            except NotADeviceFile:
                status = NOT_MINE
            except VfioError as e:
                log.info("pid %d: mmap of fd %d at 0x%x (+0x%x): %s", pid, fd, offset, length, e.strerror)
                status = e.errno
            except Exception:
                log.exception("pid %d: mmap of fd %d failed inside the server", pid, fd)
                status = errno.EIO
        return self._send(conn, [MMAP_REPLY.pack(status, 0, start)], memfd)

    @staticmethod
    def _send(conn: socket.socket, parts, fd: Optional[int] = None) -> bool:
        """One answer, whole or not at all; False when the peer is gone or does not read."""
        ancillary = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        size = sum(len(p) for p in parts)
        try:
            sent = conn.sendmsg(parts, ancillary)
        except BlockingIOError:
            log.warning("fd hand-off: a client does not read its answers: disconnected")
            return False
        except OSError as e:
            log.warning("fd hand-off: the client went away before its answer: %s", e.strerror)
            return False
        return sent == size

    def _drop(self, conn: socket.socket) -> None:
        try:
            self._sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        with self._lock:
            peer = self._clients.pop(conn, None)
            orphans = []
            if peer is not None and not any(p.pid == peer.pid for p in self._clients.values()):
                # The process has no connection left: nobody can redeem its tokens.
                orphans = [o for o in self._offers.values() if o.pid == peer.pid]
                for o in orphans:
                    del self._offers[o.token]
        conn.close()
        if peer is not None:
            os.close(peer.pidfd)
        for offer in orphans:
            self._discard(offer, f"pid {offer.pid} closed its hand-off connection without fetching it")

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


def _peer_pidfd(conn: socket.socket, pid: int) -> Optional[int]:
    """A pidfd of the process that connected; None when it has exited."""
    try:
        return conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as e:
        if e.errno == errno.ESRCH:
            return None
        if e.errno != errno.ENOPROTOOPT:
            raise
    # Before 6.5: the pid, looked up at once (the peer is blocked waiting for
    # the greeting, so it is very likely still the process that connected).
    try:
        return pidfd_open(pid)
    except VfioError:
        return None
