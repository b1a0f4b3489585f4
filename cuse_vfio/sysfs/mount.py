"""Serving the view: the FUSE translation layer (fusepy API, mfusepy over libfuse3) and the mount.

Attributes report ``st_size`` 4096 as sysfs does and ``read`` returns the real
content, then EOF.  The mount uses ``direct_io`` so the kernel neither caches
the (live) content nor trusts ``st_size``: ``cat``, stdio and ``read()`` loops
see exactly the text.

The FUSE loop runs single-threaded in a daemon thread; ``config_reader``
callbacks are therefore called one at a time, from that thread.  A callback
that raises gives the reader EIO and a log line; the view keeps serving.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, Optional

from ..mounts import MNT_DETACH, fs_types, umount2
from .pci import CAP_SYS_ADMIN, UNPRIVILEGED_CONFIG_BYTES
from .tree import Config, Control, Dir, Link, SysfsViewError, Text

log = logging.getLogger(__name__)


def _allow_other() -> bool:
    """allow_other lets other users' clients read the view; only root may always ask for it."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/etc/fuse.conf") as f:
            if any(line.strip() == "user_allow_other" for line in f):
                return True
    except OSError:
        pass
    log.warning("the sysfs view will be readable by this user only: run as root, or add "
                "user_allow_other to /etc/fuse.conf so other users' clients can read it")
    return False


#: The libfuse the view runs on: the one the serving shim is linked against.
LIBFUSE3 = "libfuse3.so.3"


def _mfusepy():
    """mfusepy, loaded on libfuse3 by name.

    Left to itself it looks for "fuse" and then "fuse3" with
    ``ctypes.util.find_library``, which runs ldconfig, gcc and ld (about 50 ms
    of every start-up) and would take a libfuse 2 before libfuse3.
    FUSE_LIBRARY_PATH, its own setting, is given only while it loads, so
    nothing started later inherits it.
    """
    if "mfusepy" in sys.modules or "FUSE_LIBRARY_PATH" in os.environ:
        import mfusepy
        return mfusepy
    os.environ["FUSE_LIBRARY_PATH"] = LIBFUSE3
    try:
        import mfusepy
    finally:
        os.environ.pop("FUSE_LIBRARY_PATH", None)
    return mfusepy


def _caller_has_sys_admin() -> bool:
    uid, _gid, pid = _mfusepy().fuse_get_context()
    # The request carries a thread id; /proc/<tid>/status answers for threads too.
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return uid == 0


def _operations_class():
    """The FUSE translation layer, built on first mount so importing this module needs no libfuse."""
    _mfusepy()
    from mfusepy import FuseOSError, Operations

    class SysfsOperations(Operations):
        use_ns = True

        def __init__(self, view, ready: threading.Event):
            self.view = view
            self.ready = ready
            self._config_limits: Dict[int, int] = {}
            self._fhs = itertools.count(1)

        def init(self, path):
            self.ready.set()

        def _node(self, path: str):
            node = self.view._lookup(path)
            if node is None:
                raise FuseOSError(errno.ENOENT)
            return node

        def getattr(self, path, fh=None):
            node = self._node(path)
            t = self.view.created_ns
            st = {"st_uid": 0, "st_gid": 0, "st_atime": t, "st_mtime": t, "st_ctime": t,
                  "st_blksize": 4096, "st_nlink": 1}
            if isinstance(node, Dir):
                subdirs = sum(isinstance(c, Dir) for c in node.children.values())
                st.update(st_mode=0o040000 | node.mode, st_nlink=2 + subdirs, st_size=0)
            elif isinstance(node, Link):
                st.update(st_mode=0o120000 | node.mode, st_size=len(node.target))
            elif isinstance(node, Config):
                st.update(st_mode=0o100000 | node.mode, st_size=node.device.config_size)
            else:  # text attributes and control files: sysfs says a page
                st.update(st_mode=0o100000 | node.mode, st_size=4096)
            return st

        def readdir(self, path, fh):
            node = self._node(path)
            if not isinstance(node, Dir):
                raise FuseOSError(errno.ENOTDIR)
            return [".", "..", *node.children]

        def readlink(self, path):
            node = self._node(path)
            if not isinstance(node, Link):
                raise FuseOSError(errno.EINVAL)
            return node.target

        def open(self, path, flags):
            node = self._node(path)
            access = flags & os.O_ACCMODE
            reading = access in (os.O_RDONLY, os.O_RDWR)
            writing = access in (os.O_WRONLY, os.O_RDWR) or bool(flags & os.O_TRUNC)
            # kernfs refuses an access the mode does not name, even to root.
            if (reading and not node.mode & 0o444) or (writing and not node.mode & 0o222):
                raise FuseOSError(errno.EACCES)
            if writing and not isinstance(node, Control):
                raise FuseOSError(errno.EROFS)
            fh = next(self._fhs)
            if isinstance(node, Config):
                # pci_read_config decides by the opener's CAP_SYS_ADMIN, once, at open.
                full = _caller_has_sys_admin()
                self._config_limits[fh] = node.device.config_size if full else UNPRIVILEGED_CONFIG_BYTES
            return fh

        def release(self, path, fh):
            self._config_limits.pop(fh, None)
            return 0

        def read(self, path, size, offset, fh):
            node = self._node(path)
            if isinstance(node, Config):
                dev = node.device
                end = min(self._config_limits.get(fh, dev.config_size), dev.config_size)
                if offset >= end:
                    return b""
                try:
                    data = self.view.read_config(dev)
                except Exception:
                    log.exception("sysfs view: reading the config space of %s failed; the reader gets EIO",
                                  dev.bdf)
                    raise FuseOSError(errno.EIO) from None
                return data[offset:min(offset + size, end)]
            if isinstance(node, Text):
                try:
                    data = node.render().encode()
                except Exception:
                    log.exception("sysfs view: rendering %s failed; the reader gets EIO", node.what)
                    raise FuseOSError(errno.EIO) from None
                return data[offset:offset + size]
            raise FuseOSError(errno.EISDIR if isinstance(node, Dir) else errno.EACCES)

        def write(self, path, data, offset, fh):
            node = self._node(path)
            if not isinstance(node, Control):
                raise FuseOSError(errno.EROFS)
            log.info("sysfs view: ignoring %r written to %s: %s",
                     data.decode(errors="replace").strip(), path.lstrip("/"), node.why)
            return len(data)

        def truncate(self, path, length, fh=None):
            node = self._node(path)
            if isinstance(node, Control):
                return 0
            raise FuseOSError(errno.EROFS if node.mode & 0o222 else errno.EACCES)

        def _read_only(self, *args, **kwargs):
            raise FuseOSError(errno.EROFS)

        chmod = chown = utimens = mkdir = mknod = unlink = rmdir = _read_only
        symlink = rename = link = setxattr = removexattr = _read_only

        def create(self, path, mode, fi=None):
            raise FuseOSError(errno.EROFS)

    return SysfsOperations


