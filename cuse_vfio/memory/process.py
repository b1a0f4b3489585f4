"""Another process's memory and file descriptors, as the kernel reaches them for VFIO.

``ProcessMemory`` is ``copy_{from,to}_user`` (and DMA) on a client process:
``process_vm_readv``/``process_vm_writev``, which need the same right as
ptrace (root, or ``kernel.yama.ptrace_scope`` allowing it).  ``fetch_fd`` is
``fdget`` on a number in the client's table: ``pidfd_getfd`` (Linux 5.6).
FUSE and CUSE report the calling *thread*; ``tgid_of`` finds its process.

No byte of a client's memory moves on the thread that asked for it: a page
there may be a file on a FUSE mount whose daemon never answers, and the
fault would hold that thread (and whatever lock it holds: the serving loop,
the container's IOMMU) for as long as the client likes.  ``bounded_copy``
makes the syscall on a copier thread (csrc/copier.c) and waits: up to
``STALL_CHECK`` for any copy, then, unless the memory is a file on a FUSE
mount (refused at once), up to ``STALL_LIMIT`` in all.  A copy that does not
finish fails as a faulting copy does (EFAULT) and is left to its copier.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import resource
import signal
import threading
import weakref
from typing import Dict, Optional

from ..errors import VfioError
from ._copier import ffi as _ffi
from ._copier import lib as _copier

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
        buf = bytearray(size)
        self._transfer(_copier.CV_COPY_READV, buf, addr, size, "read")
        return bytes(buf)

    def write(self, addr: int, data: bytes) -> None:
        if not data:
            return
        self._transfer(_copier.CV_COPY_WRITEV, data, addr, len(data), "written")

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

    def _transfer(self, op: int, local, remote: int, size: int, verb: str) -> None:
        if remote < 0 or remote + size > 1 << 64:
            raise VfioError(errno.EFAULT, f"pid {self.pid}: 0x{remote:x} is not a user address")
        done = bounded_copy(op, self.pid, self.pid, remote, local, size)
        if done == size:
            return
        err = -done if done < 0 else errno.EFAULT
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

    __slots__ = ("pid", "pinned", "_fd", "_maps_fd", "_locked", "_finalizer", "_lock", "__weakref__")

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
        try:
            self._maps_fd: Optional[int] = os.open(f"/proc/{pid}/maps", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._maps_fd = None
        #: VmLck (bytes the process mlock'ed itself) as last read; None: not read yet
        self._locked: Optional[int] = None
        self._finalizer = weakref.finalize(self, _close_image_fds, self._fd, self._maps_fd)

    def __repr__(self) -> str:
        return f"ProcessImage({self.pid})"

    def _gone(self) -> VfioError:
        return VfioError(errno.EFAULT, f"the memory pid {self.pid} mapped is gone (it exited or exec'd)")

    def read(self, addr: int, size: int) -> bytes:
        if size == 0:
            return b""
        buf = bytearray(size)
        done = self._copy(_copier.CV_COPY_PREAD, buf, addr, size)
        if done < 0:
            raise VfioError(errno.EFAULT, f"pid {self.pid}: {size} bytes at 0x{addr:x} cannot be read")
        if done == 0:
            raise self._gone()
        data = bytes(buf)
        if done != size:
            raise VfioError(errno.EFAULT, f"pid {self.pid}: {size} bytes at 0x{addr:x} cannot be read")
        return data

    def write(self, addr: int, data: bytes) -> None:
        if not data:
            return
        done = self._copy(_copier.CV_COPY_PWRITE, data, addr, len(data))
        if done < 0:
            raise VfioError(errno.EFAULT, f"pid {self.pid}: {len(data)} bytes at 0x{addr:x} cannot be written")
        if done == 0:
            raise self._gone()
        if done != len(data):
            raise VfioError(errno.EFAULT, f"pid {self.pid}: {len(data)} bytes at 0x{addr:x} cannot be written")

    def probe(self, addr: int, size: int, write: bool) -> None:
        """What pinning checks (the mappings of the process now), and that this image is its current one.

        Each mapping over the range is asked of the kernel alone (PROCMAP_QUERY,
        Linux 6.11, on a /proc/<pid>/maps fd opened on this image, which then
        fails once the image is gone); older kernels read /proc/<pid>/maps.
        """
        if size <= 0:
            return
        if self._maps_fd is None or not _have_procmap_query or not self._query(addr, size, write):
            ProcessMemory(self.pid).probe(addr, size, write)
        if not self.current(addr):
            raise self._gone()

    def _query(self, addr: int, size: int, write: bool) -> bool:
        """The probe through PROCMAP_QUERY; False if this kernel has none."""
        maps_fd = self._maps_fd
        assert maps_fd is not None  # probe() asks only with one
        q = _ProcmapQuery()
        end = addr + size
        pos = addr
        need = PROCMAP_QUERY_VMA_WRITABLE if write else PROCMAP_QUERY_VMA_READABLE
        while pos < end:
            q.size, q.query_flags, q.query_addr = ctypes.sizeof(q), 0, pos
            q.vma_name_size = q.build_id_size = 0
            try:
                fcntl.ioctl(maps_fd, PROCMAP_QUERY, q)
            except OSError as e:
                if e.errno in (errno.ENOTTY, errno.EINVAL):
                    global _have_procmap_query
                    _have_procmap_query = False
                    return False
                if e.errno == errno.ESRCH:
                    raise self._gone() from None
                q.vma_flags = 0  # ENOENT: no mapping covers pos
            if not q.vma_flags & need:
                raise VfioError(errno.EFAULT, f"pid {self.pid}: 0x{pos:x} (in [0x{addr:x}, 0x{end:x})) is not "
                                              "mapped" + (" writable" if write else " readable"))
            pos = q.vma_end
        return True

    def current(self, addr: int) -> bool:
        """Whether this image is still the process's.  Any ``addr`` tells: a live address space
        gives a byte (mapped) or EIO (unmapped); a gone one (exit, exec) gives nothing."""
        try:
            done = self._copy(_copier.CV_COPY_PREAD, bytearray(1), addr, 1)
        except VfioError:
            return True  # a stalled page: the address space is there to stall
        return done != 0  # an error: unmapped, but the address space is alive

    def _copy(self, op: int, local, addr: int, size: int) -> int:
        """Bytes moved through the image's fd, -errno, or 0 once the image is gone."""
        if addr < 0 or addr + size > 1 << 63:  # past what an offset of /proc/PID/mem can name
            return -errno.EFAULT
        return bounded_copy(op, self._fd, self.pid, addr, local, size)

    def account_pinned(self, size: int) -> None:
        """vfio_lock_acct for MAP_DMA: ``size`` more bytes pinned, ENOMEM past RLIMIT_MEMLOCK
        (what the process has mlock'ed counts too) unless it has CAP_IPC_LOCK.

        The capability and the limit are asked each time (capget, prlimit);
        VmLck, which only /proc/<pid>/status tells, is read at the image's
        first limited pin and again whenever the pin would fail with it, so
        ENOMEM is always decided on a fresh figure.
        """
        with self._lock:
            limit = _memlock_limit(self.pid)
            if limit is not None:
                locked = self._locked
                if locked is None or (locked + self.pinned + size) // PAGE_SIZE > limit // PAGE_SIZE:
                    locked = self._locked = _status_field(self.pid, b"VmLck:") * 1024
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


