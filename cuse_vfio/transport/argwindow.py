"""A FUSE ioctl's argument read once on the serving loop before its handler runs, and written back after.

A restricted ioctl's handler reads its argument where it lies, in the
client (``ProcessMemory``): through the copier, a hand-off to another thread
and back for every read and write, since the handler may hold the model's
lock and a client's page may stall.  For the ioctls whose argument is a
struct read from its start (``WINDOWED``), the loop reads up to ``WINDOW``
bytes of it (never past the end of the page, so nothing the handler would
not touch) *inline*, on its own thread, before the handler runs and with
nothing held; the handler's reads and writes inside that window are served
from it, and what it wrote goes back inline once it returns, again with
nothing held.  Anything outside the window goes through the copier as before.

An inline copy that stalls holds only the loop thread, and only until the
guard (:mod:`cuse_vfio.memory.inline`) notices: then another thread takes
over the loop, and the request is answered as a stalled copier copy makes
it: EFAULT at once if the page is a file on a FUSE mount, EFAULT after
``STALL_LIMIT`` otherwise, unless the copy ends first, in which case the
stalled thread finishes the request and leaves the loop.  The written-back
bytes come after the handler acted, so a write-back that fails or stalls
leaves the action done and answers EFAULT, as a failing copy_to_user does.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from typing import TYPE_CHECKING, Optional, Tuple

from ..errors import VfioError
from ..memory import PAGE_SIZE, CopyStalled, ProcessMemory, inline, process
from ..uapi.ioctls import (
    VFIO_DEVICE_FEATURE,
    VFIO_DEVICE_GET_INFO,
    VFIO_DEVICE_GET_IRQ_INFO,
    VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
    VFIO_DEVICE_GET_REGION_INFO,
    VFIO_DEVICE_IOEVENTFD,
    VFIO_DEVICE_SET_IRQS,
    VFIO_GROUP_GET_STATUS,
    VFIO_IOMMU_DIRTY_PAGES,
    VFIO_IOMMU_GET_INFO,
    VFIO_IOMMU_MAP_DMA,
    VFIO_IOMMU_UNMAP_DMA,
    NodeKind,
)

if TYPE_CHECKING:
    from .runtime import Runtime
    from .shim import Request

log = logging.getLogger(__name__)

#: bytes of an argument read ahead at most
WINDOW = 512

#: the ioctls whose argument is a struct their handler reads from its start, by node kind
WINDOWED = {
    NodeKind.CONTAINER: frozenset({VFIO_IOMMU_GET_INFO, VFIO_IOMMU_MAP_DMA, VFIO_IOMMU_UNMAP_DMA,
                                   VFIO_IOMMU_DIRTY_PAGES}),
    NodeKind.GROUP: frozenset({VFIO_GROUP_GET_STATUS}),
    NodeKind.DEVICE: frozenset({VFIO_DEVICE_GET_INFO, VFIO_DEVICE_GET_REGION_INFO, VFIO_DEVICE_GET_IRQ_INFO,
                                VFIO_DEVICE_SET_IRQS, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, VFIO_DEVICE_IOEVENTFD,
                                VFIO_DEVICE_FEATURE}),
}
WINDOWED.update({kind: frozenset() for kind in NodeKind if kind not in WINDOWED})


class Answered(Exception):
    """The request this thread stalled in was answered meanwhile by another thread: drop it."""


class ArgWindow(ProcessMemory):
    """``ProcessMemory`` of thread ``pid`` with the bytes at [base, base + len(data)) read already.

    Writes inside the window change the window only (``dirty`` says which part);
    reads of it see them.  Everything else is ``ProcessMemory``'s.
    """

    __slots__ = ("base", "data", "lo", "hi")

    def __init__(self, pid: int, base: int, data: bytearray):
        super().__init__(pid)
        self.base = base
        self.data = data
        #: the written part of the window, [lo, hi) from base (empty: lo == hi)
        self.lo = self.hi = 0

    def read(self, addr: int, size: int) -> bytes:
        off = addr - self.base
        if off >= 0 and off + size <= len(self.data):
            return bytes(self.data[off:off + size])
        if self.hi == self.lo:
            return super().read(addr, size)
        try:
            got = bytearray(super().read(addr, size))
        except CopyStalled as e:  # the handler wrote already, so it acted: it cannot be unwound
            self.stalled = None
            raise e.copy.give_up("a write before it is still pending") from None
        # The window's written bytes are not in the client yet: overlay them.
        lo, hi = max(self.lo, off), min(self.hi, off + size)
        if lo < hi:
            got[lo - off:hi - off] = self.data[lo:hi]
        return bytes(got)

    def write(self, addr: int, data: bytes) -> None:
        off = addr - self.base
        end = off + len(data)
        if off >= 0 and end <= len(self.data) and not self.pending:
            self.data[off:end] = data
            if self.hi == self.lo:
                self.lo, self.hi = off, end
            else:
                self.lo, self.hi = min(self.lo, off), max(self.hi, end)
            return
        super().write(addr, data)
        lo, hi = max(0, off), min(len(self.data), end)
        if lo < hi:  # keep the window what the client will hold
            self.data[lo:hi] = data[lo - off:hi - off]

    def dirty(self) -> Optional[Tuple[int, bytes]]:
        """(address, bytes) of what the handler wrote in the window, not yet in the client."""
        if self.hi == self.lo:
            return None
        return self.base + self.lo, bytes(self.data[self.lo:self.hi])

    def finish_writes(self) -> None:
        # Where waiting is allowed (the stall pool): the window's bytes go last, after the writes before.
        written = self.dirty()
        if written is not None:
            self.lo = self.hi = 0
            self.pending = (self.pending or []) + [written]
        super().finish_writes()


class _Stall:
    """An inline copy the guard declared stalled, from the loop's request ``rq``."""

    __slots__ = ("rq", "pid", "remote", "size", "write", "back", "answered", "event")

    def __init__(self, rq: "Request", pid: int, remote: int, size: int, write: bool):
        self.rq = rq
        self.pid = pid
        self.remote = remote
        self.size = size
        self.write = write
        self.back = False       # the stalled thread came back from the copy
        self.answered = False   # the request was answered for it
        self.event = threading.Event()


