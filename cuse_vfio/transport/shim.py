"""Python face of the C shim (``_shim``, built from csrc/): sessions, the loop, replies.

C errors become ``TransportError`` here, at the boundary; requests arrive
through four callbacks and are routed by session id to the ``SessionOps``
that created the session: reads and writes with their fields decoded by the
shim (the hot path of a device fd), ioctls and every other kind as ``struct
cv_request``.
"""

from __future__ import annotations

import errno
import itertools
import logging
import threading
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

try:
    from ._shim import ffi, lib
except ImportError as _e:  # pragma: no cover - only without a build
    raise ImportError(f"the cuse-vfio C shim is not built ({_e}): run ./scripts/bootstrap "
                      "(pip install -e . builds it; it needs gcc, pkg-config and libfuse3-dev)") from None

log = logging.getLogger(__name__)
_libfuse_log = logging.getLogger("cuse_vfio.transport.libfuse")

OP_LOOKUP = lib.CV_OP_LOOKUP
OP_GETATTR = lib.CV_OP_GETATTR
OP_OPEN = lib.CV_OP_OPEN
OP_READ = lib.CV_OP_READ
OP_WRITE = lib.CV_OP_WRITE
OP_RELEASE = lib.CV_OP_RELEASE
OP_IOCTL = lib.CV_OP_IOCTL
OP_READDIR = lib.CV_OP_READDIR
OP_INIT_DONE = lib.CV_OP_INIT_DONE
OP_SESSION_END = lib.CV_OP_SESSION_END

MAX_IOV = lib.CV_IOCTL_MAX_IOV
MAX_BYTES = lib.CV_IOCTL_MAX_BYTES


class TransportError(RuntimeError):
    """Serving could not start or continue; the message is one sentence naming the fix."""


# -- the callbacks ------------------------------------------------------------------
class SessionOps(Protocol):
    """What serves a session's requests (a file system's ``FileOps``); each answers its request."""

    def serve(self, r) -> None:
        """Every kind but read, write and ioctl: ``r`` is the ``struct cv_request``."""

    def ioctl(self, r) -> None:
        """An ioctl, as a ``struct cv_request``."""

    def read(self, req, fh: int, size: int, off: int, pid: int) -> None:
        """A read of ``size`` bytes at ``off`` of open ``fh``, by thread ``pid``; ``req`` is answered
        with ``reply_buf`` or ``reply_err``."""

    def write(self, req, fh: int, data: bytes, off: int, pid: int) -> None:
        """A write of ``data`` at ``off`` of open ``fh``; answered with ``reply_write`` or ``reply_err``."""


_handlers: Dict[int, SessionOps] = {}
_sids = itertools.count(1)

#: The plain replies, as the C functions themselves (a read or write is answered exactly once, in line)
reply_err = lib.fuse_reply_err
reply_buf = lib.fuse_reply_buf
reply_write = lib.fuse_reply_write


@ffi.def_extern()
def cv_py_log(level, message):
    text = ffi.string(message).decode("utf-8", "replace")
    py_level = logging.ERROR if level <= 3 else logging.WARNING if level == 4 else \
        logging.INFO if level <= 6 else logging.DEBUG
    _libfuse_log.log(py_level, "libfuse: %s", text)


# Each callback is the last line of defence: the handlers answer their own failures, so the loop survives.
@ffi.def_extern()
def cv_py_request(r):
    ops = _handlers.get(r.sid)
    if ops is None:
        if r.req != ffi.NULL:
            lib.fuse_reply_err(r.req, errno.EIO)
        return
    try:
        ops.serve(r)
    except BaseException:
        log.exception("request handler failed")


@ffi.def_extern()
def cv_py_ioctl(r):
    ops = _handlers.get(r.sid)
    if ops is None:
        lib.fuse_reply_err(r.req, errno.EIO)
        return
    try:
        ops.ioctl(r)
    except BaseException:
        log.exception("request handler failed")


@ffi.def_extern()
def cv_py_read(sid, req, fh, size, off, pid):
    ops = _handlers.get(sid)
    if ops is None:
        lib.fuse_reply_err(req, errno.EIO)
        return
    try:
        ops.read(req, fh, size, off, pid)
    except BaseException:
        log.exception("request handler failed")


@ffi.def_extern()
def cv_py_write(sid, req, fh, buf, size, off, pid):
    ops = _handlers.get(sid)
    if ops is None:
        lib.fuse_reply_err(req, errno.EIO)
        return
    try:
        # the bytes, copied out of libfuse's buffer (valid only during this call)
        ops.write(req, fh, ffi.unpack(buf, size) if size else b"", off, pid)
    except BaseException:
        log.exception("request handler failed")


