"""The serving layer: a Dispatcher behind real nodes, CUSE devices or files on a FUSE mount.

    server = Server(machine.dispatcher, topology.groups.values(), transport="auto")
    server.start()            # the nodes exist when it returns
    ...  subprocess.run(cmd, env=server.client_env(os.environ))
    server.stop()             # unmounts, ends sessions, releases every open

One loop thread (C, csrc/shim.c) serves every session: the container and
group nodes (one CUSE device each, or one FUSE mount holding them all) and
the FUSE mount of device files, which exist in both modes because CUSE drops
read/write offsets and has no mmap.  ``Server`` puts together the parts, each
in its module with a small interface:

* :mod:`.runtime` -- directories, the loop and its sessions, workers, the
  hand-off socket: start and a bounded stop that removes only what it made;
* :mod:`.fsops` -- one table of operations per file system and the one router
  (:mod:`.nodes`: the CUSE or FUSE nodes; :mod:`.devfiles`: the device files);
* :mod:`.handles` -- the handle table (every open, with fdget-like holds);
* :mod:`.ioctl` -- the ioctl path, one request object, on or off the loop,
  and the CUSE retry rounds;
* :mod:`.mapping` -- mmap of a device fd through the hand-off (do_mmap's
  rules, sealed memfds).

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
import logging
import os
import secrets
import stat
import threading
from functools import partial
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

from ..dispatch import Dispatcher, GroupNode
from ..errors import VfioError
from ..uapi.ioctls import NodeKind
from .caller import NotOurs, RequestCaller
from .devfiles import DeviceFiles
from .fsops import FileOps
from .handles import Handle, HandleTable
from .ioctl import VFIO_CUSE_IDENTIFY, IoctlPath, IoctlRequest
from .mapping import DeviceFileMapper, check_seals
from .nodes import CuseNodes, NodeFiles
from .runtime import Runtime
from .shim import Request, Session, TransportError

log = logging.getLogger(__name__)

PRELOAD_LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libcuse_vfio_preload.so")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int


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


class Server:
    """Serves one Dispatcher as VFIO nodes (see module doc)."""

    #: How long stop() waits for in-flight requests, and then for the serving loop.
    STOP_TIMEOUT = 10.0

    def __init__(self, dispatcher: Dispatcher, groups: Iterable[Union[int, GroupNode]], *,
                 transport: str = "auto", dev_dir: Optional[str] = None, runtime_dir: Optional[str] = None,
                 container_mode: int = 0o666, handoff_ttl: float = 5.0, workers: int = 4):
        self.dispatcher = dispatcher
        self.groups: List[GroupNode] = sorted((_group_node(g) for g in groups), key=lambda g: g.id)
        self.requested_transport = transport
        self.transport, self.transport_reason = choose_transport(transport)
        self.dev_dir = os.path.abspath(dev_dir or "/dev/vfio")
        self.container_mode = container_mode
        #: how long an offered device fd waits for its client's library
        self.handoff_ttl = handoff_ttl
        self.runtime = Runtime(runtime_dir, workers)
        self.handles = HandleTable(self._release_file)
        self.ioctls = IoctlPath(dispatcher, self.handles, self.runtime,
                                partial(RequestCaller, self), secrets.randbits(62) | 1)
        self.mapper = DeviceFileMapper(self.identify, self.close_fetched)
        self.device_files = DeviceFiles(self)
        self.nodes: Optional[FileOps] = None  # CuseNodes or NodeFiles, once started
        self._our_devs: set = set()  # st_dev of our mounts
        self._started = False

    # -- what the CLI reads ----------------------------------------------------
    @property
    def container_path(self) -> str:
        return os.path.join(self.dev_dir, "vfio")

    def group_path(self, group_id: int) -> str:
        name = next((g.name for g in self.groups if g.id == group_id), str(group_id))
        return os.path.join(self.dev_dir, name)

    @property
    def node_paths(self) -> Dict[str, str]:
        """"vfio" and each group id -> the path a client opens."""
        paths = {"vfio": self.container_path}
        paths.update((str(g.id), self.group_path(g.id)) for g in self.groups)
        return paths

    @property
    def runtime_dir(self) -> Optional[str]:
        return self.runtime.runtime_dir

    @property
    def device_mount(self) -> str:
        """The FUSE mount device fds are files of (inside the 0711 runtime dir, 0700 itself)."""
        return self.runtime.device_mount

    @property
    def socket_path(self) -> str:
        return self.runtime.socket_path

    @property
    def preload_library(self) -> str:
        return PRELOAD_LIBRARY

    @property
    def eventfd_poller(self):
        return self.runtime.eventfd_poller

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

    def open_handles(self) -> int:
        """How many opens clients hold (tests: a killed client leaves nothing)."""
        return len(self.handles)

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
        runtime = self.runtime
        runtime.start(self.mapper.map, self.handoff_ttl)
        runtime.add_session(self.device_files.mount())
        if self.transport == "fuse":
            files = self.nodes = NodeFiles(self, self.dev_dir, self.container_mode, self.groups)
            runtime.refuse_mount_point(self.dev_dir, "--dev-dir")
            runtime.make_dir(self.dev_dir, 0o755)
            runtime.add_session(files.mount())
        else:
            cuse = self.nodes = CuseNodes(self, self.dev_dir, self.container_mode, self.groups)
            cuse.start(runtime.add_session)
        runtime.run_loop()
        if isinstance(self.nodes, CuseNodes):
            self.nodes.finish()
        else:
            self._our_devs.add(os.stat(self.dev_dir).st_dev)
        self.mapper.mounted(self.device_mount)
        self._our_devs.add(self.mapper.device_dev)

    def stop(self) -> None:
        """Unmount, end every session, release every open; safe to call twice or after a failed start."""
        self.runtime.stop(self.STOP_TIMEOUT, self._release_all)
        self.ioctls.close()

    def _release_all(self) -> None:
        self.device_files.drop_pending()
        self.handles.release_all()

    # -- opens ---------------------------------------------------------------------
    def release(self, rq: Request, fh: int, sid: int) -> None:
        """RELEASE: the open ends (now, or when its requests in flight do); answered at once."""
        self.handles.release(fh)
        self.ioctls.forget(sid, fh)
        rq.ok()

    def _release_file(self, handle: Handle) -> None:
        if handle.kind is NodeKind.DEVICE:
            self.device_files.forget(handle.ino)
        try:
            self.dispatcher.release(handle.file_object)
        except Exception:
            log.exception("releasing %r failed", handle.file_object)

    # -- fds of clients (RequestCaller) -----------------------------------------------
    def check_off_loop(self, what: str) -> None:
        if self.runtime.on_loop_thread():
            log.error("internal: %s on the serving loop would wait for the loop itself; "
                      "this ioctl belongs in transport.ioctl.OFF_LOOP", what)
            raise VfioError(errno.EIO, f"{what} cannot be done on the serving loop")

    def identify(self, fd: int, what: str) -> object:
        """Which of our opens the (fetched) ``fd`` is: the kernel's f_op check plus private_data."""
        st = os.fstat(fd)
        ours = st.st_dev in self._our_devs if stat.S_ISREG(st.st_mode) else \
            stat.S_ISCHR(st.st_mode) and st.st_rdev in getattr(self.nodes, "rdevs", ())
        if not ours:
            raise NotOurs(errno.EINVAL, f"{what} is not a file of this cuse-vfio server")
        fh = _libc.ioctl(fd, VFIO_CUSE_IDENTIFY, self.ioctls.secret)
        handle = self.handles.get(fh) if fh > 0 else None
        if handle is None:
            raise NotOurs(errno.EINVAL, f"{what} is not an open this server knows")
        return handle.file_object

    def offer_device_file(self, pid: int, devfile: object) -> int:
        """GET_DEVICE_FD's install_fd: a device file for ``devfile``, kept for ``pid``; the token."""
        return self.device_files.offer(pid, devfile)

    def close_fetched(self, fd: int) -> None:
        # Closing one of our own files sends FLUSH, which the loop answers:
        # never wait for it on the loop thread.
        if self.runtime.on_loop_thread():
            threading.Thread(target=os.close, args=(fd,), name="cuse-vfio-close", daemon=True).start()
        else:
            os.close(fd)

    # -- the parts, as the serving tests reach them -------------------------------------
    # The CUSE retry tests play the kernel one round at a time, on a server never started.
    def _new_handle(self, file_object: object, session: Optional[Session], ino: int) -> Handle:
        return self.handles.new(file_object, session, ino)

    def _run_cuse_ioctl(self, rq: Request, handle: Handle, key: Tuple[int, int], cmd: int, arg: int, caller,
                        in_data: bytes, in_size: int, out_size: int) -> None:
        sid, tid = key
        self.ioctls.run_cuse(IoctlRequest(rq, handle, cmd, arg, tid, 0, sid, True, in_data, in_size, out_size),
                             caller)

    def _release(self, rq: Request, fh: int, sid: int) -> None:
        self.release(rq, fh, sid)

    def _unbusy(self, handle: Handle) -> None:
        self.handles.unhold(handle)

    _check_seals = staticmethod(check_seals)
    _handoff = property(lambda self: self.runtime.handoff)
    _sessions = property(lambda self: self.runtime.sessions)
    _loop = property(lambda self: self.runtime.loop)
    _loop_thread = property(lambda self: self.runtime.loop_thread)
    _workers = property(lambda self: self.runtime.workers)


def _group_node(g: Union[int, GroupNode]) -> GroupNode:
    return g if isinstance(g, GroupNode) else GroupNode(int(g))
