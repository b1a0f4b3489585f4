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
import weakref
from typing import Optional

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


class ProcessImage:
    """The memory of one process *image*, as pinned pages are to a device.

    The kernel pins the pages MAP_DMA names, so a device's DMA lands in the
    memory that was mapped and nowhere else: not in the program the process
    execs next, not in a later process that gets the same pid.  A pid alone
    (``ProcessMemory``) cannot promise that; an fd of ``/proc/<pid>/mem`` can,
    since it stays bound to the address space it was opened on, and once that
    is gone (exit, exec) every access through it moves nothing.  DMA mappings
    keep one of these; ``process_image(pid)`` shares it between the mappings
    of one image.
    """

    __slots__ = ("pid", "pinned", "_fd", "_finalizer", "_lock", "__weakref__")

    def __init__(self, pid: int):
        self.pid = pid
        #: bytes DMA mappings count as pinned in this image (the kernel's share of mm->locked_vm)
        self.pinned = 0
        self._lock = threading.Lock()
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VfioError(errno.ESRCH, f"pid {pid} has exited") from None
        except PermissionError:
            raise VfioError(errno.EPERM, f"cannot reach the memory of pid {pid}: run the server as root") from None
        self._finalizer = weakref.finalize(self, os.close, self._fd)

    def __repr__(self) -> str:
        return f"ProcessImage({self.pid})"

    def _gone(self) -> VfioError:
        return VfioError(errno.EFAULT, f"the memory pid {self.pid} mapped is gone (it exited or exec'd)")

    def read(self, addr: int, size: int) -> bytes:
        if size == 0:
            return b""
        try:
            data = os.pread(self._fd, size, addr)
        except (OSError, OverflowError):
            raise VfioError(errno.EFAULT, f"pid {self.pid}: {size} bytes at 0x{addr:x} cannot be read") from None
        if not data:
            raise self._gone()
        if len(data) != size:
            raise VfioError(errno.EFAULT, f"pid {self.pid}: {size} bytes at 0x{addr:x} cannot be read")
        return data

    def write(self, addr: int, data: bytes) -> None:
        if not data:
            return
        try:
            done = os.pwrite(self._fd, data, addr)
        except (OSError, OverflowError):
            raise VfioError(errno.EFAULT, f"pid {self.pid}: {len(data)} bytes at 0x{addr:x} "
                                          "cannot be written") from None
        if done == 0:
            raise self._gone()
        if done != len(data):
            raise VfioError(errno.EFAULT, f"pid {self.pid}: {len(data)} bytes at 0x{addr:x} cannot be written")

    def probe(self, addr: int, size: int, write: bool) -> None:
        """What pinning checks (the mappings of the process now), and that this image is its current one."""
        ProcessMemory(self.pid).probe(addr, size, write)
        if size > 0 and not self.current(addr):
            raise self._gone()

    def current(self, addr: int) -> bool:
        """Whether this image is still the process's: a byte of a mapped ``addr`` reads through it."""
        try:
            return len(os.pread(self._fd, 1, addr)) == 1
        except (OSError, OverflowError):
            return True  # unmapped, but the address space is alive

    def account_pinned(self, size: int) -> None:
        """vfio_lock_acct for MAP_DMA: ``size`` more bytes pinned, ENOMEM past RLIMIT_MEMLOCK
        (what the process has mlock'ed counts too) unless it has CAP_IPC_LOCK."""
        with self._lock:
            limit = _memlock_limit(self.pid)
            if limit is not None:
                locked = _status_field(self.pid, b"VmLck:") * 1024
                if (locked + self.pinned + size) // PAGE_SIZE > limit // PAGE_SIZE:
                    raise VfioError(errno.ENOMEM, f"MAP_DMA: pid {self.pid} would pin {self.pinned + size} bytes "
                                                  f"(+{locked} locked) past its RLIMIT_MEMLOCK of {limit}: raise "
                                                  "the limit (ulimit -l) or run it with CAP_IPC_LOCK")
            self.pinned += size

    def release_pinned(self, size: int) -> None:
        with self._lock:
            self.pinned -= size

    def close(self) -> None:
        self._finalizer()


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CAP_IPC_LOCK = 14


def _status_field(pid: int, key: bytes) -> int:
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


def _memlock_limit(pid: int) -> Optional[int]:
    """The RLIMIT_MEMLOCK pins count against, or None: unlimited, or CAP_IPC_LOCK (``dma->lock_cap``)."""
    if _status_field(pid, b"CapEff:") >> CAP_IPC_LOCK & 1:
        return None
    # /proc/<pid>/limits, not prlimit(2): reading another process's limit that way
    # needs CAP_SYS_RESOURCE, which a server in a container may not have.
    try:
        with open(f"/proc/{pid}/limits", "rb") as f:
            for line in f:
                if line.startswith(b"Max locked memory"):
                    soft = line.split()[3]
                    return None if soft == b"unlimited" else int(soft)
    except (OSError, ValueError, IndexError):
        pass
    return None


_images: "weakref.WeakValueDictionary[int, ProcessImage]" = weakref.WeakValueDictionary()
_images_lock = threading.Lock()


def _first_mapped(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            line = maps.readline()
    except OSError:
        return None
    return int(line.split(b"-", 1)[0], 16) if line else None


def process_image(pid: int) -> ProcessImage:
    """The current image of process ``pid``, shared by every caller while someone holds it."""
    with _images_lock:
        image = _images.get(pid)
        if image is not None:
            first = _first_mapped(pid)
            if first is not None and image.current(first):
                return image
        image = ProcessImage(pid)
        _images[pid] = image
        return image


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