def _close_image_fds(fd: int, maps_fd: Optional[int]) -> None:
    os.close(fd)
    if maps_fd is not None:
        os.close(maps_fd)


class _ProcmapQuery(ctypes.Structure):
    """``struct procmap_query`` (include/uapi/linux/fs.h, Linux 6.11)."""

    _fields_ = [("size", ctypes.c_uint64), ("query_flags", ctypes.c_uint64), ("query_addr", ctypes.c_uint64),
                ("vma_start", ctypes.c_uint64), ("vma_end", ctypes.c_uint64), ("vma_flags", ctypes.c_uint64),
                ("vma_page_size", ctypes.c_uint64), ("vma_offset", ctypes.c_uint64), ("inode", ctypes.c_uint64),
                ("dev_major", ctypes.c_uint32), ("dev_minor", ctypes.c_uint32), ("vma_name_size", ctypes.c_uint32),
                ("build_id_size", ctypes.c_uint32), ("vma_name_addr", ctypes.c_uint64),
                ("build_id_addr", ctypes.c_uint64)]


# _IOWR('f', 17, struct procmap_query); the flags of vma_flags
PROCMAP_QUERY = 0xC0000000 | ctypes.sizeof(_ProcmapQuery) << 16 | ord("f") << 8 | 17
PROCMAP_QUERY_VMA_READABLE = 0x01
PROCMAP_QUERY_VMA_WRITABLE = 0x02
_have_procmap_query = True  # until a kernel says ENOTTY


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

