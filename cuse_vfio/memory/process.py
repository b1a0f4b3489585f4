"""Another process's memory, as the kernel reaches it for VFIO.

``ProcessMemory`` is ``copy_{from,to}_user`` (and DMA) on a client process:
``process_vm_readv``/``process_vm_writev``, which need the same right as
ptrace (root, or ``kernel.yama.ptrace_scope`` allowing it).  Its fds, and
which process a thread is, are :mod:`.pids`'s.

No byte of a client's memory moves on the thread that asked for it: a page
there may be a file on a FUSE mount whose daemon never answers, or a page
whose userfaultfd handler never answers, and the fault would hold that
thread (and whatever lock it holds: the serving loop, the container's IOMMU)
for as long as the client likes.  ``bounded_copy`` makes the syscall on a
copier thread (csrc/copier.c) and waits up to ``STALL_CHECK``.  A copy not
done by then is *stalled*: it counts against its process (at most
``CV_COPY_MAX_STALLED`` at once, past that its copies fail at once) until
its syscall returns.  Memory that is a file on a FUSE mount is refused then
(EFAULT); any other stalled copy is waited for up to ``STALL_LIMIT`` in all,
except on a thread that must go on serving (``serving_thread``: the loop and
every thread that runs handlers): there ``CopyStalled`` hands the copy,
still running, to whoever can wait for it with nothing held, and a DMA
(``ProcessImage``) faults.  A copy that does not finish fails as a faulting
copy does (EFAULT) and is left to its copier.  The one exception, copies a
thread makes on its own while it holds nothing, watched by a guard instead,
is :mod:`.inline`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import threading
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import RetryRequest, VfioError
from ._copier import ffi as _ffi
from ._copier import lib as _copier
from .pids import memlock_limit, status_field, tgid_of


class ProcessMemory:
    """The address space of process (or thread) ``pid``; implements ``cuse_vfio.core.ops.AddressSpace``.

    As an ioctl's argument on a serving thread (see the module) it also keeps
    what stalled there: ``stalled``, a read the handler never got (it is
    unwound by ``CopyStalled`` before it acts; once the copy ends the request
    runs again, through ``ResumedMemory``), and ``pending``, the writes from
    the first stalled one on (the handler acted; they end, or fail with
    EFAULT as a failing copy_to_user does, before the request is answered).
    """

    __slots__ = ("pid", "stalled", "pending")

    def __init__(self, pid: int):
        self.pid = pid
        self.stalled: Optional[StalledCopy] = None
        #: writes not done yet, in order: the stalled one first, then (addr, bytes) of the later ones
        self.pending: Optional[List[Union["StalledCopy", Tuple[int, bytes]]]] = None

    def __repr__(self) -> str:
        return f"ProcessMemory({self.pid})"

    def read(self, addr: int, size: int) -> bytes:
        if size == 0:
            return b""
        buf = bytearray(size)
        try:
            self._transfer(_copier.CV_COPY_READV, buf, addr, size, "read")
        except CopyStalled as e:
            if self.pending:  # the handler wrote already, so it acted: it cannot be unwound
                raise e.copy.give_up("a write before it is still pending") from None
            self.stalled = e.copy  # seen even if a layer swallows the exception
            raise
        return bytes(buf)

    def write(self, addr: int, data: bytes) -> None:
        if not data:
            return
        if self.pending:  # after a stalled write: in order, once it is done
            self.pending.append((addr, bytes(data)))
            return
        try:
            self._transfer(_copier.CV_COPY_WRITEV, data, addr, len(data), "written")
        except CopyStalled as e:
            # copy_to_user comes after the action: the handler goes on, the reply waits (finish_writes)
            self.pending = [e.copy]

    def finish_writes(self) -> None:
        """Wait for the pending writes (where waiting is allowed), then make the later ones:
        EFAULT at the first that fails, and none after it is tried."""
        pending, self.pending = self.pending or [], None
        try:
            while pending:
                item = pending.pop(0)
                if isinstance(item, StalledCopy):
                    self._check(item.finish(), item.remote, item.size, "written")
                else:
                    addr, data = item
                    self._transfer(_copier.CV_COPY_WRITEV, data, addr, len(data), "written")
        except CopyStalled as e:  # asked on a serving thread after all: it cannot wait there
            raise e.copy.give_up("it stalled on a serving thread") from None
        finally:
            for item in pending:
                if isinstance(item, StalledCopy):
                    item.abandon()

    def abandon(self) -> None:
        """Nobody will wait for what stalled here: each copy is left to its copier."""
        stalled, self.stalled = self.stalled, None
        if stalled is not None:
            stalled.abandon()
        for item in self.pending or ():
            if isinstance(item, StalledCopy):
                item.abandon()
        self.pending = None

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
        if done != size:
            self._check(done, remote, size, verb)

    def _check(self, done: int, remote: int, size: int, verb: str) -> None:
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


class ResumedMemory(ProcessMemory):
    """An ioctl argument's memory for the next run of a request whose read stalled on a serving
    thread: that copy is waited for here (where no lock of the server is held) and it, like every
    read that stalled in an earlier run, answers from what it got; any other read is as before."""

    __slots__ = ("done",)

    def __init__(self, stalled_run: ProcessMemory):
        super().__init__(stalled_run.pid)
        self.done: Dict[Tuple[int, int], object] = dict(getattr(stalled_run, "done", {}))
        copy, stalled_run.stalled = stalled_run.stalled, None
        assert copy is not None, "a run whose read stalled"
        try:
            self._check(copy.finish(), copy.remote, copy.size, "read")
            self.done[copy.remote, copy.size] = bytes(copy.local)
        except VfioError as e:
            self.done[copy.remote, copy.size] = e

    def read(self, addr: int, size: int) -> bytes:
        got = self.done.get((addr, size))
        if got is None:
            return super().read(addr, size)
        if isinstance(got, VfioError):
            raise VfioError(got.errno, got.strerror or "")
        assert isinstance(got, bytes)
        return got


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
        if self._maps_fd is not None and _have_procmap_query and self._query(addr, size, write):
            return  # answered on this image's own maps fd: it is the current one
        ProcessMemory(self.pid).probe(addr, size, write)
        if not self.current(addr):
            raise self._gone()

    def _query(self, addr: int, size: int, write: bool,
               each: Optional[Callable[["_ProcmapQuery"], None]] = None) -> bool:
        """The probe through PROCMAP_QUERY, ``each(q)`` told every VMA it walks; False if this kernel has none."""
        maps_fd = self._maps_fd
        assert maps_fd is not None  # probe() asks only with one
        q = _ProcmapQuery()
        end = addr + size
        pos = addr
        need = PROCMAP_QUERY_VMA_WRITABLE if write else PROCMAP_QUERY_VMA_READABLE
        while pos < end:
            err = self._ask(maps_fd, q, pos)
            if err in (errno.ENOTTY, errno.EINVAL):
                return False
            if err == errno.ESRCH:
                raise self._gone()
            if err:
                q.vma_flags = 0  # ENOENT: no mapping covers pos
            if not q.vma_flags & need:
                raise VfioError(errno.EFAULT, f"pid {self.pid}: 0x{pos:x} (in [0x{addr:x}, 0x{end:x})) is not "
                                              "mapped" + (" writable" if write else " readable"))
            if each is not None:
                each(q)
            pos = q.vma_end
        return True

    @staticmethod
    def _ask(maps_fd: int, q: "_ProcmapQuery", pos: int) -> int:
        """One PROCMAP_QUERY at ``pos`` into ``q``: 0, or its errno (ENOTTY, EINVAL: this kernel has
        none, remembered; ESRCH: the address space is gone; ENOENT: nothing is mapped at pos)."""
        q.size, q.query_flags, q.query_addr = ctypes.sizeof(q), 0, pos
        q.vma_name_size = q.build_id_size = 0
        try:
            fcntl.ioctl(maps_fd, PROCMAP_QUERY, q)
        except OSError as e:
            if e.errno in (errno.ENOTTY, errno.EINVAL):
                global _have_procmap_query
                _have_procmap_query = False
            return e.errno or errno.EIO
        return 0

    def current(self, addr: int) -> bool:
        """Whether this image is still the process's.  Its maps fd tells without touching a page
        (PROCMAP_QUERY: ESRCH once the address space is gone).  Else any ``addr`` tells: a live
        address space gives a byte (mapped) or EIO (unmapped); a gone one (exit, exec) gives nothing."""
        if self._maps_fd is not None and _have_procmap_query:
            err = self._ask(self._maps_fd, _ProcmapQuery(), addr)
            if err == errno.ESRCH:
                return False
            if err in (0, errno.ENOENT):  # ENOENT: nothing mapped at addr, in a live address space
                return True
            # ENOTTY, EINVAL: no PROCMAP_QUERY here; the copy below tells
        try:
            done = self._copy(_copier.CV_COPY_PREAD, bytearray(1), addr, 1, brief=True)
        except VfioError:
            return True  # a stalled page: the address space is there to stall
        return done != 0  # an error: unmapped, but the address space is alive

    def readv(self, pieces: Sequence[Tuple[int, int]]) -> Optional[bytes]:
        """[(addr, size), ...] read in order in one copy: their bytes joined, or None when not every
        byte could be read (the caller goes piece by piece to tell which failed, and why)."""
        size = sum(n for _, n in pieces)
        buf = bytearray(size)
        try:
            done = self._copy(_copier.CV_COPY_PREAD, buf, pieces[0][0], size, pieces=pieces)
        except VfioError:
            return None
        return bytes(buf) if done == size else None

    def writev(self, pieces: Sequence[Tuple[int, int]], data) -> bool:
        """``data`` written over [(addr, size), ...] in order in one copy; False when not all of it
        was (what precedes the piece that failed is written; the caller goes on piece by piece)."""
        try:
            return self._copy(_copier.CV_COPY_PWRITE, data, pieces[0][0], len(data), pieces=pieces) == len(data)
        except VfioError:
            return False

    def _copy(self, op: int, local, addr: int, size: int, brief: bool = False,
              pieces: Optional[Sequence[Tuple[int, int]]] = None) -> int:
        """Bytes moved through the image's fd, -errno, or 0 once the image is gone."""
        flat = None
        if pieces is not None:
            flat = [x for piece in pieces for x in piece]
            if any(a < 0 or a + n > 1 << 63 for a, n in pieces):
                return -errno.EFAULT
        elif addr < 0 or addr + size > 1 << 63:  # past what an offset of /proc/PID/mem can name
            return -errno.EFAULT
        try:
            return bounded_copy(op, self._fd, self.pid, addr, local, size, self.pid, brief, flat)
        except CopyStalled as e:
            # A device's DMA on a serving thread (a model doing it inside a register write).
            # The kernel pinned these pages at MAP_DMA, so a real DMA never waits for a
            # fault: one that does not end within the short check is a fault in the log.
            raise e.copy.give_up("the serving thread does not wait for a DMA") from None

    def account_pinned(self, size: int) -> None:
        """vfio_lock_acct for MAP_DMA: ``size`` more bytes pinned, ENOMEM past RLIMIT_MEMLOCK
        (what the process has mlock'ed counts too) unless it has CAP_IPC_LOCK.

        The capability and the limit are asked each time (capget, prlimit);
        VmLck, which only /proc/<pid>/status tells, is read at the image's
        first limited pin and again whenever the pin would fail with it, so
        ENOMEM is always decided on a fresh figure.
        """
        with self._lock:
            limit = memlock_limit(self.pid)
            if limit is not None:
                locked = self._locked
                if locked is None or (locked + self.pinned + size) // PAGE_SIZE > limit // PAGE_SIZE:
                    locked = self._locked = status_field(self.pid, b"VmLck:") * 1024
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
#: Stalled copies running at once at most (each holds a copier thread): threads enough to wait for each.
STALL_POOL_SIZE = _copier.CV_COPY_MAX_THREADS