def mounted(mountpoint: str) -> bool:
    """Is a FUSE file system mounted exactly on ``mountpoint`` (in this mount namespace)?"""
    return any(fstype.startswith("fuse") for fstype in fs_types(mountpoint))


class SysfsMount:
    """A served view: :meth:`unmount` (or leaving the ``with`` block) takes it down."""

    def __init__(self, view, mountpoint: str):
        self.view = view
        self.mountpoint = mountpoint
        self._ready = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._connection: Optional[int] = None
        self._unmounted = False

    def paths(self) -> Dict[str, str]:
        """Every real sysfs directory -> the directory of this mount ``run`` binds over it."""
        return self.view.bind_dirs(self.mountpoint)

    @property
    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _serve(self) -> None:
        try:
            _mfusepy().FUSE(_operations_class()(self.view, self._ready), self.mountpoint,
                 foreground=True, nothreads=True, allow_other=_allow_other(), default_permissions=True,
                 direct_io=True, fsname="cuse-vfio", subtype="cuse-vfio-sysfs")
        except BaseException as e:  # reported by mount(); the thread must not die noisily
            self._error = e

    def serve_foreground(self) -> None:
        self._serve()
        self._unmounted = True
        if self._error is not None:
            raise SysfsViewError(f"cannot serve the sysfs view on {self.mountpoint}: {self._error}")

    def _start(self, timeout: float) -> None:
        # libfuse takes over SIGTERM and SIGHUP for its loop when they are at
        # their default (so a SIGTERM would only unmount the view).  Give them
        # back once the loop runs (its init callback comes after the takeover).
        cwd = os.getcwd()
        main = threading.current_thread() is threading.main_thread()
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)} if main else {}
        self._thread = threading.Thread(target=self._serve, name=f"sysfs view {self.mountpoint}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.02):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                break
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)
        # libfuse's fuse_main moves the whole process to "/" (fuse_daemonize does,
        # even in the foreground): relative paths the caller uses later must keep
        # meaning what they meant.
        os.chdir(cwd)
        if not self._ready.is_set():
            if self._thread.is_alive():
                self.unmount()
                raise SysfsViewError(f"the sysfs view on {self.mountpoint} did not start within {timeout:g} s")
            self._unmounted = True
            raise SysfsViewError(f"cannot mount the sysfs view on {self.mountpoint}: {self._error or 'libfuse failed'}"
                                 " (is /dev/fuse there, and may this user mount?)")
        try:
            dev = os.stat(self.mountpoint).st_dev
            self._connection = os.major(dev) << 20 | os.minor(dev)  # the kernel's dev_t, fusectl's name
        except OSError:
            pass
        log.info("sysfs view of %d device(s) mounted on %s", len(self.view.devices), self.mountpoint)

    def unmount(self, timeout: float = 10.0) -> None:
        """Unmount (``fusermount3 -u``, then lazily) and wait for the loop to end. Idempotent."""
        if self._unmounted:
            return
        self._unmounted = True
        mp = self.mountpoint
        for how in (["fusermount3", "-u", mp], ["fusermount3", "-u", "-z", mp], "umount2"):
            if not mounted(mp):
                break
            if how == "umount2":
                try:
                    umount2(mp, MNT_DETACH)
                except OSError as e:
                    log.warning("sysfs view: lazy unmount of %s failed: %s", mp, os.strerror(e.errno or 0))
                continue
            try:
                done = subprocess.run(how, capture_output=True, text=True, timeout=timeout)
                if done.returncode:
                    log.debug("sysfs view: %s: %s", " ".join(how), done.stderr.strip())
            except (OSError, subprocess.TimeoutExpired) as e:
                log.debug("sysfs view: %s: %s", " ".join(how), e)
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive() and self._connection is not None:
            # Detached but still busy (a file in it is open): end the connection.
            try:
                with open(f"/sys/fs/fuse/connections/{self._connection}/abort", "w") as f:
                    f.write("1")
            except OSError:
                pass
            self._thread.join(2.0)
        if self._thread.is_alive():
            log.warning("sysfs view on %s is detached but still served: a file in it is still open", mp)

    def __enter__(self) -> "SysfsMount":
        return self

    def __exit__(self, *exc) -> None:
        self.unmount()
