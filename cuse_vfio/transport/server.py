"""The serving layer: a Dispatcher behind real nodes, CUSE devices or files on a FUSE mount.

    server = Server(machine.dispatcher, topology.groups.values(), transport="auto")
    server.start()            # the nodes exist when it returns
    ...  subprocess.run(cmd, env=server.client_env(os.environ))
    server.stop()             # unmounts, ends sessions, releases every open

One loop thread (C, csrc/shim.c) serves every session: the container and
group nodes (one CUSE device each, or one FUSE mount holding them all) and
the FUSE mount of device files, which exist in both modes because CUSE drops
read/write offsets and has no mmap.  A request is answered on the loop
thread, except the few that need the server's own files while they run
(resolving a container fd, opening a device file to hand off): those run on
a worker and are answered from there later, since doing them inline would
make the loop wait for itself.

A device fd is mapped through the hand-off socket (``map_device_file``): the
preload library asks for the memfd behind a region and maps that, since a
FUSE file cannot share the model's pages.

Clients need not be root: the runtime directory is 0711 and the hand-off
socket 0666 (what a peer gets is decided by its pid), both mounts are
``allow_other`` with ``default_permissions``, so the modes and owners the
topology gives the group nodes are what the kernel enforces.

Nothing here knows a VFIO rule: requests become Dispatcher calls, and their
answers become replies.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import logging
import mmap
import os
import secrets
import shutil
import signal
import stat
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from ..dispatch import Dispatcher, Node, RetryRequest, node_kind
from ..errors import VfioError
from ..memory import PAGE_SIZE, ProcessMemory, pidfd_getfd, tgid_of
from ..mounts import detach
from ..uapi.ioctls import (
    VFIO_DEVICE_PCI_HOT_RESET,
    VFIO_GROUP_GET_DEVICE_FD,
    VFIO_GROUP_SET_CONTAINER,
    NodeKind,
)
from .caller import RequestCaller
from .eventfd import EventfdPoller
from .handoff import Handoff, NotADeviceFile, Peer
from .retry import CuseIoctlArg, RetryMemory, RetryState
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
    Loop,
    Request,
    Session,
    TransportError,
    is_null,
    name_of,
    payload,
)

log = logging.getLogger(__name__)

PRELOAD_LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libcuse_vfio_preload.so")

#: The server's private "which open are you" ioctl, issued on fds fetched from
#: clients.  ';' 100+99 is past every VFIO number; the argument must be the
#: server's secret and the caller the server itself, so clients learn nothing.
VFIO_CUSE_IDENTIFY = (ord(";") << 8) | (100 + 99)

#: Ioctls that need the server's own files while they run (see module doc).
OFF_LOOP = frozenset({
    (NodeKind.GROUP, VFIO_GROUP_SET_CONTAINER),
    (NodeKind.GROUP, VFIO_GROUP_GET_DEVICE_FD),
    (NodeKind.DEVICE, VFIO_DEVICE_PCI_HOT_RESET),
})

_OFF_LOOP_BY_KIND = {kind: frozenset(cmd for k, cmd in OFF_LOOP if k is kind) for kind in NodeKind}

ROOT_INO = 1
NODE_TIMEOUT = 3600.0  # nodes never change behind the kernel's back
FUSE_OPTIONS = "allow_other,default_permissions,fsname={name},subtype=vfio"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int


@dataclass(frozen=True)
class GroupNode:
    """Who may open ``/dev/vfio/<id>``; the topology's [group.N] table."""

    id: int
    uid: int = 0
    gid: int = 0
    mode: int = 0o600


def _maps_library(pid: int, library: str) -> bool:
    """Whether process ``pid`` has ``library`` mapped (it was preloaded), as /proc/<pid>/maps says."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            return any(line.rstrip().endswith(library.encode()) for line in maps)
    except OSError:
        return False


def choose_transport(requested: str = "auto") -> Tuple[str, str]:
    """("cuse" | "fuse", why): auto takes CUSE when /dev/cuse can be opened."""
    if requested in ("cuse", "fuse"):
        return requested, f"--transport {requested}"
    if requested != "auto":
        raise TransportError(f"unknown transport {requested!r}: choose auto, cuse or fuse")
    try:
        fd = os.open("/dev/cuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return "fuse", f"/dev/cuse cannot be opened ({e.strerror}), so the nodes are files on a FUSE mount"
    os.close(fd)
    return "cuse", "/dev/cuse is available"


@dataclass
class _Inode:
    ino: int
    name: str
    mode: int
    uid: int = 0
    gid: int = 0
    node: Optional[Node] = None


class _Handle:
    """One open of one of our files: what the kernel's struct file holds as private_data."""

    __slots__ = ("fh", "file_object", "kind", "off_loop", "session", "ino", "busy", "released")

    def __init__(self, fh: int, file_object: object, session: Session, ino: int = 0):
        self.fh = fh
        self.file_object = file_object
        self.kind = node_kind(file_object)
        self.off_loop = _OFF_LOOP_BY_KIND.get(self.kind, frozenset())
        self.session = session
        self.ino = ino
        self.busy = 0          # requests running on workers, like fdget references
        self.released = False  # RELEASE arrived


