"""Submission and completion queues in host memory, and PRP data pointers, all reached by DMA.

Every access goes through the function's ``DmaPort`` (the container's IOMMU).
Queue entries move in batches: the new SQ entries between head and tail in
at most two DMA reads (the ring may wrap), completions in at most two DMA
writes.  A PRP list becomes a list of ``(iova, length)`` segments with
contiguous pages merged, so a buffer that is contiguous in IOVA space is
one DMA transfer however many pages it spans.
"""

from __future__ import annotations

import collections
import struct
from typing import Deque, List, Optional, Tuple

from ...errors import VfioError
from . import spec

_SQE_SIZE = spec.SQE_SIZE
_CQE_SIZE = spec.CQE_SIZE
_unpack_sqe = spec.SQE.unpack_from
_pack_cqe = spec.CQE.pack_into


class QueueFault(Exception):
    """A queue entry could not be read or written by DMA: the controller has failed (CSTS.CFS)."""


class SubmissionQueue:
    __slots__ = ("qid", "base", "size", "head", "tail", "cq", "inflight", "priority", "pending")

    def __init__(self, qid: int, base: int, size: int, cq: "CompletionQueue", priority: int = 0):
        self.qid = qid
        self.base = base
        self.size = size
        self.head = 0
        self.tail = 0
        self.cq = cq
        #: commands fetched whose completion is not yet posted (to run, held back, or waiting for CQ room)
        self.inflight = 0
        self.priority = priority
        #: fetched entries a round has not run yet
        self.pending: Deque[tuple] = collections.deque()

    def fetch(self, dma, limit: int) -> List[tuple]:
        """Read up to ``limit`` new entries (head..tail) and move head past them."""
        available = (self.tail - self.head) % self.size
        n = min(available, limit)
        if n <= 0:
            return []
        head, size = self.head, self.size
        first = min(n, size - head)
        try:
            raw = dma.read(self.base + head * _SQE_SIZE, first * _SQE_SIZE)
            if n > first:
                raw += dma.read(self.base, (n - first) * _SQE_SIZE)
        except VfioError as e:
            raise QueueFault(f"SQ {self.qid}: fetching {n} entries at head {head} failed: {e.strerror}") from None
        self.head = (head + n) % size
        return [_unpack_sqe(raw, i * _SQE_SIZE) for i in range(n)]


class CompletionQueue:
    __slots__ = ("qid", "base", "size", "head", "tail", "phase", "ien", "vector", "waiting", "sqs")

    def __init__(self, qid: int, base: int, size: int, ien: bool, vector: int):
        self.qid = qid
        self.base = base
        self.size = size
        self.head = 0
        self.tail = 0
        self.phase = 1
        self.ien = ien
        self.vector = vector
        #: completions not yet posted: (dw0, sq, cid, status)
        self.waiting: Deque[tuple] = collections.deque()
        #: the submission queues that complete here
        self.sqs: List[SubmissionQueue] = []

    def room(self) -> int:
        return (self.head - self.tail - 1) % self.size

    def post(self, dma) -> int:
        """Write as many waiting completions as there is room for; returns how many were posted.

        A queue whose write faults is left as it was: the controller is failing anyway (CSTS.CFS).
        """
        n = min(self.room(), len(self.waiting))
        if n <= 0:
            return 0
        buf = bytearray(n * _CQE_SIZE)
        tail, phase, size, waiting = self.tail, self.phase, self.size, self.waiting
        for i in range(n):
            dw0, sq, cid, status = waiting[i]
            _pack_cqe(buf, i * _CQE_SIZE, dw0, 0, sq.head, sq.qid, cid, (status << 1) | phase)
            tail += 1
            if tail == size:
                tail = 0
                phase ^= 1
        first = min(n, size - self.tail)
        try:
            if n > first:
                view = memoryview(buf)
                dma.write(self.base + self.tail * _CQE_SIZE, view[:first * _CQE_SIZE])
                dma.write(self.base, view[first * _CQE_SIZE:])
            else:
                dma.write(self.base + self.tail * _CQE_SIZE, buf)
        except VfioError as e:
            raise QueueFault(f"CQ {self.qid}: posting {n} completions at tail {self.tail} failed: "
                             f"{e.strerror}") from None
        popleft = waiting.popleft
        for _ in range(n):
            popleft()[1].inflight -= 1
        self.tail, self.phase = tail, phase
        return n