# -- requests -----------------------------------------------------------------------
class Request:
    """One kernel request to answer exactly once, from any thread."""

    __slots__ = ("req", "replied")

    def __init__(self, req):
        self.req = req
        self.replied = False

    def _take(self) -> bool:
        if self.replied:
            log.error("a request was answered twice; the second answer is dropped")
            return False
        self.replied = True
        return True

    # The replies of every request (err, buf, write, ioctl) test ``replied`` themselves: one call less.
    def err(self, err: int) -> None:
        if self.replied:
            self._take()
        else:
            self.replied = True
            lib.fuse_reply_err(self.req, err)

    def ok(self) -> None:
        self.err(0)

    def entry(self, ino: int, mode: int, uid: int, gid: int, size: int, timeout: float) -> None:
        if self._take():
            lib.cv_reply_entry(self.req, ino, mode, uid, gid, size, timeout)

    def attr(self, ino: int, mode: int, uid: int, gid: int, size: int, timeout: float) -> None:
        if self._take():
            lib.cv_reply_attr(self.req, ino, mode, uid, gid, size, timeout)

    def open(self, fh: int, direct_io: bool = True, nonseekable: bool = False) -> None:
        if self._take():
            lib.cv_reply_open(self.req, fh, int(direct_io), int(nonseekable))

    def buf(self, data: bytes) -> None:
        if self.replied:
            self._take()
        else:
            self.replied = True
            lib.fuse_reply_buf(self.req, data, len(data))

    def write(self, count: int) -> None:
        if self.replied:
            self._take()
        else:
            self.replied = True
            lib.fuse_reply_write(self.req, count)

    def dir(self, entries: Sequence[Tuple[str, int, int]], off: int, size: int) -> None:
        """readdir: (name, ino, mode) entries, from entry ``off`` on, at most ``size`` bytes."""
        if not self._take():
            return
        names = [ffi.new("char[]", name.encode()) for name, _, _ in entries]
        lib.cv_reply_dir(self.req, ffi.new("const char *[]", names), ffi.new("uint64_t[]", [e[1] for e in entries]),
                         ffi.new("uint32_t[]", [e[2] for e in entries]), len(entries), off, size)

    def ioctl(self, result: int, data: bytes = b"") -> None:
        if self.replied:
            self._take()
        elif data:
            self.replied = True
            lib.cv_reply_ioctl(self.req, result, data, len(data))
        else:
            self.replied = True
            lib.cv_reply_ioctl(self.req, result, ffi.NULL, 0)

    def ioctl_retry(self, ranges: Sequence[Tuple[int, int]]) -> int:
        """Ask for ``ranges`` both ways; -errno (nothing sent) when the kernel's limits forbid it."""
        addrs = ffi.new("uint64_t[]", [a for a, _ in ranges])
        lens = ffi.new("uint64_t[]", [n for _, n in ranges])
        rc = lib.cv_reply_ioctl_retry(self.req, addrs, lens, len(ranges), addrs, lens, len(ranges))
        if rc != -errno.ENOMEM:
            self.replied = True
        return rc


# -- sessions and the loop ----------------------------------------------------------
def _error(buf) -> str:
    return ffi.string(buf).decode("utf-8", "replace")


class Session:
    """One kernel connection: a FUSE mount or a CUSE device."""

    def __init__(self, kind: str, ptr, sid: int, where: str):
        self.kind = kind
        self.ptr = ptr
        self.sid = sid
        self.where = where
        #: FUSE: (major, minor) of the mount made, once the runtime looked (``top_device``)
        self.device: Optional[Tuple[int, int]] = None

    @classmethod
    def fuse(cls, mountpoint: str, options: str, ops: SessionOps) -> "Session":
        sid = next(_sids)
        _handlers[sid] = ops
        err = ffi.new("char[]", 512)
        ptr = lib.cv_fuse_session_new(sid, mountpoint.encode(), options.encode(), err, 512)
        if ptr == ffi.NULL:
            del _handlers[sid]
            raise TransportError(_error(err))
        return cls("fuse", ptr, sid, mountpoint)

    @classmethod
    def cuse(cls, devname: str, ops: SessionOps) -> "Session":
        sid = next(_sids)
        _handlers[sid] = ops
        err = ffi.new("char[]", 512)
        ptr = lib.cv_cuse_session_new(sid, devname.encode(), err, 512)
        if ptr == ffi.NULL:
            del _handlers[sid]
            raise TransportError(_error(err))
        return cls("cuse", ptr, sid, devname)

    def free(self) -> None:
        """Unmount (FUSE) and close; only when the loop is stopped."""
        if self.ptr is not None:
            lib.cv_session_free(self.ptr)
            self.ptr = None
        _handlers.pop(self.sid, None)


class Loop:
    """The one serving loop; ``run`` blocks (without the GIL) until ``stop``, or until a handler on
    its thread calls ``retire`` (another thread took over): 0, 1 when retired, -errno."""

    def __init__(self):
        err = ffi.new("char[]", 256)
        self.ptr = lib.cv_loop_new(err, 256)
        if self.ptr == ffi.NULL:
            raise TransportError(f"cannot create the serving loop: {_error(err)}")
        self.sessions: List[Session] = []
        self.thread_ident: Optional[int] = None
        #: > 0 while the loop thread serves requests inside another one's (``drain``)
        self.nested = 0

    def add(self, session: Session) -> None:
        if lib.cv_loop_add(self.ptr, session.ptr) != 0:
            raise TransportError("too many sessions for one serving loop")
        self.sessions.append(session)

    def run(self) -> int:
        self.thread_ident = threading.get_ident()
        return lib.cv_loop_run(self.ptr)

    def stop(self) -> None:
        lib.cv_loop_stop(self.ptr)

    @staticmethod
    def retire() -> None:
        """From a handler: the calling thread leaves the loop once its request ends."""
        lib.cv_loop_retire()

    def drain(self, session: Session) -> int:
        """Process what ``session`` has queued now; only from a handler on the loop thread."""
        if session.ptr is None:
            return 0
        self.nested += 1
        try:
            return lib.cv_loop_drain(self.ptr, session.ptr)
        finally:
            self.nested -= 1

    def free(self) -> None:
        if self.ptr is not None:
            lib.cv_loop_free(self.ptr)
            self.ptr = None


def payload(ptr, size: int) -> bytes:
    """Copy request data out of libfuse's buffer (valid only during the callback)."""
    return ffi.buffer(ptr, size)[:] if size else b""


def name_of(ptr) -> str:
    return ffi.string(ptr).decode("utf-8", "surrogateescape")


def is_null(ptr) -> bool:
    return ptr == ffi.NULL


__all__: List[str] = [
    "Loop", "Request", "Session", "SessionOps", "TransportError", "payload", "name_of", "is_null",
    "reply_buf", "reply_err", "reply_write",
]
