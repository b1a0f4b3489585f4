"""Device fds: files on a FUSE mount of their own, opened only by the server and handed to clients.

They exist in both modes, because CUSE drops read/write offsets and has no
mmap.  GET_DEVICE_FD's ``install_fd`` lands in ``offer``: the server opens a
fresh file for the device (only the server may open one), and the hand-off
socket gives that open to the client's preload library for a one-time
token.  A name lives only until the server's own open: nothing else can
ever look one up.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import threading
from typing import TYPE_CHECKING, Dict, Optional

from ..errors import VfioError
from ..memory import tgid_of
from .fsops import FUSE_OPTIONS, NODE_TIMEOUT, ROOT_INO, FileOps, Inode
from .shim import Request, Session, name_of

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger(__name__)


def _maps_library(pid: int, library: str) -> bool:
    """Whether process ``pid`` has ``library`` mapped (it was preloaded), as /proc/<pid>/maps says."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            return any(line.rstrip().endswith(library.encode()) for line in maps)
    except OSError:
        return False


class DeviceFiles(FileOps):
    """The device-file mount (``mountpoint``, 0700 inside the runtime directory)."""

    def __init__(self, server: "Server"):
        super().__init__(server)
        self.session: Optional[Session] = None
        self._lock = threading.Lock()
        self._inodes: Dict[int, Inode] = {}    # device files that exist right now
        self._names: Dict[str, int] = {}
        self._pending: Dict[int, object] = {}  # ino -> DeviceFile waiting for the server's open
        self._inos = itertools.count(2)

    @property
    def mountpoint(self) -> str:
        return self.server.device_mount

    def mount(self) -> Session:
        self.session = Session.fuse(self.mountpoint, FUSE_OPTIONS.format(name="cuse-vfio-devices"),
                                    self)
        return self.session

    def offer(self, pid: int, devfile: object) -> int:
        """GET_DEVICE_FD's install_fd: open a device file for ``devfile``, keep it for ``pid``, return the token."""
        server = self.server
        handoff = server.runtime.handoff
        assert handoff is not None, "the runtime is started"
        if not handoff.has_client(pid):
            name = getattr(getattr(devfile, "device", None), "name", "the device")
            library = os.path.basename(server.preload_library)
            if _maps_library(pid, library):
                log.warning("pid %d asked for a device fd of %s: its %s is loaded but never reached the "
                            "hand-off socket, so it cannot receive one: give it CUSE_VFIO_SOCKET=%s and make "
                            "sure every directory above that socket is searchable for its user", pid, name,
                            library, server.socket_path)
            else:
                log.warning("pid %d asked for a device fd of %s without the fd hand-off library, so it "
                            "cannot receive one: start it with `cuse-vfio run -- CMD`, or with LD_PRELOAD=%s "
                            "and CUSE_VFIO_SOCKET=%s in its environment", pid, name, server.preload_library,
                            server.socket_path)
            raise VfioError(errno.EOPNOTSUPP, f"pid {pid} cannot receive a device fd: no {library} "
                                              "connection from it")
        device_name = getattr(getattr(devfile, "device", None), "name", "device")
        with self._lock:
            ino = next(self._inos)
            name = f"{device_name}.{ino}"
            self._inodes[ino] = Inode(ino, name, stat.S_IFREG | 0o600)
            self._names[name] = ino
            self._pending[ino] = devfile
        try:
            fd = os.open(os.path.join(self.mountpoint, name), os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            with self._lock:
                self._pending.pop(ino, None)
                self._inodes.pop(ino, None)
            raise VfioError(errno.EIO, f"the server cannot open its device file {name}: {e.strerror}") from None
        finally:
            with self._lock:
                self._names.pop(name, None)
        # From here the open owns devfile: closing fd releases it.
        return handoff.offer(pid, fd, f"{device_name} for pid {pid}")

    def forget(self, ino: int) -> None:
        """The open of device file ``ino`` ended: the file is gone."""
        with self._lock:
            inode = self._inodes.pop(ino, None)
            if inode is not None:
                self._names.pop(inode.name, None)

    def drop_pending(self) -> None:
        """Stopping: files offered but never opened are dropped with their DeviceFile."""
        with self._lock:
            self._pending.clear()

    # -- FileOps -----------------------------------------------------------------------
    def lookup(self, rq: Request, r) -> None:
        ino = self._names.get(name_of(r.name)) if r.ino == ROOT_INO else None
        if ino is None:
            rq.err(errno.ENOENT)
        else:
            # Never cached: each name is opened once, by the server.
            rq.entry(ino, stat.S_IFREG | 0o600, 0, 0, 0, 0.0)

    def getattr(self, rq: Request, r) -> None:
        if r.ino == ROOT_INO:
            rq.attr(ROOT_INO, stat.S_IFDIR | 0o700, 0, 0, 0, NODE_TIMEOUT)
        elif r.ino in self._inodes:
            rq.attr(r.ino, stat.S_IFREG | 0o600, 0, 0, 0, 1.0)
        else:
            rq.err(errno.ENOENT)

    def readdir(self, rq: Request, r) -> None:
        rq.dir([(".", ROOT_INO, stat.S_IFDIR), ("..", ROOT_INO, stat.S_IFDIR)], r.off, r.size)

    def open(self, rq: Request, r) -> None:
        # Only the server opens device files (offer); a client gets them by hand-off.
        if tgid_of(r.pid) != os.getpid():
            rq.err(errno.EACCES)
            return
        with self._lock:
            devfile = self._pending.pop(r.ino, None)
        if devfile is None:
            rq.err(errno.ENOENT)
            return
        handle = self.server.handles.new(devfile, self.session, r.ino)
        rq.open(handle.fh, direct_io=True, nonseekable=False)

    def session_end(self, r) -> None:
        if not self.server.runtime.stopping:
            log.error("the device-file mount %s went away (unmounted from outside?)", self.mountpoint)
