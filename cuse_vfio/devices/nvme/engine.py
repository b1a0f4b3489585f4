"""The queue engine of an NVMe controller: doorbells in, commands run, completions and interrupts out.

One *round* looks at every submission queue with new entries (admin queue
first, then I/O queues in order), fetches up to an arbitration burst of
entries from each in one DMA read, runs them, then posts each touched
completion queue's new entries in one DMA write and signals its interrupt
once.  A command whose completion cannot be posted yet (its CQ is full)
waits in the CQ; an SQ stops being fetched while it has a queue's worth of
such commands, and is fetched again when the host's CQ head doorbell makes
room.

Rounds run either on the thread that wrote the doorbell (``inline``: what
tests use, deterministic) or on the controller's I/O thread (the default when
serving): the doorbell write then only records the new tail and wakes the
thread, so the serving loop answers the client at once; the thread takes
the device lock for one round at a time, so register accesses and doorbells
of other queues get in between rounds.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Dict, List, Optional

from . import spec
from .queues import CompletionQueue, QueueFault, SubmissionQueue

log = logging.getLogger(__name__)

#: most entries fetched from one SQ in a round (also the arbitration burst's ceiling)
ROUND_BURST = 64
#: data a round moves before it stops running commands (the I/O thread then lets go of the device lock)
ROUND_BYTES = 1 << 20


class Delayed:
    """A command held back by a ``delay`` injection rule (or aborted while held)."""

    __slots__ = ("sq", "cmd", "cancelled")

    def __init__(self, sq: SubmissionQueue, cmd: tuple):
        self.sq = sq
        self.cmd = cmd
        self.cancelled = False


class QueueEngine:
    def __init__(self, ctrl, max_queues: int):
        self.ctrl = ctrl
        self.max_queues = max_queues
        #: queues by id (None: not created), and the ones that exist in id order (what a round walks)
        self.sqs: List[Optional[SubmissionQueue]] = [None] * (max_queues + 1)
        self.cqs: List[Optional[CompletionQueue]] = [None] * (max_queues + 1)
        self.live_sqs: List[SubmissionQueue] = []
        self.live_cqs: List[CompletionQueue] = []
        self.delayed: Dict[tuple, Delayed] = {}
        #: opcode -> handler(sq, cmd), for the admin queue and for I/O queues (filled by the command sets)
        self.admin_handlers: Dict[int, Callable[..., int]] = {}
        self.io_handlers: Dict[int, Callable[..., int]] = {}
        #: data moved by the commands of the current round (the handlers add to it)
        self.moved = 0
        self._turn = 0

    def clear(self) -> None:
        """Every queue and every command in flight is gone (a controller reset): nothing is completed."""
        self.sqs = [None] * (self.max_queues + 1)
        self.cqs = [None] * (self.max_queues + 1)
        self.live_sqs, self.live_cqs = [], []
        for item in self.delayed.values():
            item.cancelled = True
        self.delayed.clear()

    # -- queues ---------------------------------------------------------------------------
    def add_cq(self, qid: int, base: int, size: int, ien: bool, vector: int) -> CompletionQueue:
        cq = self.cqs[qid] = CompletionQueue(qid, base, size, ien, vector)
        self.live_cqs = [q for q in self.cqs if q is not None]
        return cq

    def add_sq(self, qid: int, base: int, size: int, cqid: int, priority: int = 0) -> SubmissionQueue:
        cq = self.cqs[cqid]
        assert cq is not None  # CREATE I/O SQ checked that the CQ exists
        sq = self.sqs[qid] = SubmissionQueue(qid, base, size, cq, priority)
        cq.sqs.append(sq)
        self.live_sqs = [q for q in self.sqs if q is not None]
        return sq

    def delete_sq(self, sq: SubmissionQueue) -> None:
        """Commands fetched but not run, and those held back, complete with Command Aborted due to SQ Deletion."""
        while sq.pending:
            self.complete(sq, sq.pending.popleft(), spec.ABORT_SQ_DELETION)
        for key in [k for k in self.delayed if k[0] == sq.qid]:
            item = self.delayed.pop(key)
            item.cancelled = True
            self.complete(sq, item.cmd, spec.ABORT_SQ_DELETION)
        self.sqs[sq.qid] = None
        self.live_sqs.remove(sq)
        sq.cq.sqs.remove(sq)
        self.post(sq.cq)

    def delete_cq(self, cq: CompletionQueue) -> None:
        self.cqs[cq.qid] = None
        self.live_cqs.remove(cq)
        cq.waiting.clear()
        self.ctrl.update_intx()

    # -- doorbells ------------------------------------------------------------------------
    def doorbell(self, offset: int, value: int) -> bool:
        """A doorbell write (the controller is enabled); True when there is new work for a round."""
        index = (offset - spec.REG_DBS) >> 2
        qid, is_cq = index >> 1, index & 1
        value &= 0xFFFF
        queues = self.cqs if is_cq else self.sqs
        queue = queues[qid] if qid < len(queues) else None
        if queue is None:
            self.ctrl.doorbell_error(qid, is_cq, spec.AER_ERROR_INVALID_DB_REGISTER,
                                     f"{'CQ head' if is_cq else 'SQ tail'} doorbell of queue {qid}, which does "
                                     "not exist")
            return False
        if isinstance(queue, CompletionQueue):
            unconsumed = (queue.tail - queue.head) % queue.size
            if value >= queue.size or (value - queue.head) % queue.size > unconsumed:
                self.ctrl.doorbell_error(qid, True, spec.AER_ERROR_INVALID_DB_VALUE,
                                         f"CQ {qid} head {value}: beyond the {queue.size}-entry queue or past "
                                         f"the {unconsumed} entries posted since head {queue.head}")
                return False
            queue.head = value
            self.ctrl.update_intx()
            return bool(queue.waiting) or any(sq.head != sq.tail for sq in queue.sqs)
        free = (queue.head - queue.tail - 1) % queue.size
        if value >= queue.size or (value - queue.tail) % queue.size > free:
            self.ctrl.doorbell_error(qid, False, spec.AER_ERROR_INVALID_DB_VALUE,
                                     f"SQ {qid} tail {value}: beyond the {queue.size}-entry queue or more than "
                                     f"the {free} free entries after tail {queue.tail}")
            return False
        queue.tail = value
        return value != queue.head

    # -- a round --------------------------------------------------------------------------
    def round(self) -> bool:
        """Fetch and run what the SQs hold, post completions; True when work is left for another round.

        SQs take turns (round robin: each round starts one queue further),
        and a round stops running commands once it has moved ROUND_BYTES of
        data: the fetched rest waits in its SQ for the next round, so the I/O
        thread lets go of the device lock often whatever the host submits.
        """
        ctrl = self.ctrl
        if not ctrl.running:
            return False
        dma = ctrl.dma
        ab = ctrl.features.arbitration & 0x7             # Arbitration Burst: 2^AB commands, 7 = no limit
        burst = ROUND_BURST if ab == 0x7 else min(ROUND_BURST, 1 << ab)
        touched = [cq for cq in self.live_cqs if cq.waiting and cq.room()]  # room made by a CQ head doorbell
        execute = self.execute
        live = self.live_sqs
        self._turn = turn = (self._turn + 1) % len(live) if live else 0
        self.moved = 0
        for sq in live[turn:] + live[:turn]:
            pending = sq.pending
            if not pending:
                if sq.head == sq.tail:
                    continue
                limit = min(burst, sq.size - 1 - sq.inflight)
                if limit <= 0:
                    continue
                try:
                    pending.extend(sq.fetch(dma, limit))
                except QueueFault as e:
                    ctrl.fail(str(e))
                    return False
                sq.inflight += len(pending)
            while pending and self.moved < ROUND_BYTES:
                execute(sq, pending.popleft())
                if not ctrl.running:                    # controller fatal status: nothing more runs
                    return False
            if sq.cq not in touched:
                touched.append(sq.cq)
        for cq in touched:
            self.post(cq)
        if not ctrl.running:
            return False
        for sq in live:
            if sq.pending or (sq.head != sq.tail and sq.inflight < sq.size - 1):
                return True
        for cq in self.live_cqs:
            if cq.waiting and cq.room():
                return True
        return False

    def execute(self, sq: SubmissionQueue, cmd: tuple, injected: bool = True) -> None:
        ctrl = self.ctrl
        admin = sq.qid == 0
        if injected and ctrl.injector.rules:
            rule = ctrl.injector.check(admin, cmd)
            if rule is not None and self._inject(rule, sq, cmd):
                return
        handler = (self.admin_handlers if admin else self.io_handlers).get(cmd[0])
        if cmd[1] & spec.FLAGS_FUSE_MASK:
            result = spec.INVALID_FIELD | spec.DNR      # FUSES is 0: no fused operations
        elif handler is None:
            result = spec.INVALID_OPCODE | spec.DNR
        else:
            result = handler(sq, cmd)
            if result is None:                          # parked (an Asynchronous Event Request)
                return
        if result.__class__ is tuple:
            self.complete(sq, cmd, result[0], result[1])
        else:
            self.complete(sq, cmd, result)

    def _inject(self, rule, sq: SubmissionQueue, cmd: tuple) -> bool:
        ctrl = self.ctrl
        name = f"{'admin' if sq.qid == 0 else 'I/O'} command 0x{cmd[0]:02x} (SQ {sq.qid}, CID {cmd[2]})"
        if rule.kind == "fatal":
            ctrl.fail(f"inject #{rule.index + 1}: controller fatal status at {name}")
            return True
        if rule.kind == "delay":
            key = (sq.qid, cmd[2])
            item = self.delayed[key] = Delayed(sq, cmd)
            log.info("%s: inject #%d: %s held for %g s", ctrl.name, rule.index + 1, name, rule.seconds)
            ctrl.later(rule.seconds, lambda: self._run_delayed(key, item))
            return True
        status = rule.media_status(cmd[0])
        ns = ctrl.namespace(cmd[3])
        if ns is not None:
            ns.media_errors += 1
        log.info("%s: inject #%d: %s fails with %s", ctrl.name, rule.index + 1, name, spec.status_name(status))
        self.complete(sq, cmd, status, lba=rule.first_lba(cmd[8], cmd[9]))
        return True

    def _run_delayed(self, key: tuple, item: Delayed) -> None:
        if item.cancelled or self.delayed.get(key) is not item or not self.ctrl.running:
            return
        del self.delayed[key]
        self.execute(item.sq, item.cmd, injected=False)
        self.post(item.sq.cq)
        self.ctrl.kick()  # the SQ may have been waiting for this slot

    def abort(self, sqid: int, cid: int) -> bool:
        item = self.delayed.pop((sqid, cid), None)
        if item is None:
            return False
        item.cancelled = True
        self.complete(item.sq, item.cmd, spec.ABORT_REQUESTED)
        return True

    # -- completions ----------------------------------------------------------------------
    def complete(self, sq: SubmissionQueue, cmd: tuple, status: int, dw0: int = 0, lba: Optional[int] = None) -> None:
        """Queue the completion of ``cmd`` on its CQ (posted by the round, or by ``post``)."""
        sq.cq.waiting.append((dw0, sq, cmd[2], status))
        if status:
            self.ctrl.command_failed(sq, cmd, status, lba)

    def post(self, cq: CompletionQueue) -> bool:
        """Post what fits and interrupt once; False when nothing was posted."""
        if not cq.waiting or self.cqs[cq.qid] is not cq:
            return False
        try:
            posted = cq.post(self.ctrl.dma)
        except QueueFault as e:
            self.ctrl.fail(str(e))
            return False
        if posted:
            self.ctrl.interrupt(cq)
        return bool(posted)


class IoThread:
    """The thread that runs a controller's rounds off the serving loop (one per controller, started on demand)."""

    def __init__(self, ctrl):
        self._ctrl = ctrl
        self._wake = threading.Event()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    def kick(self) -> None:
        if self._thread is None and not self._stopping:
            self._thread = threading.Thread(target=self._run, name=f"nvme-io {self._ctrl.name}", daemon=True)
            self._thread.start()
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
            if thread.is_alive():
                log.warning("%s: the NVMe I/O thread did not stop", self._ctrl.name)

    def _run(self) -> None:
        ctrl = self._ctrl
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            busy = True
            while busy and not self._stopping:
                with ctrl.lock:
                    busy = ctrl.run_round()
