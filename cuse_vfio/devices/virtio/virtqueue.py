"""Split virtqueues (virtio 1.x, 2.7) as the device side sees them: every access is DMA.

The three areas a driver gives for one queue (``include/uapi/linux/virtio_ring.h``)::

    descriptor table  size x {le64 addr, le32 len, le16 flags, le16 next}
    available ring    le16 flags, le16 idx, le16 ring[size], le16 used_event
    used ring         le16 flags, le16 idx, {le32 id, le32 len}[size], le16 avail_event

Nothing here keeps a pointer into the driver's memory: each read or write
goes through the function's :class:`~cuse_vfio.devices.pci.DmaPort`, so the
container's IOMMU checks it.  A refused transfer raises ``VfioError`` (the
IOMMU logged the fault) and moves nothing; a ring that breaks the spec's rules
raises :class:`VirtqueueError`, with the sentence QEMU's ``virtio_error`` would
log.  The device model decides what either means for the device.

Reads are batched where the rules allow it: the descriptor table is read
whole once per new available index (the driver may not touch the descriptors
of a buffer it made available, and only those are walked), the available
entries in at most two reads, the used entries of a batch written in at most
two writes before the index that publishes them.
"""

from __future__ import annotations

import collections
import functools
import struct
from typing import Deque, List, Optional, Tuple

from ...errors import VfioError

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29

VIRTIO_MSI_NO_VECTOR = 0xFFFF
#: QEMU's VIRTQUEUE_MAX_SIZE: the largest ring, and the longest chain or indirect table
VIRTQUEUE_MAX_SIZE = 1024

DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


