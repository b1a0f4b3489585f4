"""Processes by number, as the kernel knows them: thread -> process, pidfds, capabilities, limits.

FUSE and CUSE report the calling *thread*; ``tgid_of`` finds its process.
``fetch_fd`` is ``fdget`` on a number in a client's table: ``pidfd_getfd``
(Linux 5.6).  ``has_capability`` and ``memlock_limit`` are what MAP_DMA's
pinning asks of the caller (capget, prlimit).
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import threading
from typing import Dict, Optional

from ..errors import VfioError

_libc = ctypes.CDLL(None, use_errno=True)

_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# x86_64 numbers; os.pidfd_open is used where Python has it.
SYS_pidfd_open = 434
SYS_pidfd_getfd = 438


def _read_tgid(tid: int) -> int:
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    except ProcessLookupError:
        pass
    raise VfioError(errno.ESRCH, f"thread {tid} has exited")


class _TgidCache:
    """tid -> tgid, each answer checked before it is given again.

    /proc/<tid>/status costs tens of microseconds, and every request needs
    the answer.  A remembered tgid is kept with a pidfd of that process:
    while the pidfd's process has not been reaped its pid names it and no
    other, and /proc/<tgid>/task/<tid> existing then says ``tid`` is one of
    its threads now (a tid that exited and came back elsewhere fails that).
    """

    LIMIT = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tgid: Dict[int, int] = {}
        self._pidfd: Dict[int, int] = {}

    def _valid(self, tgid: int, tid: int) -> bool:
        fd = self._pidfd.get(tgid)
        if fd is None:
            return False
        try:
            signal.pidfd_send_signal(fd, 0)
            if tid != tgid:  # a leader's tid is its tgid as long as the pidfd's process lives
                os.stat(f"/proc/{tgid}/task/{tid}")
        except OSError:
            return False
        return True

    def lookup(self, tid: int) -> int:
        with self._lock:
            tgid = self._tgid.get(tid)
            if tgid is not None and self._valid(tgid, tid):
                return tgid
        tgid = _read_tgid(tid)
        try:
            fd = pidfd_open(tgid)
        except VfioError:
            return tgid  # gone meanwhile: answered as read, not remembered
        with self._lock:
            if len(self._tgid) >= self.LIMIT:
                self._forget_all()
            old = self._pidfd.pop(tgid, None)
            if old is not None:
                os.close(old)
            self._pidfd[tgid] = fd
            self._tgid[tid] = tgid
            if not self._valid(tgid, tid):  # the pid was recycled between the two reads
                del self._tgid[tid]
        return tgid

    def _forget_all(self) -> None:
        for fd in self._pidfd.values():
            os.close(fd)
        self._pidfd.clear()
        self._tgid.clear()


_tgids = _TgidCache()


def tgid_of(tid: int) -> int:
    """The process (thread group) of thread ``tid``: FUSE requests carry thread ids."""
    return _tgids.lookup(tid)


CAP_IPC_LOCK = 14


def status_field(pid: int, key: bytes) -> int:
    """A number from /proc/<pid>/status (the first word after ``key``); 0 when absent."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key):
                    word = line.split()[1]
                    return int(word, 16) if key == b"CapEff:" else int(word)
    except OSError:
        pass
    return 0


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_capget = _libc.capget
_capget.argtypes = [ctypes.c_void_p, ctypes.c_void_p]


#: this thread's capget buffers, made at its first call
_thread = threading.local()


def has_capability(pid: int, cap: int) -> bool:
    """Whether thread or process ``pid`` has ``cap`` in its effective set now (capget(2))."""
    try:
        header, data, args = _thread.capget
    except AttributeError:  # this thread's first: its own buffers, made once
        header, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
        args = (ctypes.addressof(header), ctypes.addressof(data))
        _thread.capget = header, data, args
    header.version, header.pid = _LINUX_CAPABILITY_VERSION_3, pid
    if _capget(*args) != 0:
        return False
    return bool(data[cap // 32].effective >> (cap % 32) & 1)


def memlock_limit(pid: int) -> Optional[int]:
    """The RLIMIT_MEMLOCK pins count against, or None: unlimited, or CAP_IPC_LOCK (``dma->lock_cap``)."""
    if has_capability(pid, CAP_IPC_LOCK):
        return None
    try:
        soft = resource.prlimit(pid, resource.RLIMIT_MEMLOCK)[0]
        return None if soft == resource.RLIM_INFINITY else soft
    except PermissionError:
        pass  # reading another process's limit so needs CAP_SYS_RESOURCE, which a container may lack
    except ProcessLookupError:
        return None
    try:
        with open(f"/proc/{pid}/limits", "rb") as f:
            for line in f:
                if line.startswith(b"Max locked memory"):
                    soft_word = line.split()[3]
                    return None if soft_word == b"unlimited" else int(soft_word)
    except (OSError, ValueError, IndexError):
        pass
    return None


def pidfd_open(pid: int) -> int:
    """A pidfd for process ``pid`` (close-on-exec)."""
    try:
        if hasattr(os, "pidfd_open"):
            return os.pidfd_open(pid)
        fd = _syscall(SYS_pidfd_open, ctypes.c_int(pid), ctypes.c_uint(0))
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return fd
    except OSError as e:
        if e.errno == errno.ESRCH:
            raise VfioError(errno.ESRCH, f"pid {pid} has exited") from None
        raise VfioError(e.errno or errno.EIO, f"pidfd_open({pid}): {e.strerror}") from None


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """A copy, in this process, of file descriptor ``fd`` of the pidfd's process (close-on-exec)."""
    new = _syscall(SYS_pidfd_getfd, ctypes.c_int(pidfd), ctypes.c_int(fd), ctypes.c_uint(0))
    if new < 0:
        e = ctypes.get_errno()
        if e == errno.EBADF:
            raise VfioError(errno.EBADF, f"fd {fd} is not open in the calling process")
        if e == errno.EPERM:
            raise VfioError(errno.EPERM, f"cannot take fd {fd} of another process: run the server as root")
        raise VfioError(e, f"pidfd_getfd(fd {fd}): {os.strerror(e)}")
    return new


def fetch_fd(pid: int, fd: int) -> int:
    """``fdget`` of process ``pid``'s fd ``fd``: our own fd for the same open file. Close it after use."""
    if fd < 0:
        raise VfioError(errno.EBADF, f"{fd} is not a file descriptor")
    pidfd = pidfd_open(pid)
    try:
        return pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)
