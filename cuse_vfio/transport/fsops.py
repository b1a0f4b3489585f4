"""One table of operations per file system, and the one router that serves a request through it.

As libfuse's ``fuse_lowlevel_ops``: each of our file systems (the CUSE node
devices, the FUSE mount of the nodes, the FUSE mount of device files) is a
``FileOps`` subclass with a method per kind of request; the shim calls its
``read``, ``write`` and ``ioctl`` directly and ``serve`` for every other
kind.  What every file system answers the same way is here: reads and
writes go to the ops their open bound (``Handle.read``/``write``, the
dispatcher's ``region_ops``), RELEASE to the handle table, ioctls to the
ioctl path; anything a file system does not implement is ENOSYS.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from ..dispatch import Node
from ..errors import VfioError
from ..uapi import NodeKind
from .caller import RequestCaller
from .shim import (
    OP_GETATTR,
    OP_INIT_DONE,
    OP_IOCTL,
    OP_LOOKUP,
    OP_OPEN,
    OP_READ,
    OP_READDIR,
    OP_RELEASE,
    OP_SESSION_END,
    OP_WRITE,
    Request,
    Session,
    is_null,
    reply_buf,
    reply_err,
    reply_write,
)

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger(__name__)

ROOT_INO = 1
_GROUP = NodeKind.GROUP  # (an enum's member is costly to look up on every ioctl)
NODE_TIMEOUT = 3600.0  # nodes never change behind the kernel's back
FUSE_OPTIONS = "allow_other,default_permissions,fsname={name},subtype=vfio"


@dataclass
class Inode:
    ino: int
    name: str
    mode: int
    uid: int = 0
    gid: int = 0
    node: Optional[Node] = None


class FileOps:
    """The operations of one file system; a method per request kind the loop delivers."""

    def __init__(self, server: "Server"):
        self.server = server
        #: request kind -> this table's bound method, looked up once (``serve`` runs for every request)
        self._methods = {op: getattr(self, name) for op, name in _METHODS.items()}
        #: fh -> Handle or None (the handle table's own lookup)
        self._get = server.handles.get
        ioctls = server.ioctls
        self._ioctl = ioctls.unrestricted if self.unrestricted_ioctls else ioctls.restricted

    # -- what a file system answers itself (ENOSYS unless it does) ---------------------
    def lookup(self, rq: Request, r) -> None:
        rq.err(errno.ENOSYS)

    def getattr(self, rq: Request, r) -> None:
        rq.err(errno.ENOSYS)

    def readdir(self, rq: Request, r) -> None:
        rq.err(errno.ENOSYS)

    def open(self, rq: Request, r) -> None:
        rq.err(errno.ENOSYS)

    def init_done(self, r) -> None:
        """CUSE created the device (no request to answer)."""

    def session_end(self, r) -> None:
        """The kernel side went away (no request to answer)."""

    # -- what every file system answers the same way -----------------------------------
    #: CUSE ioctls are unrestricted (the argument comes with retries); a FUSE file's are restricted
    unrestricted_ioctls = False

    def ioctl(self, r) -> None:
        rq = Request(r.req)
        try:
            handle = self._get(r.fh)
            if handle is None:
                rq.err(errno.EBADF)
                return
            if handle.kind is _GROUP:
                # close() of a device fd returns once its release is queued (the
                # hand-off closed our copy before the client got it: CV_HANDOFF_CLOSED);
                # the kernel's has run vfio_device_fops_release by then, so a group
                # ioctl right after (UNSET_CONTAINER) must see the device closed.
                self._complete_device_releases()
            self._ioctl(rq, r, handle)
        except Exception:
            log.exception("request %d (pid %d) failed inside the server", OP_IOCTL, r.pid)
            if not rq.replied:
                rq.err(errno.EIO)

    # A read or a write is answered once, in line: no Request object.
    def read(self, req, fh: int, size: int, off: int, pid: int) -> None:
        handle = self._get(fh)
        if handle is None:
            reply_err(req, errno.EBADF)
            return
        try:
            data = handle.read(size, off)
            if type(data) is not bytes:
                data = bytes(data)
            reply_buf(req, data, len(data))
        except VfioError as e:
            reply_err(req, e.errno)
        except Exception:
            log.exception("request %d (pid %d) failed inside the server", OP_READ, pid)
            reply_err(req, errno.EIO)

    def write(self, req, fh: int, data: bytes, off: int, pid: int) -> None:
        handle = self._get(fh)
        if handle is None:
            reply_err(req, errno.EBADF)
            return
        try:
            reply_write(req, handle.write(data, off))
        except VfioError as e:
            reply_err(req, e.errno)
        except Exception:
            log.exception("request %d (pid %d) failed inside the server", OP_WRITE, pid)
            reply_err(req, errno.EIO)

    def release(self, rq: Request, r) -> None:
        self.server.release(rq, r.fh, r.sid)

    def _complete_device_releases(self) -> None:
        """Serve the releases queued on the device-file mount now (only from a node's handler)."""
        loop, device_session = self.server.runtime.loop, self.server.device_files.session
        assert loop is not None and device_session is not None  # both exist while serving
        loop.drain(device_session)

    def open_node(self, rq: Request, r, session: Session, inode: Inode) -> None:
        """OPEN of the container node or a group node: the core's open, then a handle."""
        server = self.server
        node = inode.node
        assert node is not None  # the caller opens only inodes with a node
        if node.group_id is not None:
            # A device fd's release travels on the device-file mount and may
            # still be queued there after its process died; it must count
            # before this open does, as the kernel's exit would have
            # completed it (a killed client's group opens again at once).
            self._complete_device_releases()
        try:
            file_object = server.dispatcher.open(node, RequestCaller(server, r.pid, r.uid))
        except VfioError as e:
            log.info("pid %d: open %s: %s", r.pid, inode.name, e.strerror)
            rq.err(e.errno)
            return
        handle = server.handles.new(file_object, session, inode.ino)
        rq.open(handle.fh, direct_io=True, nonseekable=True)


    def serve(self, r) -> None:
        """Every request but read, write and ioctl (the shim calls those methods directly)."""
        op = r.op
        method = self._methods.get(op)
        if method is None:
            if op == OP_INIT_DONE:
                self.init_done(r)
            elif op == OP_SESSION_END:
                self.session_end(r)
            else:
                Request(r.req).err(errno.ENOSYS)
            return
        rq = Request(r.req)
        try:
            method(rq, r)
        except Exception:
            log.exception("request %d (pid %d) failed inside the server", r.op, r.pid)
            if not rq.replied and not is_null(r.req):
                rq.err(errno.EIO)


#: request kind -> the FileOps method that answers it (through ``serve``)
_METHODS = {
    OP_LOOKUP: "lookup", OP_GETATTR: "getattr", OP_READDIR: "readdir", OP_OPEN: "open", OP_RELEASE: "release",
}
