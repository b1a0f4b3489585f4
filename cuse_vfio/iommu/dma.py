"""A container's DMA mappings: ``struct vfio_dma`` and the ``dma_list`` tree that holds them.

The kernel keeps mappings in an rb-tree keyed by IOVA.  Here they are two
parallel lists sorted by IOVA (starts, mappings) searched with ``bisect``:
lookups are O(log n), and an insert or removal moves pointers with one
``memmove``, which at the 65535-mapping limit costs microseconds.  Mappings
never overlap, so "the last mapping that starts below X" is the only one
that can contain X.
"""

from __future__ import annotations

import bisect
from typing import Iterator, List, Optional

from ..uapi import VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE

#: C's 64-bit unsigned arithmetic: IOVA sums that wrap in the kernel wrap here too
U64_MASK = (1 << 64) - 1


class DmaMapping:
    """One MAP_DMA: ``size`` bytes at ``iova`` backed by ``owner``'s memory at ``vaddr``."""

    __slots__ = ("iova", "size", "vaddr", "prot", "owner", "vaddr_invalid", "dirty")

    def __init__(self, iova: int, size: int, vaddr: int, prot: int, owner):
        self.iova = iova
        self.size = size
        self.vaddr = vaddr
        #: VFIO_DMA_MAP_FLAG_READ / _WRITE, from the device's point of view
        self.prot = prot
        #: the process whose memory backs the mapping (``core.ops.Caller``: ``pid``, ``memory``)
        self.owner = owner
        #: UNMAP_DMA with VFIO_DMA_UNMAP_FLAG_VADDR ran; MAP_DMA with VFIO_DMA_MAP_FLAG_VADDR clears it
        self.vaddr_invalid = False
        #: while dirty tracking is on: one bit per smallest page (``dma->bitmap``)
        self.dirty: Optional[bytearray] = None

    @property
    def end(self) -> int:
        return self.iova + self.size

    @property
    def readable(self) -> bool:
        return bool(self.prot & VFIO_DMA_MAP_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.prot & VFIO_DMA_MAP_FLAG_WRITE)

    def __repr__(self) -> str:
        rw = ("r" if self.readable else "-") + ("w" if self.writable else "-")
        return (f"DmaMapping(iova=0x{self.iova:x}, size=0x{self.size:x}, vaddr=0x{self.vaddr:x}, {rw}, "
                f"pid={getattr(self.owner, 'pid', None)}{', vaddr invalid' if self.vaddr_invalid else ''})")


class DmaList:
    """Mappings in IOVA order (``iommu->dma_list``)."""

    def __init__(self) -> None:
        self._starts: List[int] = []
        self._dmas: List[DmaMapping] = []

    def __len__(self) -> int:
        return len(self._dmas)

    def __iter__(self) -> Iterator[DmaMapping]:
        return iter(list(self._dmas))

    def __getitem__(self, index: int) -> DmaMapping:
        return self._dmas[index]

    def find(self, start: int, size: int) -> Optional[DmaMapping]:
        """``vfio_find_dma``: a mapping overlapping [start, start + size).

        With ``size`` 0 (the kernel's ``vfio_find_dma(iommu, x, 0)``) it is a
        mapping that contains ``start`` without starting at it.
        """
        i = bisect.bisect_left(self._starts, (start + size) & U64_MASK) - 1
        if i >= 0 and self._dmas[i].end > start:
            return self._dmas[i]
        return None

    def containing(self, iova: int) -> int:
        """The index of the mapping that contains ``iova``, or -1."""
        i = bisect.bisect_right(self._starts, iova) - 1
        if i >= 0 and self._dmas[i].end > iova:
            return i
        return -1

    def first_index(self, start: int, size: int) -> int:
        """``vfio_find_dma_first_node``: index of the first mapping ending above ``start``
        and starting below ``start + size`` (64-bit wrap included), or len() when none."""
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or self._dmas[i].end <= start:
            i += 1
        if i < len(self._dmas) and size and self._dmas[i].iova >= (start + size) & U64_MASK:
            return len(self._dmas)
        return i

    def index_at_or_after(self, iova: int) -> int:
        """The index of the first mapping starting at or above ``iova``."""
        return bisect.bisect_left(self._starts, iova)

    def insert(self, dma: DmaMapping) -> None:
        i = bisect.bisect_left(self._starts, dma.iova)
        self._starts.insert(i, dma.iova)
        self._dmas.insert(i, dma)

    def delete(self, first: int, last: int) -> List[DmaMapping]:
        """Remove the mappings at indexes [first, last) and return them."""
        gone = self._dmas[first:last]
        del self._starts[first:last]
        del self._dmas[first:last]
        return gone

    def clear(self) -> List[DmaMapping]:
        return self.delete(0, len(self._dmas))
