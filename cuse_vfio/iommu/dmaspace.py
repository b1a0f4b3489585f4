"""The container's type1 IOMMU as a device sees it: translation, DMA, faults (``core.ops.DmaSpace``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, List, Optional, Tuple

from ..uapi import VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE
from .dma import U64_MASK, DmaMapping
from .faults import (
    CLIENT_MEMORY,
    READ_NOT_PERMITTED,
    UNMAPPED,
    VADDR_INVALIDATED,
    WRITE_NOT_PERMITTED,
    FaultLogged,
    IommuFault,
)

if TYPE_CHECKING:
    from .type1 import Type1Iommu


class Type1DmaSpace(FaultLogged):
    """The container's IOMMU as a device sees it (``core.ops.DmaSpace``).

    A transfer is translated in full before any byte moves: every page must
    be mapped, allow the direction, and have a valid vaddr; otherwise a fault
    is logged and the model gets ``IommuFault`` (EFAULT).  A transfer may
    span adjacent mappings.
    """

    def __init__(self, iommu: "Type1Iommu"):
        self._iommu = iommu
        self.fault_log = iommu.driver.fault_log

    def __repr__(self) -> str:
        return f"Type1DmaSpace({self._iommu!r})"

    def translate(self, iova: int, size: int, write: bool = False,
                  device: Optional[str] = None) -> List[Tuple[object, int, int]]:
        """[(memory, vaddr, length), ...] covering [iova, iova + size); faults like a DMA would."""
        with self._iommu.lock:
            return [(dma.owner.memory, dma.vaddr + off, n) for dma, off, n in
                    self._translate(iova, size, write, device)]

    def dma_read(self, iova: int, size: int, device: Optional[str] = None) -> bytes:
        """The device reads ``size`` bytes of memory at ``iova`` (needs VFIO_DMA_MAP_FLAG_READ)."""
        iommu = self._iommu
        with iommu.lock:
            dma = iommu.dmas.containing(iova)
            if dma is not None and dma.shared is not None and 0 < size <= dma.iova + dma.size - iova and \
                    dma.prot & VFIO_DMA_MAP_FLAG_READ:
                # One mapping, served by the server's own window onto the pages (which exists only while
                # the mapping is in the container with a valid vaddr): what _translate would allow.
                try:
                    return dma.shared.read(iova - dma.iova, size)
                except OSError as e:
                    self._fault(CLIENT_MEMORY, iova, size, False, device, self._memory_text(dma, iova - dma.iova,
                                                                                             size, e))
            segments = self._translate(iova, size, False, device)
            chunks = []
            for dma, off, n in segments:
                memory, addr = dma.memory_at(off)
                try:
                    chunks.append(memory.read(addr, n))
                except OSError as e:
                    self._fault(CLIENT_MEMORY, iova, size, False, device, self._memory_text(dma, off, n, e))
            return b"".join(chunks)

    def dma_write(self, iova: int, data: bytes, device: Optional[str] = None) -> None:
        """The device writes ``data`` to memory at ``iova`` (needs VFIO_DMA_MAP_FLAG_WRITE)."""
        iommu = self._iommu
        data = bytes(data)
        with iommu.lock:
            dma = iommu.dmas.containing(iova)
            if dma is not None and dma.shared is not None and 0 < len(data) <= dma.iova + dma.size - iova and \
                    dma.prot & VFIO_DMA_MAP_FLAG_WRITE:
                off = iova - dma.iova  # one mapping with a window, as in dma_read
                try:
                    dma.shared.write(off, data)
                except OSError as e:
                    self._fault(CLIENT_MEMORY, iova, len(data), True, device, self._memory_text(dma, off, len(data), e))
                if iommu.dirty_page_tracking:
                    iommu.mark_dirty(dma, off, len(data))
                return
            # Every segment is translated and permitted, and its memory is there,
            # before a byte moves.  Past that, as on hardware, what is written
            # stays written: memory vanishing part way faults the rest, and
            # nothing is "undone" over bytes the client may have written since.
            segments = self._translate(iova, len(data), True, device)
            if len(segments) > 1:
                for dma, off, n in segments:
                    memory, addr = dma.memory_at(off)
                    try:
                        memory.read(addr, 1)
                    except OSError as e:
                        self._fault(CLIENT_MEMORY, iova, len(data), True, device, self._memory_text(dma, off, n, e))
            pos = 0
            for dma, off, n in segments:
                memory, addr = dma.memory_at(off)
                try:
                    memory.write(addr, data[pos:pos + n])
                except OSError as e:
                    self._fault(CLIENT_MEMORY, iova, len(data), True, device, self._memory_text(dma, off, n, e))
                pos += n
            if iommu.dirty_page_tracking:
                for dma, off, n in segments:
                    iommu.mark_dirty(dma, off, n)

    def dma_readv(self, segments: Iterable[Tuple[int, int]], device: Optional[str] = None) -> bytes:
        """The device reads a scatter list [(iova, length), ...] in order: the bytes, joined.

        One lock and one translation pass for the whole list, entries that are
        contiguous in client memory (a guest's RAM often is) merged into runs,
        and the runs read in one copy when they lie in one client's memory,
        instead of a transfer per page.  An entry the IOMMU
        refuses faults the read, as ``dma_read`` would.
        """
        segments = segments if isinstance(segments, (list, tuple)) else list(segments)
        with self._iommu.lock:
            window, dma = self._one_window(segments, False)
            if window is not None:
                data = window.readv(segments, dma.iova)
                if data is not None:
                    return data
            runs, refused = self._runs(segments, False, device)
            if refused is not None:
                raise refused
            data = self._in_one_copy(runs, "readv")
            if data is not None:
                return data
            chunks = []
            for memory, vaddr, n, first in runs:
                try:
                    chunks.append(memory.read(vaddr, n))
                except OSError as e:
                    self._memory_fault(first, n, False, device, e)
            return b"".join(chunks)

    def dma_writev(self, segments: Iterable[Tuple[int, int]], data, device: Optional[str] = None) -> None:
        """The device writes ``data`` over a scatter list [(iova, length), ...], entry by entry in order.

        Like a device streaming the data, what precedes an entry the IOMMU
        refuses is written, then the fault is raised; one translation pass and
        one write of client memory per contiguous run, as ``dma_readv``.
        """
        view = memoryview(data).cast("B")
        segments = segments if isinstance(segments, (list, tuple)) else list(segments)
        iommu = self._iommu
        with iommu.lock:
            window, dma = self._one_window(segments, True)
            if window is not None and window.writev(segments, view, dma.iova):
                if iommu.dirty_page_tracking:
                    for iova, n in segments:
                        iommu.mark_dirty(dma, iova - dma.iova, n)
                return
            runs, refused = self._runs(segments, True, device)
            pos = 0
            done = self._in_one_copy(runs, "writev", view[:sum(run[2] for run in runs)])
            for memory, vaddr, n, first in () if done else runs:
                try:
                    memory.write(vaddr, view[pos:pos + n])
                except OSError as e:
                    self._memory_fault(first, n, True, device, e)
                pos += n
            if iommu.dirty_page_tracking:
                for _, _, _, first in runs:
                    for dma, off, n in first:
                        iommu.mark_dirty(dma, off, n)
            if refused is not None:
                raise refused

    def _one_window(self, segments, write: bool):
        """``(window, mapping)`` when the mapping of the scatter list's first entry has a window onto
        the client's pages (it exists only while the mapping is in the container with a valid vaddr)
        and allows the direction: the window moves the whole list in one call if every entry is
        inside that mapping, which it checks before a byte moves; ``(None, None)`` otherwise."""
        dma = self._iommu.dmas.containing(segments[0][0]) if segments else None
        if dma is None or dma.shared is None or not (dma.writable if write else dma.readable):
            return None, None
        return dma.shared, dma

    @staticmethod
    def _in_one_copy(runs, verb: str, *data):
        """Every run moved by the client memory's ``readv``/``writev`` (one hand-off to the copier
        instead of one a run), when there are several, all in one memory that has it: what that
        returns; None otherwise (the caller goes run by run, as it does when the copy fails)."""
        if len(runs) < 2:
            return None
        memory = runs[0][0]
        method = getattr(memory, verb, None)
        if method is None or any(run[0] is not memory for run in runs):
            return None
        return method([(vaddr, n) for _, vaddr, n, _ in runs], *data)

    def _runs(self, segments, write: bool, device: Optional[str]):
        """``(runs, fault)``: the translated entries up to the first refused one, merged into runs
        (memory, vaddr, length, [(dma, offset, length), ...]) contiguous in one client's memory,
        and that entry's fault (None when all pass).  Lock held."""
        runs: List[list] = []
        held = None  # the mapping the previous entry ended in: checked already, and it cannot change (lock)
        for iova, size in segments:
            if held is not None and held.iova <= iova and iova + size <= held.end and size > 0:
                translated = [(held, iova - held.iova, size)]  # (a scatter list often stays in one mapping)
            else:
                try:
                    translated = self._translate(iova, size, write, device)
                except IommuFault as e:
                    return runs, e
                if translated:
                    held = translated[-1][0]
            for dma, off, n in translated:
                memory, vaddr = dma.memory_at(off)
                if runs:
                    last = runs[-1]
                    if last[0] is memory and last[1] + last[2] == vaddr:
                        last[2] += n
                        last[3].append((dma, off, n))
                        continue
                runs.append([memory, vaddr, n, [(dma, off, n)]])
        return runs, None

    def _memory_fault(self, pieces, n: int, write: bool, device: Optional[str], error: OSError):
        dma, off, _ = pieces[0]
        self._fault(CLIENT_MEMORY, dma.iova + off, n, write, device, self._memory_text(dma, off, n, error))


    # -- translation -------------------------------------------------------------
    def _translate(self, iova: int, size: int, write: bool, device: Optional[str]):
        """[(dma, offset in dma, length)], or a fault (lock held)."""
        if size <= 0:
            return []
        iommu = self._iommu
        dmas = iommu.dmas
        end = iova + size
        if iova < 0 or end - 1 > U64_MASK or iommu.released:
            self._fault(UNMAPPED, iova, size, write, device, "outside the IOVA space")
        segments = []
        pos = iova
        dma = dmas.containing(iova)
        while pos < end:
            # Mappings do not overlap: after the first, the next must start at pos.
            if dma is None or not dma.iova <= pos < dma.end:
                self._fault(UNMAPPED, iova, size, write, device, f"nothing is mapped at iova 0x{pos:x}")
            if write and not dma.writable:
                self._fault(WRITE_NOT_PERMITTED, iova, size, write, device,
                            f"mapped without VFIO_DMA_MAP_FLAG_WRITE: {dma!r}")
            if not write and not dma.readable:
                self._fault(READ_NOT_PERMITTED, iova, size, write, device,
                            f"mapped without VFIO_DMA_MAP_FLAG_READ: {dma!r}")
            if dma.vaddr_invalid:
                # 6.1 would make a pinning user wait for MAP_DMA with VADDR; a
                # hardware device keeps using the pinned pages.  User space
                # cannot keep old pages, and the old vaddr may now mean other
                # memory (after exec), so the transfer is refused.
                self._fault(VADDR_INVALIDATED, iova, size, write, device,
                            f"vaddr invalidated by UNMAP_DMA with VFIO_DMA_UNMAP_FLAG_VADDR: {dma!r}")
            n = min(end, dma.end) - pos
            segments.append((dma, pos - dma.iova, n))
            pos += n
            if pos < end:
                dma = dmas.successor(dma)
        return segments


    @staticmethod
    def _memory_text(dma: DmaMapping, off: int, n: int, error: OSError) -> str:
        return (f"pid {getattr(dma.owner, 'pid', '?')} memory at vaddr 0x{dma.vaddr + off:x}+{n}: "
                f"{error.strerror or error}")