class InlineArgs:
    """Reads and write-backs of ``WINDOWED`` arguments on the loop thread of ``runtime``."""

    #: seconds between looks at whether the runtime stops, while a stalled copy is waited for
    STOP_CHECK = 0.1

    def __init__(self, runtime: "Runtime"):
        self.runtime = runtime
        self._lock = threading.Lock()
        #: (rq, pid, remote, size, write) of the inline copy in flight (only the loop thread copies inline)
        self._inflight: Optional[Tuple["Request", int, int, int, bool]] = None
        #: the stall the guard handed over (another thread serves), until its thread comes back
        self._stall: Optional[_Stall] = None
        #: a stalled thread came back before the guard's hand-over: nothing to take over
        self._early = False
        self.owner = inline.watch(self._on_stall)

    def close(self) -> None:
        inline.unwatch(self.owner)

    # -- the loop's side --------------------------------------------------------------------------
    def fetch(self, rq: "Request", pid: int, arg: int) -> ProcessMemory:
        """The memory for ``rq``'s handler: an ``ArgWindow`` when the argument could be read inline."""
        size = min(WINDOW, PAGE_SIZE - (arg & (PAGE_SIZE - 1)))
        if arg < PAGE_SIZE or arg >= 1 << 63:
            return ProcessMemory(pid)
        buf = bytearray(size)
        n = self._copy(rq, inline.READ, pid, arg, buf, size)
        if n <= 0:
            return ProcessMemory(pid)  # not made, or it faults: the handler's own read says how
        if n < size:
            del buf[n:]
        return ArgWindow(pid, arg, buf)

    def write_back(self, rq: "Request", memory: ArgWindow, result: int) -> int:
        """The window's written bytes into the client; ``result``, or -EFAULT when they cannot go."""
        written = memory.dirty()
        if written is None:
            return result
        addr, data = written
        memory.lo = memory.hi = 0
        n = self._copy(rq, inline.WRITE, memory.pid, addr, data, len(data))
        if n == inline.NOT_MADE:
            ProcessMemory.write(memory, addr, data)  # through the copier; a stall leaves it pending
            return result
        try:
            memory._check(n, addr, len(data), "written")
        except VfioError as e:
            log.info("pid %d: the ioctl acted, but its result cannot be written back: %s", memory.pid, e.strerror)
            return -e.errno
        return result

    def _copy(self, rq: "Request", op: int, pid: int, remote: int, local, size: int) -> int:
        if not self.runtime.holds_nothing():  # a request inside another's, or a thread the loop left
            return inline.NOT_MADE
        self._inflight = (rq, pid, remote, size, op == inline.WRITE)
        n = inline.copy(op, pid, remote, local, size, self.owner)
        if n > inline.STALLED >> 1:  # (the flag is added to -errno too)
            n -= inline.STALLED
            self._came_back(rq)
        return n

    def _came_back(self, rq: "Request") -> None:
        """This thread's copy for ``rq`` was declared stalled and has returned now."""
        with self._lock:
            st = self._stall
            if st is None or st.rq is not rq:
                self._early = True  # before the guard handed over: this thread goes on serving
                return
            self._stall = None
            st.back = True
            st.event.set()
        self.runtime.retire_loop_thread()  # another thread serves the loop now
        if st.answered:
            raise Answered()

    # -- the guard's side -------------------------------------------------------------------------
    def _on_stall(self) -> None:
        """On the guard thread: the loop's inline copy stalled; another thread takes over the loop."""
        with self._lock:
            if self._early:
                self._early = False
                return
            inflight = self._inflight
            assert inflight is not None, "a copy was in flight"
            st = self._stall = _Stall(*inflight)
            self.runtime.leave_loop()
        log.info("pid %d: %d bytes at 0x%x stalled the serving loop past %g s; another thread serves "
                 "while the copy waits", st.pid, st.size, st.remote, process.STALL_CHECK)
        self.runtime.start_loop_thread()
        pool = self.runtime.stalls
        try:
            assert pool is not None, "the runtime is started"
            pool.submit(self._answer_late, st)
        except RuntimeError:  # shut down: answer now
            self._answer(st, "the server is stopping")

    def _answer_late(self, st: _Stall) -> None:
        """On the stall pool: EFAULT for ``st``'s request unless its copy ends in ``STALL_LIMIT``."""
        fuse = process.fuse_backing(st.pid, st.remote, st.size)
        if fuse is not None:
            self._answer(st, f"it is {fuse}")
            return
        deadline = time.monotonic() + process.STALL_LIMIT - process.STALL_CHECK
        while not st.event.wait(min(self.STOP_CHECK, max(0.0, deadline - time.monotonic()))):
            if self.runtime.stopping:
                self._answer(st, "the server is stopping")
                return
            if time.monotonic() >= deadline:
                self._answer(st, f"it did not move in {process.STALL_LIMIT:g} s")
                return

    def _answer(self, st: _Stall, why: str) -> None:
        with self._lock:
            if st.back:
                return  # its own thread finishes it
            st.answered = True
        what = "its result cannot be written back" if st.write else "its argument cannot be read"
        log.info("pid %d: ioctl answered EFAULT: %s: %d bytes at 0x%x: %s", st.pid, what, st.size, st.remote, why)
        st.rq.ioctl(-errno.EFAULT)