def vring_need_event(event: int, new: int, old: int) -> bool:
    """``vring_need_event``: did the index move from ``old`` to ``new`` cross ``event``?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class VirtqueueError(Exception):
    """The driver broke a rule of the ring; the device needs a reset (QEMU's ``virtio_error``)."""


class QueueDmaError(Exception):
    """A DMA of this queue (ring or buffer) was refused by the IOMMU, which logged the fault."""

    def __init__(self, queue: "SplitVirtqueue", cause: VfioError):
        super().__init__(f"queue {queue.index}: {cause.strerror}")
        self.queue = queue
        self.cause = cause


def _queue_dma(method):
    """Tell which queue a refused DMA belonged to: the device may stop just that queue."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except VfioError as e:
            raise QueueDmaError(self, e) from None

    return wrapper


class Chain:
    """One descriptor chain the device popped: where it may read, where it may write."""

    __slots__ = ("head", "readable", "writable")

    def __init__(self, head: int, readable: List[Tuple[int, int]], writable: List[Tuple[int, int]]):
        self.head = head
        #: [(iova, length)] the device reads, in chain order
        self.readable = readable
        #: [(iova, length)] the device writes, in chain order
        self.writable = writable

    @property
    def read_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def write_len(self) -> int:
        return sum(n for _, n in self.writable)

    def __repr__(self) -> str:
        return f"Chain(head={self.head}, readable={self.readable}, writable={self.writable})"


class SplitVirtqueue:
    """One queue: its registers as the transport sets them, and the device's side of the rings."""

    def __init__(self, dma, index: int, max_size: int):
        if max_size & (max_size - 1) or not 0 < max_size <= VIRTQUEUE_MAX_SIZE:
            raise ValueError(f"a queue size must be a power of two up to {VIRTQUEUE_MAX_SIZE}, not {max_size}")
        self.dma = dma
        self.index = index
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        """``virtio_queue_reset``: no rings, the default size, no vector, indexes at 0."""
        self.size = self.max_size
        #: the addresses the device uses (0: the queue does not exist for the driver yet)
        self.desc = self.avail = self.used = 0
        #: the modern interface's queue registers, copied to the above at queue_enable
        self.reg_desc = self.reg_avail = self.reg_used = 0
        self.enabled = False
        self.vector = VIRTIO_MSI_NO_VECTOR
        self.event_idx = False
        #: a DMA fault stopped this queue (legacy interface: no DEVICE_NEEDS_RESET to report it)
        self.stopped = False
        self.last_avail = 0
        self.used_idx = 0
        self.signalled_used = 0
        self.signalled_valid = False
        self.notification = True
        self._used_flags = 0
        self._shadow_avail = 0
        self._heads: Deque[int] = collections.deque()
        self._table: Optional[bytes] = None
        self._pending: List[Tuple[int, int]] = []

    # -- setup -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.desc != 0

    def set_rings(self, desc: int, avail: int, used: int) -> None:
        self.desc, self.avail, self.used = desc, avail, used
        self.last_avail = self.used_idx = self._shadow_avail = 0
        self.signalled_valid = False
        self.notification = True
        self._used_flags = 0  # the driver hands over a zeroed used ring
        self._heads.clear()
        self._table = None
        self._pending = []

    def set_legacy_address(self, pa: int) -> None:
        """The legacy layout: the three areas in one block, the used ring on a 4096-byte boundary."""
        avail = pa + DESC_SIZE * self.size
        used = (avail + 4 + 2 * self.size + 2 + 4095) & ~4095
        self.set_rings(pa, avail, used)

    def activate(self, event_idx: bool) -> None:
        """The negotiated ring features that change the device's side of the protocol."""
        self.event_idx = event_idx

    # -- the available ring --------------------------------------------------------------
    def _read_avail_idx(self) -> int:
        idx = _U16.unpack(self.dma.read(self.avail + 2, 2))[0]
        count = (idx - self.last_avail) & 0xFFFF
        if count > self.size:
            raise VirtqueueError(f"queue {self.index}: the driver moved the available index from "
                                 f"{self.last_avail} to {idx}, more than the {self.size} entries of the ring")
        return idx

    def _fetch_heads(self) -> None:
        """Read the entries published since the last look (at most two reads: the ring may wrap)."""
        idx = self._read_avail_idx()
        start = (self.last_avail + len(self._heads)) & 0xFFFF
        count = (idx - start) & 0xFFFF
        if not count:
            return
        self._shadow_avail = idx
        self._table = None  # new descriptors may have been written before this index was published
        pos = start % self.size
        first = min(count, self.size - pos)
        raw = self.dma.read(self.avail + 4 + 2 * pos, 2 * first)
        if first < count:
            raw += self.dma.read(self.avail + 4, 2 * (count - first))
        heads = struct.unpack(f"<{count}H", raw)
        for head in heads:
            if head >= self.size:
                raise VirtqueueError(f"queue {self.index}: the driver made descriptor {head} available, "
                                     f"beyond the {self.size} entries of the table")
        self._heads.extend(heads)

    @_queue_dma
    def available(self) -> int:
        """How many chains the driver made available that the device has not popped yet."""
        if not self._heads:
            self._fetch_heads()
        return len(self._heads)

    @_queue_dma
    def pop(self) -> Optional[Chain]:
        """The next available chain, walked and checked; None when the driver offered nothing new."""
        if not self._heads:
            self._fetch_heads()
            if not self._heads:
                return None
        head = self._heads[0]
        chain = self._walk(head)
        self._heads.popleft()
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if self.event_idx and self.notification:
            self._write_avail_event(self.last_avail)
        return chain

    def unpop(self, chain: Chain) -> None:
        """Give back the last popped chain unused (``virtqueue_unpop``): it is popped again next time."""
        self._heads.appendleft(chain.head)
        self.last_avail = (self.last_avail - 1) & 0xFFFF

    def _desc_table(self) -> bytes:
        if self._table is None:
            self._table = self.dma.read(self.desc, DESC_SIZE * self.size)
        return self._table

    def _walk(self, head: int) -> Chain:
        """``virtqueue_split_pop``'s walk, with its checks (loops, order, sizes, indirect tables)."""
        table = self._desc_table()
        limit = self.size
        addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * head)
        indirect = False
        if flags & VRING_DESC_F_INDIRECT:
            if not length or length % DESC_SIZE:
                raise VirtqueueError(f"queue {self.index}: an indirect table of {length} bytes is not a "
                                     f"whole number of {DESC_SIZE}-byte descriptors")
            if length // DESC_SIZE > VIRTQUEUE_MAX_SIZE:
                raise VirtqueueError(f"queue {self.index}: an indirect table of {length // DESC_SIZE} "
                                     f"descriptors is longer than {VIRTQUEUE_MAX_SIZE}")
            table = self.dma.read(addr, length)
            limit = length // DESC_SIZE
            indirect = True
            addr, length, flags, nxt = _DESC.unpack_from(table, 0)
        readable: List[Tuple[int, int]] = []
        writable: List[Tuple[int, int]] = []
        seen = 0
        while True:
            if flags & VRING_DESC_F_INDIRECT:
                where = "inside an indirect table" if indirect else "in the middle of a chain"
                raise VirtqueueError(f"queue {self.index}: an indirect descriptor {where}")
            if not length:
                raise VirtqueueError(f"queue {self.index}: a zero-sized buffer in the chain at {head}")
            if flags & VRING_DESC_F_WRITE:
                writable.append((addr, length))
            elif writable:
                raise VirtqueueError(f"queue {self.index}: a device-readable descriptor after a "
                                     f"device-writable one in the chain at {head}")
            else:
                readable.append((addr, length))
            seen += 1
            if seen > limit:
                raise VirtqueueError(f"queue {self.index}: the chain at {head} loops "
                                     f"(more than {limit} descriptors)")
            if not flags & VRING_DESC_F_NEXT:
                return Chain(head, readable, writable)
            if nxt >= limit:
                raise VirtqueueError(f"queue {self.index}: a descriptor of the chain at {head} points "
                                     f"at {nxt}, beyond the {limit} entries of its table")
            addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * nxt)

    # -- buffers ------------------------------------------------------------------------
    @_queue_dma
    def read_chain(self, chain: Chain, limit: int) -> bytes:
        """What the chain's readable descriptors hold; more than ``limit`` bytes is a driver error."""
        total = chain.read_len
        if total > limit:
            raise VirtqueueError(f"queue {self.index}: the chain at {chain.head} offers {total} bytes, "
                                 f"more than the {limit} a buffer of this queue may hold")
        read = self.dma.read
        if len(chain.readable) == 1:
            addr, n = chain.readable[0]
            return read(addr, n)
        return b"".join(read(addr, n) for addr, n in chain.readable)

    @_queue_dma
    def write_chain(self, chain: Chain, data) -> int:
        """Write ``data`` from the start of the chain's writable part; returns how much fitted."""
        view = memoryview(data)
        done = 0
        for addr, n in chain.writable:
            if done >= len(view):
                break
            part = view[done:done + n]
            self.dma.write(addr, part)
            done += len(part)
        return done

    # -- the used ring -----------------------------------------------------------------
    def fill(self, chain: Chain, written: int) -> None:
        """Chain done, ``written`` bytes of it written by the device; published at :meth:`flush`."""
        self._pending.append((chain.head, written))

    @_queue_dma
    def flush(self) -> bool:
        """Publish the filled chains (entries, then the index); True when the driver wants an interrupt."""
        pending = self._pending
        if not pending:
            return False
        self._pending = []
        count = len(pending)
        pos = self.used_idx % self.size
        first = min(count, self.size - pos)
        entries = b"".join(_USED_ELEM.pack(head, n) for head, n in pending)
        self.dma.write(self.used + 4 + 8 * pos, entries[:8 * first])
        if first < count:
            self.dma.write(self.used + 4, entries[8 * first:])
        self.used_idx = (self.used_idx + count) & 0xFFFF
        self.dma.write(self.used + 2, _U16.pack(self.used_idx))
        return self._should_notify()

    def _should_notify(self) -> bool:
        """``virtio_split_should_notify``: the avail ring's flag, or used_event with EVENT_IDX."""
        if not self.event_idx:
            flags = _U16.unpack(self.dma.read(self.avail, 2))[0]
            return not flags & VRING_AVAIL_F_NO_INTERRUPT
        valid, self.signalled_valid = self.signalled_valid, True
        old, self.signalled_used = self.signalled_used, self.used_idx
        used_event = _U16.unpack(self.dma.read(self.avail + 4 + 2 * self.size, 2))[0]
        return not valid or vring_need_event(used_event, self.used_idx, old)

    # -- notifications from the driver ---------------------------------------------------
    @_queue_dma
    def set_notification(self, enable: bool) -> None:
        """Ask the driver to notify new buffers, or not (``virtio_queue_set_notification``)."""
        self.notification = enable
        if self.event_idx:
            if enable:
                self._write_avail_event(_U16.unpack(self.dma.read(self.avail + 2, 2))[0])
            return
        flags = self._used_flags & ~VRING_USED_F_NO_NOTIFY if enable else self._used_flags | VRING_USED_F_NO_NOTIFY
        if flags != self._used_flags:
            self.dma.write(self.used, _U16.pack(flags))
            self._used_flags = flags

    def _write_avail_event(self, value: int) -> None:
        self.dma.write(self.used + 4 + 8 * self.size, _U16.pack(value))
