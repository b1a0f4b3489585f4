"""Another process's memory and file descriptors, as the kernel reaches them for VFIO.

``ProcessMemory`` is ``copy_{from,to}_user`` (and DMA) on a client process:
``process_vm_readv``/``process_vm_writev``, which need the same right as
ptrace (root, or ``kernel.yama.ptrace_scope`` allowing it).  ``fetch_fd`` is
``fdget`` on a number in the client's table: ``pidfd_getfd`` (Linux 5.6).
FUSE and CUSE report the calling *thread*; ``tgid_of`` finds its process.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading

from ..errors import VfioError

_libc = ctypes.CDLL(None, use_errno=True)


class _iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_process_vm_readv = _libc.process_vm_readv
_process_vm_writev = _libc.process_vm_writev
for _fn in (_process_vm_readv, _process_vm_writev):
    _fn.restype = ctypes.c_ssize_t
    # iovec pointers as plain addresses: every ioctl argument crosses here, and
    # byref() plus two new structures per call cost more than the syscall.
    _fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]


class _IovecPair(threading.local):
    """One local and one remote iovec per thread, reused by every transfer."""

    def __init__(self) -> None:
        self.iov = (_iovec * 2)()
        self.local = self.iov[0]
        self.remote = self.iov[1]
        self.local_addr = ctypes.addressof(self.iov)
        self.remote_addr = self.local_addr + ctypes.sizeof(_iovec)


_iovecs = _IovecPair()

_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# x86_64 numbers; os.pidfd_open is used where Python has it.
SYS_pidfd_open = 434
SYS_pidfd_getfd = 438


def tgid_of(tid: int) -> int:
    """The process (thread group) of thread ``tid``: FUSE requests carry thread ids."""
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


class ProcessMemory:
    """The address space of process ``pid``; implements ``cuse_vfio.core.ops.AddressSpace``."""

    __slots__ = ("pid",)

    def __init__(self, pid: int):
        self.pid = pid

    def __repr__(self) -> str:
        return f"ProcessMemory({self.pid})"

    def read(self, addr: int, size: int) -> bytes:
        if size == 0:
            return b""
        buf = ctypes.create_string_buffer(size)
        self._transfer(_process_vm_readv, ctypes.addressof(buf), addr, size, "read")
        return buf.raw

    def write(self, addr: int, data: bytes) -> None:
        if not data:
            return
        buf = ctypes.create_string_buffer(bytes(data), len(data))
        self._transfer(_process_vm_writev, ctypes.addressof(buf), addr, len(data), "written")

    def probe(self, addr: int, size: int, write: bool) -> None:
        """What pinning user pages checks (MAP_DMA), without moving a byte: every page of
        [addr, addr + size) in a readable mapping, and a writable one with ``write``; EFAULT otherwise.

        A write probe cannot be a write (the client may change those bytes
        meanwhile), so the mappings are read from /proc/<pid>/maps.
        """
        if size <= 0:
            return
        end = addr + size
        pos = addr
        need = "w" if write else "r"
        try:
            with open(f"/proc/{self.pid}/maps", "rb") as maps:
                for line in maps:
                    span, perms = line.split(None, 2)[:2]
                    start, stop = (int(x, 16) for x in span.split(b"-"))
                    if stop <= pos:
                        continue
                    if start > pos or chr(perms[0 if need == "r" else 1]) != need:
                        break
                    pos = stop
                    if pos >= end:
                        return
        except OSError:
            raise VfioError(errno.EFAULT, f"pid {self.pid} has exited") from None
        raise VfioError(errno.EFAULT, f"pid {self.pid}: 0x{pos:x} (in [0x{addr:x}, 0x{end:x})) is not mapped"
                        + (" writable" if write else " readable"))

    def _transfer(self, fn, local: int, remote: int, size: int, verb: str) -> None:
        if remote < 0 or remote + size > 1 << 64:
            raise VfioError(errno.EFAULT, f"pid {self.pid}: 0x{remote:x} is not a user address")
        iov = _iovecs
        iov.local.iov_base, iov.local.iov_len = local, size
        iov.remote.iov_base, iov.remote.iov_len = remote, size
        done = fn(self.pid, iov.local_addr, 1, iov.remote_addr, 1, 0)
        if done == size:
            return
        err = ctypes.get_errno() if done < 0 else errno.EFAULT
        if err == errno.EPERM:
            raise VfioError(errno.EPERM, f"cannot reach the memory of pid {self.pid}: run the server as root "
                                         "(or allow ptrace: sysctl kernel.yama.ptrace_scope=0)")
        if err == errno.ESRCH:
            raise VfioError(errno.EFAULT, f"pid {self.pid} has exited")
        # A short transfer means a later page is not mapped: copy_*_user's EFAULT.
        raise VfioError(errno.EFAULT, f"pid {self.pid}: {size} bytes at 0x{remote:x} cannot be {verb}")


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
        raise VfioError(e.errno, f"pidfd_open({pid}): {e.strerror}") from None


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