#: Seconds any copy of client memory may take before its backing is looked at.
STALL_CHECK = 0.05
#: Seconds any copy may take in all (memory on a FUSE mount: ``STALL_CHECK``).
STALL_LIMIT = 2.0


def bounded_copy(op: int, target: int, pid: int, remote: int, local, size: int) -> int:
    """One copy of ``size`` bytes at ``remote`` in the memory of ``pid`` (see the module): the
    bytes moved or -errno; ``VfioError(EFAULT)`` when it stalls.  ``local`` is a writable buffer
    for a read, the bytes for a write; ``target`` is ``pid`` or an fd of its /proc/PID/mem."""
    reading = op in (_copier.CV_COPY_READV, _copier.CV_COPY_PREAD)
    copy = _copier.cv_copy_start(op, target, remote, _ffi.NULL if reading else _ffi.from_buffer(local), size, pid)
    if copy == _ffi.NULL:
        err = _ffi.errno
        if err == errno.EBUSY:
            raise VfioError(errno.EFAULT, f"pid {pid}: {_copier.CV_COPY_MAX_STALLED} copies of its memory are "
                                          "still stalled; no more are tried until they end")
        raise VfioError(errno.EFAULT, f"pid {pid}: no copier for {size} bytes at 0x{remote:x} "
                                      f"({os.strerror(err)}): too many copies are stalled")
    dst = _ffi.from_buffer(local) if reading else _ffi.NULL
    done = _copier.cv_copy_wait(copy, int(STALL_CHECK * 1000), dst)
    if done != -errno.ETIMEDOUT:
        return done
    fuse = fuse_backing(pid, remote, size)
    if fuse is None:
        done = _copier.cv_copy_wait(copy, int((STALL_LIMIT - STALL_CHECK) * 1000), dst)
        if done != -errno.ETIMEDOUT:
            return done
    _copier.cv_copy_abandon(copy)
    why = f"it is {fuse}" if fuse else f"it did not move in {STALL_LIMIT:g} s"
    raise VfioError(errno.EFAULT, f"pid {pid}: {size} bytes at 0x{remote:x} cannot be reached: {why}")


def fuse_backing(pid: int, addr: int, size: int) -> Optional[str]:
    """What names [addr, addr + size) of ``pid`` as a file on a FUSE mount (whose daemon decides
    when a fault ends), or None: /proc/PID/maps device numbers against the FUSE mounts of its mountinfo."""
    end = addr + max(size, 1)
    devices = {}
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            for line in maps:
                fields = line.split(None, 5)
                start, stop = (int(x, 16) for x in fields[0].split(b"-"))
                if stop > addr and start < end:
                    major, minor = (int(x, 16) for x in fields[3].split(b":"))
                    path = fields[5].strip().decode("utf-8", "replace") if len(fields) > 5 else ""
                    devices[(major, minor)] = path
        if not any(dev != (0, 0) for dev in devices):
            return None
        with open(f"/proc/{pid}/mountinfo", "rb") as mountinfo:
            for line in mountinfo:
                mount, _, fs = line.partition(b" - ")
                if fs.startswith(b"fuse"):
                    major, minor = (int(x) for x in mount.split()[2].split(b":"))
                    if (major, minor) in devices:
                        return f"a file on a FUSE mount ({devices[(major, minor)] or 'unnamed'})"
    except (OSError, ValueError, IndexError):
        return None
    return None
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


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_capget = _libc.capget
_capget.argtypes = [ctypes.c_void_p, ctypes.c_void_p]


def has_capability(pid: int, cap: int) -> bool:
    """Whether thread or process ``pid`` has ``cap`` in its effective set now (capget(2))."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, pid)
    data = (_CapData * 2)()
    if _capget(ctypes.addressof(header), ctypes.addressof(data)) != 0:
        return False
    return bool(data[cap // 32].effective >> (cap % 32) & 1)


def _memlock_limit(pid: int) -> Optional[int]:
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


_images: "weakref.WeakValueDictionary[int, ProcessImage]" = weakref.WeakValueDictionary()
_images_lock = threading.Lock()


def process_image(pid: int) -> ProcessImage:
    """The current image of process ``pid``, shared by every caller while someone holds it."""
    with _images_lock:
        image = _images.get(pid)
        if image is not None and image.current(0):
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