#: ``serving``: the thread must go on serving (``serving_thread``); dies with the thread, unlike its ident
_thread = threading.local()


def serving_thread(serving: bool = True) -> None:
    """The calling thread serves everyone (the loop, a thread that runs handlers, which may hold the
    model's lock): from now on (until ``serving=False``) no copy it makes waits past ``STALL_CHECK``;
    one still running then raises ``CopyStalled``."""
    _thread.serving = serving


_READS = (_copier.CV_COPY_READV, _copier.CV_COPY_PREAD)


class StalledCopy:
    """A copy that missed ``STALL_CHECK`` and still runs on its copier; its process's stalled
    copies count it until the syscall returns.  Someone finishes or abandons it."""

    __slots__ = ("_copy", "op", "pid", "remote", "size", "local")

    def __init__(self, copy, op: int, pid: int, remote: int, size: int, local):
        self._copy = copy
        self.op = op
        self.pid = pid
        self.remote = remote
        self.size = size
        #: the buffer a read lands in (bytearray); a write's bytes went with the copy
        self.local = local

    def __repr__(self) -> str:
        return f"StalledCopy(pid {self.pid}: {self.size} bytes at 0x{self.remote:x})"

    def finish(self) -> int:
        """Wait for the rest of ``STALL_LIMIT``: the bytes moved (a read's are in ``local``) or
        -errno; ``VfioError(EFAULT)``, the copy abandoned, when it still runs then."""
        copy, self._copy = self._copy, None
        assert copy is not None, "a stalled copy is finished once"
        dst = _ffi.from_buffer(self.local) if self.op in _READS else _ffi.NULL
        done = _copier.cv_copy_wait(copy, int((STALL_LIMIT - STALL_CHECK) * 1000), dst)
        if done != -errno.ETIMEDOUT:
            return done
        _copier.cv_copy_abandon(copy)
        raise self._fault(f"it did not move in {STALL_LIMIT:g} s")

    def abandon(self) -> None:
        """Nobody waits for it any more: its copier frees it when the syscall returns."""
        copy, self._copy = self._copy, None
        if copy is not None:
            _copier.cv_copy_abandon(copy)

    def give_up(self, why: str) -> VfioError:
        """Abandon it; the EFAULT that says ``why``."""
        self.abandon()
        return self._fault(why)

    def _fault(self, why: str) -> VfioError:
        return VfioError(errno.EFAULT, f"pid {self.pid}: {self.size} bytes at 0x{self.remote:x} "
                                       f"cannot be reached: {why}")

    def __del__(self) -> None:
        self.abandon()