class Server:
    """Serves one Dispatcher as VFIO nodes (see module doc)."""

    #: How long stop() waits for in-flight requests, and then for the serving loop.
    STOP_TIMEOUT = 10.0

    def __init__(self, dispatcher: Dispatcher, groups: Iterable[Union[int, GroupNode, object]], *,
                 transport: str = "auto", dev_dir: Optional[str] = None, runtime_dir: Optional[str] = None,
                 container_mode: int = 0o666, handoff_ttl: float = 5.0, workers: int = 4):
        self.dispatcher = dispatcher
        self.groups: List[GroupNode] = sorted((_group_node(g) for g in groups), key=lambda g: g.id)
        self.requested_transport = transport
        self.transport, self.transport_reason = choose_transport(transport)
        self.dev_dir = os.path.abspath(dev_dir or "/dev/vfio")
        self.container_mode = container_mode
        self._runtime_dir_arg = runtime_dir
        self.runtime_dir: Optional[str] = None
        self.handoff_ttl = handoff_ttl
        self._workers_count = workers

        self._secret = secrets.randbits(62) | 1
        self._lock = threading.Lock()
        self._handles: Dict[int, _Handle] = {}
        self._fhs = itertools.count(1)
        self._retries: Dict[Tuple[int, int], RetryState] = {}
        self._loop: Optional[Loop] = None
        self._loop_thread: Optional[threading.Thread] = None
        self._workers: Optional[ThreadPoolExecutor] = None
        self._handoff: Optional[Handoff] = None
        self.eventfd_poller: Optional[EventfdPoller] = None
        self._sessions: List[Session] = []
        self._nodes_session: Optional[Session] = None
        self._devices_session: Optional[Session] = None
        self._cuse_nodes: Dict[int, _Inode] = {}      # sid -> node of a CUSE device
        self._cuse_ready: Dict[int, threading.Event] = {}
        self._node_inodes: Dict[int, _Inode] = {}
        self._node_names: Dict[str, _Inode] = {}
        self._device_inodes: Dict[int, _Inode] = {}    # device files that exist right now
        self._device_names: Dict[str, int] = {}
        self._pending_devices: Dict[int, object] = {}  # ino -> DeviceFile waiting for the server's open
        self._device_inos = itertools.count(2)
        self._our_devs: set = set()                   # st_dev of our mounts
        self._our_rdevs: set = set()                  # st_rdev of our CUSE nodes
        self._device_dev: Optional[int] = None        # st_dev of the device-file mount
        self._device_mount_id: Optional[int] = None   # and its mount id
        self._created_dev_dir = False
        self._created_runtime_dir = False
        self._started = False
        self._stopping = False

    # -- what the CLI reads ----------------------------------------------------
    @property
    def container_path(self) -> str:
        return os.path.join(self.dev_dir, "vfio")

    def group_path(self, group_id: int) -> str:
        return os.path.join(self.dev_dir, str(group_id))

    @property
    def node_paths(self) -> Dict[str, str]:
        """"vfio" and each group id -> the path a client opens."""
        paths = {"vfio": self.container_path}
        paths.update((str(g.id), self.group_path(g.id)) for g in self.groups)
        return paths

    @property
    def device_mount(self) -> str:
        """The FUSE mount device fds are files of (inside the 0711 runtime dir, 0700 itself)."""
        return os.path.join(self.runtime_dir or "", "devices")

    @property
    def socket_path(self) -> str:
        return os.path.join(self.runtime_dir or "", "handoff.sock")

    @property
    def preload_library(self) -> str:
        return PRELOAD_LIBRARY

    def client_env(self, base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
        """The environment a client needs; with ``base``, that environment merged into it."""
        env = dict(base) if base is not None else {}
        preload = self.preload_library
        if env.get("LD_PRELOAD"):
            preload = f"{preload} {env['LD_PRELOAD']}"
        env["LD_PRELOAD"] = preload
        env["CUSE_VFIO_SOCKET"] = self.socket_path
        return env

    def describe(self) -> str:
        return (f"{self.transport.upper()} transport ({self.transport_reason}); nodes in {self.dev_dir}; "
                f"device files on {self.device_mount}; hand-off socket {self.socket_path}")

    # -- lifecycle ---------------------------------------------------------------
    def __enter__(self) -> "Server":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if self._started:
            raise TransportError("the server is already started")
        self._started = True
        if not os.path.exists(PRELOAD_LIBRARY):
            raise TransportError(f"{PRELOAD_LIBRARY} is missing: rebuild with ./scripts/bootstrap")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        log.info("serving: %s", self.describe())

    def _start(self) -> None:
        self._make_runtime_dir()
        self.eventfd_poller = EventfdPoller()
        self._handoff = Handoff(self.socket_path, ttl=self.handoff_ttl, mapper=self.map_device_file)
        self._handoff.start()
        self._workers = ThreadPoolExecutor(max_workers=self._workers_count, thread_name_prefix="cuse-vfio-worker")
        self._loop = Loop()

        os.makedirs(self.device_mount, mode=0o700, exist_ok=True)
        self._devices_session = Session.fuse(self.device_mount, FUSE_OPTIONS.format(name="cuse-vfio-devices"),
                                             self._on_devices_request)
        self._add_session(self._devices_session)

        if self.transport == "fuse":
            self._build_node_inodes()
            if not os.path.isdir(self.dev_dir):
                os.makedirs(self.dev_dir, mode=0o755)
                self._created_dev_dir = True
            self._nodes_session = Session.fuse(self.dev_dir, FUSE_OPTIONS.format(name="cuse-vfio"),
                                               self._on_nodes_request)
            self._add_session(self._nodes_session)
        else:
            self._start_cuse_sessions()

        self._loop_thread = threading.Thread(target=self._serve, name="cuse-vfio-loop", daemon=True)
        self._loop_thread.start()

        if self.transport == "cuse":
            self._finish_cuse_nodes()
        else:
            self._our_devs.add(os.stat(self.dev_dir).st_dev)
        self._device_dev = os.stat(self.device_mount).st_dev
        root = os.open(self.device_mount, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._device_mount_id = _fd_mount_id(os.getpid(), root)
        finally:
            os.close(root)
        self._our_devs.add(self._device_dev)

    def _make_runtime_dir(self) -> None:
        if self._runtime_dir_arg:
            os.makedirs(self._runtime_dir_arg, mode=0o700, exist_ok=True)
            self.runtime_dir = os.path.abspath(self._runtime_dir_arg)
        else:
            base = "/run" if os.access("/run", os.W_OK) else None
            self.runtime_dir = tempfile.mkdtemp(prefix="cuse-vfio.", dir=base)
            self._created_runtime_dir = True
        # Every local user must reach the hand-off socket by its name (a client
        # need not be root), but nobody lists or changes what is in here.
        os.chmod(self.runtime_dir, 0o711)

    def _add_session(self, session: Session) -> None:
        self._sessions.append(session)
        self._loop.add(session)

    def _serve(self) -> None:
        rc = self._loop.run()
        if rc != 0 and not self._stopping:
            log.error("the serving loop stopped: %s", os.strerror(-rc))

    def stop(self) -> None:
        """Unmount, end every session, release every open; safe to call twice or after a failed start."""
        if self._stopping:
            return
        self._stopping = True
        # 1. Let in-flight deferred requests finish while the loop still serves
        #    them, for a bounded time: a worker stuck (in a client's own FUSE
        #    file, say) is left behind.
        if self._workers is not None:
            self._workers.shutdown(wait=False)
            deadline = time.monotonic() + self.STOP_TIMEOUT
            for worker in list(getattr(self._workers, "_threads", ())):
                worker.join(max(0.0, deadline - time.monotonic()))
                if worker.is_alive():
                    log.error("%s is still busy after %g s: stopping without it", worker.name, self.STOP_TIMEOUT)
        # 2. Unredeemed device files are closed, which the loop turns into releases.
        if self._handoff is not None:
            self._handoff.stop()
        # 3. Stop the loop, then the kernel connections (nothing can reply to them any more).
        if self._loop is not None:
            self._loop.stop()
        if self._loop_thread is not None:
            self._loop_thread.join(timeout=self.STOP_TIMEOUT)
            if self._loop_thread.is_alive():
                # The sessions cannot be freed under the loop; at least leave nothing mounted.
                log.error("the serving loop did not stop; its mounts are detached, sessions left to process exit")
                self._detach_mounts()
                return
        for session in reversed(self._sessions):
            session.free()
        self._sessions.clear()
        if self._loop is not None:
            self._loop.free()
        # 4. Whatever clients still hold is gone now: release it like their exit would.
        with self._lock:
            handles = sorted(self._handles.values(), key=_release_order)
            self._handles.clear()
            self._pending_devices.clear()
        for handle in handles:
            self._release_file(handle)
        if self.eventfd_poller is not None:
            self.eventfd_poller.stop()
        if self._created_dev_dir:
            _rmdir_quietly(self.dev_dir)
        if self.runtime_dir:
            _rmdir_quietly(self.device_mount)
            if self._created_runtime_dir:
                shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def _detach_mounts(self) -> None:
        """Lazily unmount every FUSE mount of ours, without a lookup its (stuck) daemon would answer."""
        for session in self._sessions:
            if session.kind != "fuse":
                continue
            try:
                detach(session.where)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: not mounted (any more)
                    log.error("cannot detach %s: %s", session.where, os.strerror(e.errno))

    # -- CUSE nodes ----------------------------------------------------------------
    def _cuse_prefix(self) -> str:
        rel = os.path.relpath(self.dev_dir, "/dev")
        if rel.startswith("..") or rel == ".":
            raise TransportError(f"CUSE nodes appear under /dev: --dev-dir {self.dev_dir} must be a directory "
                                 "below /dev such as /dev/vfio (or use --transport fuse)")
        return rel

    def _start_cuse_sessions(self) -> None:
        prefix = self._cuse_prefix()
        if os.path.exists(self.container_path):
            raise TransportError(f"{self.container_path} already exists (the vfio module?): "
                                 "choose another --dev-dir such as /dev/cuse-vfio")
        nodes = [_Inode(0, "vfio", stat.S_IFCHR | self.container_mode, node=Node.container())]
        nodes += [_Inode(0, str(g.id), stat.S_IFCHR | g.mode, g.uid, g.gid, Node.group(g.id)) for g in self.groups]
        for inode in nodes:
            session = Session.cuse(f"{prefix}/{inode.name}", self._on_cuse_request)
            self._cuse_nodes[session.sid] = inode
            self._cuse_ready[session.sid] = threading.Event()
            self._add_session(session)

    def _finish_cuse_nodes(self) -> None:
        deadline = time.monotonic() + 10
        for sid, ready in self._cuse_ready.items():
            inode = self._cuse_nodes[sid]
            if not ready.wait(max(0.0, deadline - time.monotonic())) or inode.ino < 0:
                raise TransportError(f"CUSE did not create {self.dev_dir}/{inode.name}: is the name taken?")
        for inode in self._cuse_nodes.values():
            path = os.path.join(self.dev_dir, inode.name)
            # devtmpfs creates the node while the kernel handles our CUSE_INIT
            # reply; a /dev without devtmpfs needs it made from sysfs.
            st = _wait_for_node(path, inode.name, self._cuse_prefix())
            os.chown(path, inode.uid, inode.gid)
            os.chmod(path, inode.mode & 0o7777)
            self._our_rdevs.add(st.st_rdev)

    def _on_cuse_request(self, r) -> None:
        op = r.op
        if op == OP_INIT_DONE:
            self._cuse_ready[r.sid].set()
            return
        if op == OP_SESSION_END:
            inode = self._cuse_nodes.get(r.sid)
            if inode is not None and not self._stopping:
                log.error("CUSE device %s/%s went away (%s)", self.dev_dir, inode.name,
                          os.strerror(-r.size) if r.size else "closed")
                inode.ino = -1
                self._cuse_ready[r.sid].set()
            return
        rq = Request(r.req)
        try:
            if op == OP_IOCTL:
                handle = self._handles.get(r.fh)
                if handle is None:
                    rq.err(errno.EBADF)
                else:
                    self._ioctl(rq, r, handle, cuse=True)
            elif op == OP_OPEN:
                self._open_node(rq, r, self._session_of(r.sid), self._cuse_nodes[r.sid])
            else:
                self._common(rq, r)
        except Exception:
            self._fail(rq, r)

    # -- FUSE nodes ------------------------------------------------------------------
    def _build_node_inodes(self) -> None:
        inodes = [_Inode(ROOT_INO, "", stat.S_IFDIR | 0o755),
                  _Inode(2, "vfio", stat.S_IFREG | self.container_mode, node=Node.container())]
        inodes += [_Inode(3 + i, str(g.id), stat.S_IFREG | g.mode, g.uid, g.gid, Node.group(g.id))
                   for i, g in enumerate(self.groups)]
        self._node_inodes = {i.ino: i for i in inodes}
        self._node_names = {i.name: i for i in inodes if i.ino != ROOT_INO}

    def _on_nodes_request(self, r) -> None:
        rq = Request(r.req)
        try:
            op = r.op
            if op == OP_IOCTL:
                handle = self._handles.get(r.fh)
                if handle is None:
                    rq.err(errno.EBADF)
                else:
                    self._fuse_ioctl(rq, r, handle)
            elif op == OP_LOOKUP:
                inode = self._node_names.get(name_of(r.name)) if r.ino == ROOT_INO else None
                if inode is None:
                    rq.err(errno.ENOENT)
                else:
                    rq.entry(inode.ino, inode.mode, inode.uid, inode.gid, 0, NODE_TIMEOUT)
            elif op == OP_GETATTR:
                inode = self._node_inodes.get(r.ino)
                if inode is None:
                    rq.err(errno.ENOENT)
                else:
                    rq.attr(inode.ino, inode.mode, inode.uid, inode.gid, 0, NODE_TIMEOUT)
            elif op == OP_READDIR:
                if r.ino != ROOT_INO:
                    rq.err(errno.ENOTDIR)
                else:
                    entries = [(".", ROOT_INO, stat.S_IFDIR), ("..", ROOT_INO, stat.S_IFDIR)]
                    entries += [(i.name, i.ino, i.mode) for i in self._node_names.values()]
                    rq.dir(entries, r.off, r.size)
            elif op == OP_OPEN:
                inode = self._node_inodes.get(r.ino)
                if inode is None or inode.node is None:
                    rq.err(errno.EISDIR if r.ino == ROOT_INO else errno.ENOENT)
                else:
                    self._open_node(rq, r, self._nodes_session, inode)
            elif op == OP_SESSION_END:
                if not self._stopping:
                    log.error("the FUSE mount %s went away (unmounted from outside?)", self.dev_dir)
            else:
                self._common(rq, r)
        except Exception:
            self._fail(rq, r)

    # -- device files ------------------------------------------------------------------
    def _on_devices_request(self, r) -> None:
        rq = Request(r.req)
        try:
            op = r.op
            if op == OP_IOCTL:
                handle = self._handles.get(r.fh)
                if handle is None:
                    rq.err(errno.EBADF)
                else:
                    self._fuse_ioctl(rq, r, handle)
            elif op == OP_LOOKUP:
                ino = self._device_names.get(name_of(r.name)) if r.ino == ROOT_INO else None
                if ino is None:
                    rq.err(errno.ENOENT)
                else:
                    # Never cached: each name is opened once, by the server.
                    rq.entry(ino, stat.S_IFREG | 0o600, 0, 0, 0, 0.0)
            elif op == OP_GETATTR:
                if r.ino == ROOT_INO:
                    rq.attr(ROOT_INO, stat.S_IFDIR | 0o700, 0, 0, 0, NODE_TIMEOUT)
                elif r.ino in self._device_inodes:
                    rq.attr(r.ino, stat.S_IFREG | 0o600, 0, 0, 0, 1.0)
                else:
                    rq.err(errno.ENOENT)
            elif op == OP_READDIR:
                rq.dir([(".", ROOT_INO, stat.S_IFDIR), ("..", ROOT_INO, stat.S_IFDIR)], r.off, r.size)
            elif op == OP_OPEN:
                self._open_device_file(rq, r)
            elif op == OP_SESSION_END:
                if not self._stopping:
                    log.error("the device-file mount %s went away (unmounted from outside?)", self.device_mount)
            else:
                self._common(rq, r)
        except Exception:
            self._fail(rq, r)

    def _open_device_file(self, rq: Request, r) -> None:
        # Only the server opens device files (offer_device_file); a client gets them by hand-off.
        if tgid_of(r.pid) != os.getpid():
            rq.err(errno.EACCES)
            return
        with self._lock:
            devfile = self._pending_devices.pop(r.ino, None)
            if devfile is None:
                rq.err(errno.ENOENT)
                return
            handle = self._new_handle(devfile, self._devices_session, r.ino)
        rq.open(handle.fh, direct_io=True, nonseekable=False)

    def offer_device_file(self, pid: int, devfile: object) -> int:
        """GET_DEVICE_FD's install_fd: open a device file for ``devfile``, keep it for ``pid``, return the token."""
        if not self._handoff.has_client(pid):
            name = getattr(getattr(devfile, "device", None), "name", "the device")
            library = os.path.basename(self.preload_library)
            if _maps_library(pid, library):
                log.warning("pid %d asked for a device fd of %s: its %s is loaded but never reached the "
                            "hand-off socket, so it cannot receive one: give it CUSE_VFIO_SOCKET=%s and make "
                            "sure every directory above that socket is searchable for its user", pid, name,
                            library, self.socket_path)
            else:
                log.warning("pid %d asked for a device fd of %s without the fd hand-off library, so it "
                            "cannot receive one: start it with `cuse-vfio run -- CMD`, or with LD_PRELOAD=%s "
                            "and CUSE_VFIO_SOCKET=%s in its environment", pid, name, self.preload_library,
                            self.socket_path)
            raise VfioError(errno.EOPNOTSUPP, f"pid {pid} cannot receive a device fd: no {library} "
                                              "connection from it")
        device_name = getattr(getattr(devfile, "device", None), "name", "device")
        with self._lock:
            ino = next(self._device_inos)
            name = f"{device_name}.{ino}"
            self._device_inodes[ino] = _Inode(ino, name, stat.S_IFREG | 0o600)
            self._device_names[name] = ino
            self._pending_devices[ino] = devfile
        try:
            fd = os.open(os.path.join(self.device_mount, name), os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            with self._lock:
                self._pending_devices.pop(ino, None)
                self._device_inodes.pop(ino, None)
            raise VfioError(errno.EIO, f"the server cannot open its device file {name}: {e.strerror}") from None
        finally:
            with self._lock:
                self._device_names.pop(name, None)
        # From here the open owns devfile: closing fd releases it.
        return self._handoff.offer(pid, fd, f"{device_name} for pid {pid}")

    # -- mmap of a device fd (the hand-off thread asks for the preload library) --------------
    def map_device_file(self, peer: Peer, fd: int, offset: int, length: int, prot: int,
                        flags: int) -> Tuple[int, int]:
        """The hand-off's mapper: ``(memfd, start)`` for the peer's ``mmap(.., prot, flags, fd, offset)``.

        The fd is taken from the peer's own table (pidfd_getfd) and known
        by its open, as SET_CONTAINER's container fd is, so a process is
        answered only for a device file it holds.  Then do_mmap's checks for a
        file, and the device's own (DeviceFile.mmap).  The memfd stays the
        model's: the hand-off only sends it.  NotADeviceFile for anything but
        one of our device files: the library maps that as the kernel would.

        Any local user may ask, about any fd of theirs, so nothing is done to
        the fd before its mount says it is ours: an fstat or a close of a file
        on a FUSE mount of their own would wait for their daemon, and with it
        every hand-off.  The mount is read from /proc/<pid>/fdinfo, which
        never reaches the file system, and the peer's pidfd vouches that the
        pid still was the peer's while it was read.
        """
        pid = peer.pid
        if fd < 0:
            raise VfioError(errno.EBADF, f"{fd} is not a file descriptor")
        mount_id = _fd_mount_id(pid, fd)
        try:
            signal.pidfd_send_signal(peer.pidfd, 0)
        except ProcessLookupError:
            raise VfioError(errno.ESRCH, f"pid {pid} has exited") from None
        if mount_id is None:
            raise VfioError(errno.EBADF, f"fd {fd} is not open in pid {pid}")
        if mount_id != self._device_mount_id:
            raise NotADeviceFile(f"fd {fd} of pid {pid} is not a device file of this server")
        mine = pidfd_getfd(peer.pidfd, fd)
        try:
            st = os.fstat(mine)
            if not stat.S_ISREG(st.st_mode) or st.st_dev != self._device_dev:
                raise NotADeviceFile(f"fd {fd} of pid {pid} is not a device file of this server")
            file_object = self.identify(mine, f"fd {fd} of pid {pid}")
            if node_kind(file_object) is not NodeKind.DEVICE:
                raise NotADeviceFile(f"fd {fd} of pid {pid} is not a device fd")
            length, shared = file_mmap_rules(offset, length, prot, flags, fcntl.fcntl(mine, fcntl.F_GETFL))
            memory, start = file_object.mmap(offset, length, shared=shared)
            try:
                memfd = memory.fileno()
            except ValueError:  # the model closed it: the device is going away
                raise VfioError(errno.ENODEV, f"the memory of fd {fd} of pid {pid} is gone") from None
            self._check_seals(memfd, file_object)
            log.debug("pid %d: mmap of fd %d at 0x%x (+0x%x): memfd at 0x%x", pid, fd, offset, length, start)
            return memfd, start
        finally:
            self.close_fetched(mine)

    @staticmethod
    def _check_seals(memfd: int, file_object: object) -> None:
        # The client gets the memfd itself.  Unless it is sealed against
        # shrinking, a client that truncates it makes the model's own mapping
        # of it fault, and SIGBUS ends the whole server: such memory is never
        # handed out.  (devices.SharedMemory seals what it creates.)
        try:
            seals = fcntl.fcntl(memfd, _F_GET_SEALS)
        except OSError:
            seals = 0
        if not seals & _F_SEAL_SHRINK:
            log.error("%r: its mappable memory is a memfd not sealed against shrinking, which a client could "
                      "truncate and crash this server; mmap refused (create it with MFD_ALLOW_SEALING and "
                      "add F_SEAL_SHRINK | F_SEAL_GROW, as devices.SharedMemory does)", file_object)
            raise VfioError(errno.EPERM, f"{file_object!r}: mappable memory is not sealed")

    # -- requests every kind of node answers the same way -----------------------------
    def _common(self, rq: Request, r) -> None:
        op = r.op
        if op == OP_RELEASE:
            self._release(rq, r.fh, r.sid)
        elif op == OP_READ:
            handle = self._handle(r.fh)
            if handle is None:
                rq.err(errno.EBADF)
                return
            try:
                data = self.dispatcher.read(handle.file_object, r.size, r.off)
            except VfioError as e:
                rq.err(e.errno)
                return
            rq.buf(bytes(data))
        elif op == OP_WRITE:
            handle = self._handle(r.fh)
            if handle is None:
                rq.err(errno.EBADF)
                return
            data = payload(r.in_buf, r.in_size)
            try:
                count = self.dispatcher.write(handle.file_object, data, r.off)
            except VfioError as e:
                rq.err(e.errno)
                return
            rq.write(count)
        else:
            rq.err(errno.ENOSYS)

    def _open_node(self, rq: Request, r, session: Session, inode: _Inode) -> None:
        if inode.node.group_id is not None:
            # A device fd's release travels on the device-file mount and may
            # still be queued there after its process died; it must count
            # before this open does, as the kernel's exit would have
            # completed it (a killed client's group opens again at once).
            self._loop.drain(self._devices_session)
        try:
            file_object = self.dispatcher.open(inode.node)
        except VfioError as e:
            log.info("pid %d: open %s: %s", r.pid, inode.name, e.strerror)
            rq.err(e.errno)
            return
        with self._lock:
            handle = self._new_handle(file_object, session, inode.ino)
        rq.open(handle.fh, direct_io=True, nonseekable=True)

    def _new_handle(self, file_object: object, session: Session, ino: int) -> _Handle:
        handle = _Handle(next(self._fhs), file_object, session, ino)
        self._handles[handle.fh] = handle
        return handle

    def _handle(self, fh: int) -> Optional[_Handle]:
        return self._handles.get(fh)

    def _release(self, rq: Request, fh: int, sid: int) -> None:
        with self._lock:
            handle = self._handles.pop(fh, None)
            if handle is not None:
                handle.released = True
                busy = handle.busy
            for key in [k for k, v in self._retries.items() if k[0] == sid and v.fh == fh]:
                del self._retries[key]
        if handle is not None and not busy:
            self._release_file(handle)
        rq.ok()

    def _release_file(self, handle: _Handle) -> None:
        if handle.kind is NodeKind.DEVICE:
            with self._lock:
                inode = self._device_inodes.pop(handle.ino, None)
                if inode is not None:
                    self._device_names.pop(inode.name, None)
        try:
            self.dispatcher.release(handle.file_object)
        except Exception:
            log.exception("releasing %r failed", handle.file_object)

    # -- ioctl -----------------------------------------------------------------------
    def _fuse_ioctl(self, rq: Request, r, handle: _Handle) -> None:
        """The hot path: a restricted ioctl answered on the loop thread (GET_API_VERSION, GET_STATUS...)."""
        cmd = r.cmd
        if cmd in handle.off_loop or cmd == VFIO_CUSE_IDENTIFY:
            self._ioctl(rq, r, handle, cuse=False)
            return
        tid = r.pid
        caller = RequestCaller(self, tid, r.uid)
        try:
            result = self.dispatcher.ioctl(handle.file_object, cmd,
                                           self.dispatcher.make_arg(r.arg, caller, ProcessMemory(tid)))
        finally:
            caller.done()
        rq.ioctl(result)

    def _ioctl(self, rq: Request, r, handle: _Handle, cuse: bool) -> None:
        cmd, arg = r.cmd, r.arg
        if cmd == VFIO_CUSE_IDENTIFY and arg == self._secret and tgid_of(r.pid) == os.getpid():
            rq.ioctl(handle.fh)
            return
        tid, uid = r.pid, r.uid
        in_data = payload(r.in_buf, r.in_size) if cuse else b""
        in_size, out_size = r.in_size, r.out_size
        key = (r.sid, tid)
        if cmd not in handle.off_loop:
            self._run_ioctl(rq, handle, key, cmd, arg, tid, uid, cuse, in_data, in_size, out_size)
            return
        if self._stopping or self._workers is None:
            rq.err(errno.EIO)
            return
        with self._lock:
            handle.busy += 1

        def deferred() -> None:
            try:
                self._run_ioctl(rq, handle, key, cmd, arg, tid, uid, cuse, in_data, in_size, out_size)
            except Exception:
                log.exception("pid %d: ioctl 0x%x failed inside the server", tid, cmd)
                if not rq.replied:
                    rq.err(errno.EIO)
            finally:
                self._unbusy(handle)

        try:
            self._workers.submit(deferred)
        except RuntimeError:  # shut down meanwhile
            self._unbusy(handle)
            rq.err(errno.EIO)

    def _unbusy(self, handle: _Handle) -> None:
        with self._lock:
            handle.busy -= 1
            last = handle.released and handle.busy == 0
        if last:
            self._release_file(handle)

    def _run_ioctl(self, rq: Request, handle: _Handle, key, cmd: int, arg: int, tid: int, uid: int,
                   cuse: bool, in_data: bytes, in_size: int, out_size: int) -> None:
        caller = RequestCaller(self, tid, uid)
        try:
            if not cuse:
                # FUSE: a restricted ioctl, the argument is read where it lies,
                # through the calling thread (process_vm_* take any tid of the
                # process, so the tgid is looked up only if someone asks).
                result = self.dispatcher.ioctl(handle.file_object, cmd,
                                               self.dispatcher.make_arg(arg, caller, ProcessMemory(tid)))
                rq.ioctl(result)
                return
            self._run_cuse_ioctl(rq, handle, key, cmd, arg, caller, in_data, in_size, out_size)
        finally:
            caller.done()

    def _run_cuse_ioctl(self, rq: Request, handle: _Handle, key, cmd: int, arg: int, caller: RequestCaller,
                        in_data: bytes, in_size: int, out_size: int) -> None:
        with self._lock:
            state = self._retries.pop(key, None)
        if in_size == 0 and out_size == 0:
            ranges: List[Tuple[int, int]] = []  # a new call: the kernel sends nothing first
        elif state is not None and state.matches(handle.fh, cmd, arg, in_size, out_size):
            ranges = state.ranges
        else:
            log.error("thread %d: CUSE ioctl 0x%x came back with %d/%d bytes that no retry of ours asked for",
                      key[1], cmd, in_size, out_size)
            rq.err(errno.EIO)
            return
        memory = RetryMemory(key[1], ranges, in_data)
        io_arg = CuseIoctlArg(arg, caller, memory, record=self.dispatcher.trace is not None)
        try:
            result = self.dispatcher.ioctl(handle.file_object, cmd, io_arg)
            retry = memory.incomplete
            if retry:
                log.debug("thread %d: ioctl 0x%x: a RetryRequest was caught below the dispatcher", key[1], cmd)
        except RetryRequest:
            retry = True
        if retry:
            try:
                wanted = memory.next_ranges()
            except VfioError as e:
                log.info("thread %d: ioctl 0x%x: %s", key[1], cmd, e.strerror)
                rq.err(e.errno)
                return
            with self._lock:
                self._retries[key] = RetryState(handle.fh, cmd, arg, wanted)
            rc = rq.ioctl_retry(wanted)
            if rc == -errno.ENOMEM:
                with self._lock:
                    self._retries.pop(key, None)
                rq.err(errno.ENOMEM)
            return
        rq.ioctl(result, memory.out_data())

    # -- fds of clients (RequestCaller) -----------------------------------------------
    def check_off_loop(self, what: str) -> None:
        if self._loop is not None and threading.get_ident() == self._loop.thread_ident:
            log.error("internal: %s on the serving loop would wait for the loop itself; "
                      "this ioctl belongs in transport.server.OFF_LOOP", what)
            raise VfioError(errno.EIO, f"{what} cannot be done on the serving loop")

    def identify(self, fd: int, what: str) -> object:
        """Which of our opens the (fetched) ``fd`` is: the kernel's f_op check plus private_data."""
        st = os.fstat(fd)
        ours = st.st_dev in self._our_devs if stat.S_ISREG(st.st_mode) else \
            stat.S_ISCHR(st.st_mode) and st.st_rdev in self._our_rdevs
        if not ours:
            raise VfioError(errno.EINVAL, f"{what} is not a file of this cuse-vfio server")
        fh = _libc.ioctl(fd, VFIO_CUSE_IDENTIFY, self._secret)
        handle = self._handles.get(fh) if fh > 0 else None
        if handle is None:
            raise VfioError(errno.EINVAL, f"{what} is not an open this server knows")
        return handle.file_object

    def close_fetched(self, fd: int) -> None:
        # Closing one of our own files sends FLUSH, which the loop answers:
        # never wait for it on the loop thread.
        if self._loop is not None and threading.get_ident() == self._loop.thread_ident:
            threading.Thread(target=os.close, args=(fd,), name="cuse-vfio-close", daemon=True).start()
        else:
            os.close(fd)

    # -- helpers ---------------------------------------------------------------------
    def _session_of(self, sid: int) -> Session:
        for session in self._sessions:
            if session.sid == sid:
                return session
        raise KeyError(sid)

    @staticmethod
    def _fail(rq: Request, r) -> None:
        log.exception("request %d (pid %d) failed inside the server", r.op, r.pid)
        if not rq.replied and not is_null(r.req):
            rq.err(errno.EIO)

    def open_handles(self) -> int:
        """How many opens clients hold (tests: a killed client leaves nothing)."""
        with self._lock:
            return len(self._handles)


def file_mmap_rules(offset: int, length: int, prot: int, flags: int, file_flags: int) -> Tuple[int, bool]:
    """do_mmap's checks of a file mapping before the file's own mmap: (length in whole pages, VM_SHARED).

    The system call's part of mmap(), which a FUSE file cannot get from the
    kernel once the preload library maps a memfd in its place: the offset on
    a page, a length, the mapping type, and what the file's open mode allows
    (``file_flags`` is its F_GETFL).  A shared mapping of a file open only
    for reading loses VM_SHARED, so the device's mmap sees a private one.
    """
    page = PAGE_SIZE
    if offset % page:
        raise VfioError(errno.EINVAL, f"mmap offset 0x{offset:x} is not on a page")
    if length == 0:
        raise VfioError(errno.EINVAL, "mmap of 0 bytes")
    length = (length + page - 1) // page * page
    if length >= 1 << 64:
        raise VfioError(errno.ENOMEM, "mmap length overflows")
    access = file_flags & os.O_ACCMODE
    kind = flags & 0x0F  # MAP_TYPE
    if kind in (mmap.MAP_SHARED, _MAP_SHARED_VALIDATE):
        if prot & mmap.PROT_WRITE and access == os.O_RDONLY:
            raise VfioError(errno.EACCES, "a writable shared mapping of a file not open for writing")
        shared = access != os.O_RDONLY
    elif kind == mmap.MAP_PRIVATE:
        shared = False
    else:
        raise VfioError(errno.EINVAL, f"mmap flags 0x{flags:x} are neither shared nor private")
    if access == os.O_WRONLY:
        raise VfioError(errno.EACCES, "mapping a file not open for reading")
    return length, shared


_MAP_SHARED_VALIDATE = 0x03
_F_GET_SEALS, _F_SEAL_SHRINK = 1034, 0x0002


def _fd_mount_id(pid: int, fd: int) -> Optional[int]:
    """The mount id of process ``pid``'s ``fd`` (None: no such fd), without touching the file."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as e:
        raise VfioError(e.errno, f"/proc/{pid}/fdinfo/{fd}: {e.strerror}") from None
    raise VfioError(errno.EIO, f"/proc/{pid}/fdinfo/{fd} names no mount")


def _group_node(g) -> GroupNode:
    if isinstance(g, GroupNode):
        return g
    if isinstance(g, int):
        return GroupNode(g)
    return GroupNode(int(g.id), int(getattr(g, "uid", 0)), int(getattr(g, "gid", 0)), int(getattr(g, "mode", 0o600)))


def _release_order(handle: _Handle) -> int:
    # Device fds first, then groups, then containers: the order that never
    # leaves a group waiting on a device fd.
    return {NodeKind.DEVICE: 0, NodeKind.GROUP: 1, NodeKind.CONTAINER: 2}[handle.kind]


def _rmdir_quietly(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


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
