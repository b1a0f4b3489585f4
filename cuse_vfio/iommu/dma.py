"""A container's DMA mappings: ``struct vfio_dma`` and the ``dma_list`` tree that holds them.

The kernel keeps mappings in an rb-tree keyed by IOVA.  Here they are a
chunked sorted list searched with ``bisect`` (``DmaList``).  Mappings never
overlap, so "the last mapping that starts below X" is the only one that can
contain X.
"""

from __future__ import annotations

import bisect
import errno
from typing import TYPE_CHECKING, Iterator, List, Optional, Tuple

from ..errors import VfioError
from ..uapi import VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE

if TYPE_CHECKING:
    from ..memory.shared import SharedWindow

#: C's 64-bit unsigned arithmetic: IOVA sums that wrap in the kernel wrap here too
U64_MASK = (1 << 64) - 1


class DmaMapping:
    """One MAP_DMA: ``size`` bytes at ``iova`` backed by ``owner``'s memory at ``vaddr``."""

    __slots__ = ("iova", "size", "vaddr", "prot", "owner", "vaddr_invalid", "dirty", "pinned_in", "iommu_pgsizes",
                 "shared")

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
        #: the memory whose RLIMIT_MEMLOCK share this mapping holds (None: not accounted)
        self.pinned_in = None
        #: the page sizes the IOMMU's page table may use for it (superpages unless disable_hugepages)
        self.iommu_pgsizes = 0
        #: the server's own mapping of the pages when they are a shared file of memory
        #: (``memory.shared.SharedWindow``, addressed by offset in the mapping): DMA goes there
        self.shared: Optional[SharedWindow] = None

    def memory_at(self, offset: int):
        """(memory, address) where DMA to ``offset`` in the mapping goes (IOMMU lock held)."""
        window = self.shared
        if window is not None:
            return window, offset
        return self.owner.memory, self.vaddr + offset

    def drop_shared(self) -> None:
        """The server's mapping of the pages goes (the IOVA no longer reaches them through it)."""
        window, self.shared = self.shared, None
        if window is not None:
            window.close()

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
    """Mappings in IOVA order (``iommu->dma_list``).

    A sorted list cut into chunks of at most ``2 * LOAD`` mappings, with the
    first IOVA of each chunk kept apart: finding a mapping is two bisections,
    and an insert or removal moves at most one chunk's pointers, so MAP_DMA
    and UNMAP_DMA cost the same with 10 mappings or 65535.
    """

    LOAD = 256

    def __init__(self) -> None:
        self._firsts: List[int] = []          # first iova of each chunk
        self._keys: List[List[int]] = []      # the iovas of each chunk
        self._chunks: List[List[DmaMapping]] = []
        self._len = 0
        #: the mapping ``containing`` found last (a device's DMA mostly stays in one): never a removed one
        self._hit: Optional[DmaMapping] = None

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[DmaMapping]:
        """A snapshot, in IOVA order (the list may change while it is walked)."""
        return iter([dma for chunk in self._chunks for dma in chunk])

    # -- positions: (chunk, index) ---------------------------------------------
    def _floor(self, key: int) -> Optional[Tuple[int, int]]:
        """The last mapping starting at or below ``key``."""
        c = bisect.bisect_right(self._firsts, key) - 1
        if c < 0:
            return None
        return c, bisect.bisect_right(self._keys[c], key) - 1

    def _lower(self, key: int) -> Optional[Tuple[int, int]]:
        """The last mapping starting below ``key``."""
        c = bisect.bisect_left(self._firsts, key) - 1
        if c < 0:
            return None
        return c, bisect.bisect_left(self._keys[c], key) - 1

    def _next(self, pos: Optional[Tuple[int, int]]) -> Optional[Tuple[int, int]]:
        """The position after ``pos`` (the first one for None)."""
        if pos is None:
            return (0, 0) if self._chunks else None
        c, i = pos
        if i + 1 < len(self._chunks[c]):
            return c, i + 1
        if c + 1 < len(self._chunks):
            return c + 1, 0
        return None

    def _at(self, pos: Optional[Tuple[int, int]]) -> Optional[DmaMapping]:
        return None if pos is None else self._chunks[pos[0]][pos[1]]

    def _walk(self, pos: Optional[Tuple[int, int]]) -> Iterator[DmaMapping]:
        while pos is not None:
            yield self._chunks[pos[0]][pos[1]]
            pos = self._next(pos)

    # -- lookups ------------------------------------------------------------------
    def check_whole(self, iova: int, size: int, what: str) -> None:
        """EINVAL when [iova, iova + size) cuts a mapping at either end (type1 v2's unmap, GET_BITMAP)."""
        dma = self.find(iova, 1)
        if dma is not None and dma.iova != iova:
            raise VfioError(errno.EINVAL, f"{what}: iova 0x{iova:x} is inside {dma!r}")
        dma = self.find(iova + size - 1, 0)
        if dma is not None and dma.end != iova + size:
            raise VfioError(errno.EINVAL, f"{what}: end 0x{iova + size:x} is inside {dma!r}")

    def find(self, start: int, size: int) -> Optional[DmaMapping]:
        """``vfio_find_dma``: a mapping overlapping [start, start + size).

        With ``size`` 0 (the kernel's ``vfio_find_dma(iommu, x, 0)``) it is a
        mapping that contains ``start`` without starting at it.
        """
        dma = self._at(self._lower((start + size) & U64_MASK))
        return dma if dma is not None and dma.end > start else None

    def containing(self, iova: int) -> Optional[DmaMapping]:
        """The mapping that contains ``iova``."""
        dma = self._hit
        if dma is not None and dma.iova <= iova < dma.iova + dma.size:
            return dma
        dma = self._at(self._floor(iova))
        if dma is None or dma.end <= iova:
            return None
        self._hit = dma
        return dma

    def successor(self, dma: DmaMapping) -> Optional[DmaMapping]:
        """The mapping after ``dma`` (which must be in the list)."""
        return self._at(self._next(self._floor(dma.iova)))

    def walk_from(self, start: int) -> Iterator[DmaMapping]:
        """The mappings in order from the first one ending above ``start``
        (``vfio_find_dma_first_node`` without its size cut)."""
        pos = self._floor(start)
        first = self._at(pos)
        if first is None or first.end <= start:
            pos = self._next(pos)
        return self._walk(pos)

    def walk_at_or_after(self, iova: int) -> Iterator[DmaMapping]:
        """The mappings in order from the first one starting at or above ``iova``."""
        return self._walk(self._next(self._lower(iova)))

    # -- changes ------------------------------------------------------------------
    def insert(self, dma: DmaMapping) -> None:
        key = dma.iova
        if not self._chunks:
            self._firsts.append(key)
            self._keys.append([key])
            self._chunks.append([dma])
            self._len = 1
            return
        c = max(bisect.bisect_right(self._firsts, key) - 1, 0)
        keys, chunk = self._keys[c], self._chunks[c]
        i = bisect.bisect_left(keys, key)
        keys.insert(i, key)
        chunk.insert(i, dma)
        self._firsts[c] = keys[0]
        self._len += 1
        if len(keys) > 2 * self.LOAD:
            half = len(keys) // 2
            self._keys[c + 1:c + 1] = [keys[half:]]
            self._chunks[c + 1:c + 1] = [chunk[half:]]
            self._firsts.insert(c + 1, keys[half])
            del keys[half:], chunk[half:]

    def remove(self, dma: DmaMapping) -> None:
        pos = self._floor(dma.iova)
        if pos is None or self._at(pos) is not dma:
            raise KeyError(f"{dma!r} is not in this list")
        if self._hit is dma:
            self._hit = None
        c, i = pos
        del self._keys[c][i], self._chunks[c][i]
        self._len -= 1
        if self._chunks[c]:
            self._firsts[c] = self._keys[c][0]
        else:
            del self._firsts[c], self._keys[c], self._chunks[c]

    def clear(self) -> List[DmaMapping]:
        gone = list(self)
        self._firsts, self._keys, self._chunks, self._len = [], [], [], 0
        self._hit = None
        return gone