def map_prps(dma, prp1: int, prp2: int, length: int, page: int) -> Tuple[int, List[Tuple[int, int]]]:
    """The data pointer of a command as ``(status, [(iova, length), ...])`` (NVMe 1.4, 4.3).

    PRP1 may carry an offset into its page (dword aligned); the rest of the
    transfer is one more page in PRP2, or a PRP list there (qword aligned,
    possibly inside a page), whose last entry chains to the next list page
    when the transfer needs more entries than fit.  Entries after PRP1 must
    be page aligned (PRP Offset Invalid otherwise); a list page the IOMMU
    refuses is a Data Transfer Error.
    """
    mask = page - 1
    if prp1 & 3:
        return spec.PRP_OFFSET_INVALID | spec.DNR, []
    first = min(length, page - (prp1 & mask))
    segs = [[prp1, first]]
    left = length - first
    if left <= 0:
        return spec.SUCCESS, [(a, n) for a, n in segs]
    if left <= page:
        if prp2 & mask:
            return spec.PRP_OFFSET_INVALID | spec.DNR, []
        _append(segs, prp2, left)
        return spec.SUCCESS, [(a, n) for a, n in segs]
    if prp2 & 7:
        return spec.PRP_OFFSET_INVALID | spec.DNR, []
    list_addr = prp2
    while left > 0:
        room = (page - (list_addr & mask)) >> 3
        needed = (left + page - 1) // page
        chained = needed > room
        count = room if chained else needed
        try:
            raw = dma.read(list_addr, count * 8)
        except VfioError:
            return spec.DATA_TRANSFER_ERROR, []
        entries = struct.unpack(f"<{count}Q", raw)
        data_entries = count - 1 if chained else count
        for i in range(data_entries):
            addr = entries[i]
            if addr & mask:
                return spec.PRP_OFFSET_INVALID | spec.DNR, []
            n = page if left > page else left
            _append(segs, addr, n)
            left -= n
        if chained:
            list_addr = entries[count - 1]
            if list_addr & mask:
                return spec.PRP_OFFSET_INVALID | spec.DNR, []
    return spec.SUCCESS, [(a, n) for a, n in segs]


def _append(segs: list, addr: int, n: int) -> None:
    last = segs[-1]
    if last[0] + last[1] == addr:
        last[1] += n
    else:
        segs.append([addr, n])


def read_from_host(dma, segments, length: int) -> Optional[bytes]:
    """The bytes of a host buffer (one scatter-list read); None when the IOMMU refuses a segment."""
    try:
        return dma.readv(segments)
    except VfioError:
        return None


def write_to_host(dma, segments, data) -> bool:
    """Copy ``data`` into a host buffer in segment order; False when the IOMMU refuses a segment.

    One scatter-list write: segments before the refused one have already been
    written, as a device streaming the data in order would have.
    """
    try:
        dma.writev(segments, data)
    except VfioError:
        return False
    return True


def data_to_host(dma, cmd: tuple, data: bytes, page: int) -> int:
    """Send ``data`` to the PRPs of ``cmd`` (an unpacked SQE): a status."""
    if cmd[1] >> spec.FLAGS_PSDT_SHIFT:
        return spec.INVALID_FIELD | spec.DNR       # SGLS is 0: PRPs only
    status, segments = map_prps(dma, cmd[6], cmd[7], len(data), page)
    if status:
        return status
    return spec.SUCCESS if write_to_host(dma, segments, data) else spec.DATA_TRANSFER_ERROR


def data_from_host(dma, cmd: tuple, length: int, page: int) -> Tuple[int, bytes]:
    """``length`` bytes from the PRPs of ``cmd``: (status, data)."""
    if cmd[1] >> spec.FLAGS_PSDT_SHIFT:
        return spec.INVALID_FIELD | spec.DNR, b""
    status, segments = map_prps(dma, cmd[6], cmd[7], length, page)
    if status:
        return status, b""
    data = read_from_host(dma, segments, length)
    if data is None:
        return spec.DATA_TRANSFER_ERROR, b""
    return spec.SUCCESS, data
