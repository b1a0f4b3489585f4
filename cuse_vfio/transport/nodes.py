"""The container node and the group nodes: CUSE character devices, or files on one FUSE mount.

Both serve the same ``Node`` s (``vfio`` and one per group, with the owner and
mode the topology gives); they differ only in what the kernel sends.  A CUSE
device is one session each and its ioctls are unrestricted (the argument
comes through the retry protocol); the FUSE mount is one session for all,
with restricted ioctls (the argument is read where it lies).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Optional, Set

from ..dispatch import GroupNode, Node
from .fsops import FUSE_OPTIONS, NODE_TIMEOUT, ROOT_INO, FileOps, Inode
from .shim import Request, Session, TransportError, name_of

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger(__name__)


class CuseNodes(FileOps):
    """One CUSE device per node, under ``dev_dir`` (a directory below /dev)."""

    unrestricted_ioctls = True

    def __init__(self, server: "Server", dev_dir: str, container_mode: int, groups: Iterable[GroupNode]):
        super().__init__(server)
        self.dev_dir = dev_dir
        self._inodes = [Inode(0, "vfio", stat.S_IFCHR | container_mode, node=Node.container())]
        self._inodes += [Inode(0, g.name, stat.S_IFCHR | g.mode, g.uid, g.gid, Node.group(g.id)) for g in groups]
        self._by_sid: Dict[int, Inode] = {}   # sid -> node of a CUSE device
        self._sessions: Dict[int, Session] = {}
        self._ready: Dict[int, threading.Event] = {}
        #: st_rdev of our CUSE nodes
        self.rdevs: Set[int] = set()

    def prefix(self) -> str:
        rel = os.path.relpath(self.dev_dir, "/dev")
        if rel.startswith("..") or rel == ".":
            raise TransportError(f"CUSE nodes appear under /dev: --dev-dir {self.dev_dir} must be a directory "
                                 "below /dev such as /dev/vfio (or use --transport fuse)")
        return rel

    def start(self, add_session: Callable[[Session], None]) -> None:
        """A CUSE session per node, each given to ``add_session`` as it is made; the devices appear
        once the loop runs (then ``finish``)."""
        prefix = self.prefix()
        container = os.path.join(self.dev_dir, "vfio")
        if os.path.exists(container):
            raise TransportError(f"{container} already exists (the vfio module?): "
                                 "choose another --dev-dir such as /dev/cuse-vfio")
        for inode in self._inodes:
            session = Session.cuse(f"{prefix}/{inode.name}", self)
            self._by_sid[session.sid] = inode
            self._sessions[session.sid] = session
            self._ready[session.sid] = threading.Event()
            add_session(session)

    def finish(self) -> None:
        """Wait for every device, then give each node its owner and mode."""
        deadline = time.monotonic() + 10
        for sid, ready in self._ready.items():
            inode = self._by_sid[sid]
            if not ready.wait(max(0.0, deadline - time.monotonic())) or inode.ino < 0:
                raise TransportError(f"CUSE did not create {self.dev_dir}/{inode.name}: is the name taken?")
        for inode in self._by_sid.values():
            path = os.path.join(self.dev_dir, inode.name)
            # devtmpfs creates the node while the kernel handles our CUSE_INIT
            # reply; a /dev without devtmpfs needs it made from sysfs.
            st = _wait_for_node(path, inode.name, self.prefix())
            os.chown(path, inode.uid, inode.gid)
            os.chmod(path, inode.mode & 0o7777)
            self.rdevs.add(st.st_rdev)

    # -- FileOps -----------------------------------------------------------------------
    def init_done(self, r) -> None:
        self._ready[r.sid].set()

    def session_end(self, r) -> None:
        inode = self._by_sid.get(r.sid)
        if inode is not None and not self.server.runtime.stopping:
            log.error("CUSE device %s/%s went away (%s)", self.dev_dir, inode.name,
                      os.strerror(-r.size) if r.size else "closed")
            inode.ino = -1
            self._ready[r.sid].set()

    def open(self, rq: Request, r) -> None:
        self.open_node(rq, r, self._sessions[r.sid], self._by_sid[r.sid])


class NodeFiles(FileOps):
    """The nodes as regular files on a FUSE mount at ``dev_dir`` (where there is no CUSE)."""

    def __init__(self, server: "Server", dev_dir: str, container_mode: int, groups: Iterable[GroupNode]):
        super().__init__(server)
        self.dev_dir = dev_dir
        inodes = [Inode(ROOT_INO, "", stat.S_IFDIR | 0o755),
                  Inode(2, "vfio", stat.S_IFREG | container_mode, node=Node.container())]
        inodes += [Inode(3 + i, g.name, stat.S_IFREG | g.mode, g.uid, g.gid, Node.group(g.id))
                   for i, g in enumerate(groups)]
        self._inodes = {i.ino: i for i in inodes}
        self._names = {i.name: i for i in inodes if i.ino != ROOT_INO}
        self.session: Optional[Session] = None

    def mount(self) -> Session:
        session = self.session = Session.fuse(self.dev_dir, FUSE_OPTIONS.format(name="cuse-vfio"),
                                              self)
        return session

    # -- FileOps -----------------------------------------------------------------------
    def lookup(self, rq: Request, r) -> None:
        inode = self._names.get(name_of(r.name)) if r.ino == ROOT_INO else None
        if inode is None:
            rq.err(errno.ENOENT)
        else:
            rq.entry(inode.ino, inode.mode, inode.uid, inode.gid, 0, NODE_TIMEOUT)

    def getattr(self, rq: Request, r) -> None:
        inode = self._inodes.get(r.ino)
        if inode is None:
            rq.err(errno.ENOENT)
        else:
            rq.attr(inode.ino, inode.mode, inode.uid, inode.gid, 0, NODE_TIMEOUT)

    def readdir(self, rq: Request, r) -> None:
        if r.ino != ROOT_INO:
            rq.err(errno.ENOTDIR)
            return
        entries = [(".", ROOT_INO, stat.S_IFDIR), ("..", ROOT_INO, stat.S_IFDIR)]
        entries += [(i.name, i.ino, i.mode) for i in self._names.values()]
        rq.dir(entries, r.off, r.size)

    def open(self, rq: Request, r) -> None:
        inode = self._inodes.get(r.ino)
        if inode is None or inode.node is None:
            rq.err(errno.EISDIR if r.ino == ROOT_INO else errno.ENOENT)
        else:
            assert self.session is not None  # a request came on it
            self.open_node(rq, r, self.session, inode)

    def session_end(self, r) -> None:
        if not self.server.runtime.stopping:
            log.error("the FUSE mount %s went away (unmounted from outside?)", self.dev_dir)


def _wait_for_node(path: str, name: str, prefix: str, timeout: float = 5.0) -> os.stat_result:
    deadline = time.monotonic() + timeout
    while True:
        try:
            st = os.stat(path)
            if stat.S_ISCHR(st.st_mode):
                return st
        except FileNotFoundError:
            pass
        if time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    # No devtmpfs on /dev: make the node from what the CUSE class device says.
    sysfs = f"/sys/class/cuse/{prefix.replace('/', '!')}!{name}/dev"
    try:
        with open(sysfs) as f:
            major, minor = (int(x) for x in f.read().split(":"))
    except OSError:
        raise TransportError(f"CUSE created no node {path} and {sysfs} is missing") from None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(major, minor))
    return os.stat(path)
