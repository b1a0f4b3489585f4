"""The ioctl path: one request object from the kernel's request to the dispatcher's answer.

Most ioctls are answered on the loop thread; the few that need the server's
own files while they run (resolving a container fd, opening a device file to
hand off) run on a worker and are answered from there later, since doing
them inline would make the loop wait for itself (``OFF_LOOP``).  Either
way the answer goes out last: the fds the ioctl fetched from the client are
closed and its hold on the open is dropped first (``_ReplyLast``), as the
kernel's fdputs precede the return of its ioctl.

FUSE ioctls are restricted: the argument is read where it lies, through the
calling thread (``ProcessMemory``); an argument struct is first read inline
by the loop, with nothing held, and written back after the handler
(:mod:`.argwindow`).  No thread that runs handlers (the loop,
the workers, the stall pool: ``memory.serving_thread``) waits for a client's
memory past ``STALL_CHECK``, since a handler may hold the model's lock; a
copy still running then costs only its own request, which the runtime's stall
pool finishes, waiting with nothing held.  A stalled read unwinds the
handler before it acts (``CopyStalled``, a RetryRequest); the copy already
running is waited for and the handler runs again (``ResumedMemory``), as
often as reads stall.  A stalled write comes after the handler acted, so the
result stands and is answered once the writes end, or EFAULT as a failing
copy_to_user makes it.  CUSE ioctls are unrestricted: the
kernel sends the argument bytes the server asked for in its last retry
reply, and :mod:`.retry` plans those rounds from what the handler reads.
The retry reaches the handler as an exception (``RetryRequest``, which every
layer that catches Exception lets through, and ``RetryMemory.incomplete`` in
case one does not): the handler runs again with more bytes, which is safe
because every VFIO handler reads all of its input before it acts.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple, Union

from ..dispatch import Dispatcher, RetryRequest
from ..errors import VfioError
from ..memory import CopyStalled, ProcessMemory, ResumedMemory, tgid_of
from ..uapi.ioctls import VFIO_DEVICE_PCI_HOT_RESET, VFIO_GROUP_GET_DEVICE_FD, VFIO_GROUP_SET_CONTAINER, NodeKind
from .argwindow import WINDOWED, Answered, ArgWindow, InlineArgs
from .handles import Handle, HandleTable
from .retry import CuseIoctlArg, RetryMemory, RetryState
from .shim import Request, payload

if TYPE_CHECKING:
    from .caller import RequestCaller
    from .runtime import Runtime

log = logging.getLogger(__name__)

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


class _ReplyLast:
    """A request whose reply goes out only after ``put_back``: the files the ioctl took (the
    fds it fetched from the client, its own open's hold) are let go first, as the kernel's
    fdputs come before its ioctl returns, so a close or a group ioctl the client makes right
    after the reply finds them released."""

    def __init__(self, rq: Union[Request, "_ReplyLast"], put_back: Callable[[], None]):
        self._rq = rq
        self._put_back = put_back

    @property
    def replied(self) -> bool:
        return self._rq.replied

    def ioctl(self, result: int, data: bytes = b"") -> None:
        self._put_back()
        self._rq.ioctl(result, data)

    def err(self, err: int) -> None:
        self._put_back()
        self._rq.err(err)

    def ioctl_retry(self, ranges) -> int:
        self._put_back()
        return self._rq.ioctl_retry(ranges)


@dataclass
class IoctlRequest:
    """One ioctl as the kernel sent it: on which open, which call, from which thread, with which bytes."""

    rq: Union[Request, _ReplyLast]
    handle: Handle
    cmd: int
    arg: int
    tid: int
    uid: int
    sid: int
    #: unrestricted (CUSE): ``in_data`` holds what the last retry asked for
    cuse: bool = False
    in_data: bytes = b""
    in_size: int = 0
    out_size: int = 0

    @classmethod
    def from_kernel(cls, rq: Request, r, handle: Handle, cuse: bool) -> "IoctlRequest":
        return cls(rq, handle, r.cmd, r.arg, r.pid, r.uid, r.sid, cuse,
                   payload(r.in_buf, r.in_size) if cuse else b"", r.in_size, r.out_size)

    @property
    def key(self) -> Tuple[int, int]:
        """What a retry is known by: the session and the calling thread (one ioctl at a time each)."""
        return self.sid, self.tid

    @property
    def off_loop(self) -> bool:
        return self.cmd in _OFF_LOOP_BY_KIND[self.handle.kind]


class IoctlPath:
    """Serves ioctls of every file system; ``make_caller(tid, uid)`` is the RequestCaller of a request."""

    def __init__(self, dispatcher: Dispatcher, handles: HandleTable, runtime: "Runtime",
                 make_caller: Callable[[int, int], RequestCaller], secret: int):
        self.dispatcher = dispatcher
        self.handles = handles
        self.runtime = runtime
        self.make_caller = make_caller
        self.secret = secret
        self._lock = threading.Lock()
        self._retries: Dict[Tuple[int, int], RetryState] = {}
        self.args = InlineArgs(runtime)

    def close(self) -> None:
        self.args.close()

    # -- entry points ----------------------------------------------------------------------
    def restricted(self, rq: Request, r, handle: Handle) -> None:
        """A FUSE file's ioctl.  The hot path: answered on the loop thread (GET_API_VERSION, GET_STATUS...)."""
        cmd = r.cmd
        if cmd in _OFF_LOOP_BY_KIND[handle.kind] or cmd == VFIO_CUSE_IDENTIFY:
            self.submit(IoctlRequest.from_kernel(rq, r, handle, cuse=False))
            return
        tid = r.pid
        try:
            memory = self.args.fetch(rq, tid, r.arg) if cmd in WINDOWED[handle.kind] else ProcessMemory(tid)
            caller = self.make_caller(tid, r.uid)
            try:
                result = self.dispatch(handle, cmd, r.arg, caller, memory)
            finally:
                caller.done()
            if memory.stalled is None and not memory.pending:
                if type(memory) is ArgWindow:
                    result = self.args.write_back(rq, memory, result)
                if not memory.pending:
                    rq.ioctl(result)
                    return
        except Answered:
            return
        self.stalled(IoctlRequest.from_kernel(rq, r, handle, cuse=False), memory, result)

    def unrestricted(self, rq: Request, r, handle: Handle) -> None:
        """A CUSE device's ioctl, with the bytes of its last retry."""
        self.submit(IoctlRequest.from_kernel(rq, r, handle, cuse=True))

    def forget(self, sid: int, fh: int) -> None:
        """RELEASE of ``fh``: a retry still planned for it will never come."""
        with self._lock:
            for key in [k for k, v in self._retries.items() if k[0] == sid and v.fh == fh]:
                del self._retries[key]

    # -- the path --------------------------------------------------------------------------
    def submit(self, req: IoctlRequest) -> None:
        """The server's identify ioctl, or the request: on this thread, or on a worker when off-loop."""
        rq = req.rq
        if req.cmd == VFIO_CUSE_IDENTIFY and req.arg == self.secret and tgid_of(req.tid) == os.getpid():
            rq.ioctl(req.handle.fh)
            return
        if not req.off_loop:
            self.run(req)
            return
        self.defer(req, lambda fdput: self.run(req, fdput), self.runtime.workers)

    def dispatch(self, handle: Handle, cmd: int, value: int, caller, memory: ProcessMemory) -> int:
        """A restricted ioctl's result; void (0) when a read stalled: ``memory.stalled`` says so."""
        try:
            return self.dispatcher.ioctl(handle.file_object, cmd, self.dispatcher.make_arg(value, caller, memory))
        except CopyStalled:
            return 0

    def stalled(self, req: IoctlRequest, memory: ProcessMemory, result: int) -> None:
        """A copy of ``req``'s argument stalled on a serving thread: the stall pool finishes the request."""
        if memory.stalled is not None:
            log.info("pid %d: ioctl 0x%x: %r stalled; the request runs again once it ends",
                     req.tid, req.cmd, memory.stalled)
        self.defer(req, lambda fdput: self._finish_stalled(req, memory, result, fdput), self.runtime.stalls,
                   memory.abandon)

    def _finish_stalled(self, req: IoctlRequest, memory: ProcessMemory, result: int,
                        fdput: Callable[[], None]) -> None:
        """Each stalled read waited for with nothing held, then the handler again; then the writes."""
        rq = _ReplyLast(req.rq, fdput)
        try:
            while memory.stalled is not None:
                memory = ResumedMemory(memory)
                caller = self.make_caller(req.tid, req.uid)
                try:
                    result = self.dispatch(req.handle, req.cmd, req.arg, caller, memory)
                finally:
                    caller.done()
            try:
                memory.finish_writes()
            except VfioError as e:
                log.info("pid %d: ioctl 0x%x acted, but its result cannot be written back: %s",
                         req.tid, req.cmd, e.strerror)
                result = -e.errno
        finally:
            memory.abandon()
        rq.ioctl(result)

    def defer(self, req: IoctlRequest, job: Callable[[Callable[[], None]], None], pool,
              drop: Optional[Callable[[], None]] = None) -> None:
        """``job(fdput)`` answers ``req`` on a thread of ``pool``, its handle held until ``fdput``
        (fdget); EIO, and ``drop``, when the runtime no longer takes work."""
        rq = req.rq
        if not self.runtime.accepts_work():
            if drop is not None:
                drop()
            rq.err(errno.EIO)
            return
        self.handles.hold(req.handle)
        held = [True]

        def fdput() -> None:
            if held:
                held.clear()
                self.handles.unhold(req.handle)

        def deferred() -> None:
            try:
                job(fdput)
            except Exception:
                log.exception("pid %d: ioctl 0x%x failed inside the server", req.tid, req.cmd)
                fdput()
                if not rq.replied:
                    rq.err(errno.EIO)
            finally:
                fdput()

        try:
            assert pool is not None, "the runtime is started"
            pool.submit(deferred)
        except RuntimeError:  # shut down meanwhile
            fdput()
            if drop is not None:
                drop()
            rq.err(errno.EIO)

    def run(self, req: IoctlRequest, fdput: Optional[Callable[[], None]] = None) -> None:
        caller = self.make_caller(req.tid, req.uid)

        def put_back() -> None:
            caller.done()
            if fdput is not None:
                fdput()

        req.rq = _ReplyLast(req.rq, put_back)  # (this request is run's own: no copy on every ioctl)
        try:
            if not req.cuse:
                # FUSE: a restricted ioctl, the argument is read where it lies,
                # through the calling thread (process_vm_* take any tid of the
                # process, so the tgid is looked up only if someone asks).
                memory = ProcessMemory(req.tid)
                result = self.dispatch(req.handle, req.cmd, req.arg, caller, memory)
                if memory.stalled is None and not memory.pending:
                    req.rq.ioctl(result)
                else:
                    self.stalled(req, memory, result)
                return
            self.run_cuse(req, caller)
        finally:
            caller.done()

    def run_cuse(self, req: IoctlRequest, caller) -> None:
        """One round of the unrestricted-ioctl retry protocol (cv_reply_ioctl_retry in csrc/shim.c)."""
        rq, key, cmd, arg = req.rq, req.key, req.cmd, req.arg
        with self._lock:
            state = self._retries.pop(key, None)
        if req.in_size == 0 and req.out_size == 0:
            ranges: List[Tuple[int, int]] = []  # a new call: the kernel sends nothing first
        elif state is not None and state.matches(req.handle.fh, cmd, arg, req.in_size, req.out_size):
            ranges = state.ranges
        else:
            log.error("thread %d: CUSE ioctl 0x%x came back with %d/%d bytes that no retry of ours asked for",
                      key[1], cmd, req.in_size, req.out_size)
            rq.err(errno.EIO)
            return
        memory = RetryMemory(key[1], ranges, req.in_data)
        io_arg = CuseIoctlArg(arg, caller, memory, record=self.dispatcher.trace is not None)
        try:
            result = self.dispatcher.ioctl(req.handle.file_object, cmd, io_arg)
            retry = memory.incomplete
            if retry:
                log.debug("thread %d: ioctl 0x%x: a RetryRequest was caught below the dispatcher", key[1], cmd)
        except RetryRequest:
            retry = True
        if not retry:
            rq.ioctl(result, memory.out_data())
            return
        try:
            wanted = memory.next_ranges()
        except VfioError as e:
            log.info("thread %d: ioctl 0x%x: %s", key[1], cmd, e.strerror)
            rq.err(e.errno)
            return
        with self._lock:
            self._retries[key] = RetryState(req.handle.fh, cmd, arg, wanted)
        if rq.ioctl_retry(wanted) == -errno.ENOMEM:
            with self._lock:
                self._retries.pop(key, None)
            rq.err(errno.ENOMEM)