class CopyStalled(RetryRequest):
    """Not an error: a copy on a serving thread stalled, and ``copy`` still runs.

    A RetryRequest, so every layer lets it through: from a read, the handler
    has not acted yet and the request can run again where waiting is allowed.
    """

    def __init__(self, copy: StalledCopy):
        super().__init__(copy.remote, copy.size)
        self.copy = copy


def bounded_copy(op: int, target: int, pid: int, remote: int, local, size: int,
                 process: int = -1, brief: bool = False, segments=None) -> int:
    """One copy of ``size`` bytes at ``remote`` in the memory of ``pid`` (see the module): the
    bytes moved or -errno; ``VfioError(EFAULT)`` when it stalls too long, ``CopyStalled`` when
    it stalls on a serving thread or with ``brief``.  ``local`` is a writable buffer for a read,
    the bytes for a write; ``target`` is ``pid`` or an fd of its /proc/PID/mem; ``process`` is
    the tgid of ``pid`` when the caller knows it (looked up only once some copy stalls).
    ``segments`` (the flat address, length pairs of ``cv_copy_start_list``, from ``remote``, adding
    up to ``size``) make it one copy of several pieces, in order."""
    reading = op in _READS
    src = _ffi.NULL if reading else _ffi.from_buffer(local)
    if segments is None:
        copy = _copier.cv_copy_start(op, target, remote, src, size, process)
    else:
        copy = _copier.cv_copy_start_list(op, target, segments, len(segments) // 2, src, size, process)
    if copy == _ffi.NULL:
        copy, process = _start_charged(op, target, pid, remote, src, size, process, segments)
    dst = _ffi.from_buffer(local) if reading else _ffi.NULL
    done = _copier.cv_copy_wait(copy, int(STALL_CHECK * 1000), dst)
    if done != -errno.ETIMEDOUT:
        return done
    stalled = StalledCopy(copy, op, pid, remote, size, local)
    _copier.cv_copy_stall(copy, process if process >= 0 else _process_of(pid))
    fuse = fuse_backing(pid, remote, size)
    if fuse is not None:
        raise stalled.give_up(f"it is {fuse}")
    if brief or getattr(_thread, "serving", False):
        raise CopyStalled(stalled)
    return stalled.finish()


def _start_charged(op: int, target: int, pid: int, remote: int, src, size: int, process: int,
                   segments=None) -> Tuple[object, int]:
    """The copy cv_copy_start refused, tried again once it is charged to its process; or EFAULT."""
    err = _ffi.errno
    if err == errno.ENOKEY:  # some copy is stalled, so whose this one is matters now
        process = _process_of(pid)
        if segments is None:
            copy = _copier.cv_copy_start(op, target, remote, src, size, process)
        else:
            copy = _copier.cv_copy_start_list(op, target, segments, len(segments) // 2, src, size, process)
        if copy != _ffi.NULL:
            return copy, process
        err = _ffi.errno
    if err == errno.EBUSY:
        raise VfioError(errno.EFAULT, f"pid {pid}: {_copier.CV_COPY_MAX_STALLED} copies of its process's memory "
                                      "are still stalled; no more are tried until they end")
    raise VfioError(errno.EFAULT, f"pid {pid}: no copier for {size} bytes at 0x{remote:x} "
                                  f"({os.strerror(err)}): too many copies are stalled")


def _process_of(pid: int) -> int:
    """The process whose stalled copies count a copy of thread ``pid``'s memory."""
    try:
        return tgid_of(pid)
    except VfioError:
        return pid  # exited: its copies fail anyway


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
