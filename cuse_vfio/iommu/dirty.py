"""type1's dirty page tracking: VFIO_IOMMU_DIRTY_PAGES and the bitmaps UNMAP_DMA reports.

As ``vfio_iommu_type1.c`` does it: tracking starts and stops for the whole
container, a mapping made meanwhile gets its bitmap (``vfio_dma_bitmap_alloc``),
and GET_BITMAP (or UNMAP_DMA with GET_DIRTY_BITMAP) ORs each mapping's bits into
the user's u64 array at its offset.  The functions take the container's
``Type1Iommu``, as the kernel's take ``struct vfio_iommu``.
"""

from __future__ import annotations

import ctypes
import errno
from typing import TYPE_CHECKING

from ..errors import VfioError
from ..uapi import (
    VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP,
    offsetofend,
    vfio_iommu_type1_dirty_bitmap,
    vfio_iommu_type1_dirty_bitmap_get,
)
from .dma import U64_MASK, DmaMapping

if TYPE_CHECKING:
    from .type1 import Type1Iommu

#: ``DIRTY_BITMAP_PAGES_MAX`` (INT_MAX) and the bitmap bytes it needs, ``DIRTY_BITMAP_SIZE_MAX``
DIRTY_BITMAP_PAGES_MAX = (1 << 31) - 1
#: x86-64 ``TASK_SIZE_MAX``: ``access_ok`` refuses user pointers above it
TASK_SIZE_MAX = (1 << 47) - (1 << 12)

_DIRTY_FLAGS = (VFIO_IOMMU_DIRTY_PAGES_FLAG_START | VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP
                | VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP)
_DIRTY_MINSZ = offsetofend(vfio_iommu_type1_dirty_bitmap, "flags")


def dirty_bitmap_bytes(npages: int) -> int:
    """``DIRTY_BITMAP_BYTES``: bitmaps are arrays of u64."""
    return (npages + 63) // 64 * 8


DIRTY_BITMAP_SIZE_MAX = dirty_bitmap_bytes(DIRTY_BITMAP_PAGES_MAX)


def ffs(x: int) -> int:
    """``__ffs``: the index of the lowest set bit (64 for 0, as TZCNT answers)."""
    return (x & -x).bit_length() - 1 if x else 64


def fls(x: int) -> int:
    """``__fls``: the index of the highest set bit."""
    return x.bit_length() - 1


def access_ok(addr: int, size: int) -> bool:
    """x86-64 ``access_ok``: the range lies below TASK_SIZE_MAX (says nothing of what is mapped)."""
    return addr + size <= TASK_SIZE_MAX


def verify_bitmap_size(npages: int, bitmap_size: int) -> None:
    if not npages or not bitmap_size or bitmap_size > DIRTY_BITMAP_SIZE_MAX \
            or bitmap_size < dirty_bitmap_bytes(npages):
        raise VfioError(errno.EINVAL, f"dirty bitmap of {bitmap_size} bytes does not fit {npages} pages "
                                      f"(needs {dirty_bitmap_bytes(npages)}, at most {DIRTY_BITMAP_SIZE_MAX})")


def dirty_pages(iommu: "Type1Iommu", arg) -> int:
    if not iommu.v2:
        raise VfioError(errno.EACCES, "DIRTY_PAGES needs a VFIO_TYPE1v2_IOMMU container")
    dirty = arg.fetch_struct(vfio_iommu_type1_dirty_bitmap, _DIRTY_MINSZ)
    if dirty.flags & ~_DIRTY_FLAGS:
        raise VfioError(errno.EINVAL, f"DIRTY_PAGES: unknown flags 0x{dirty.flags & ~_DIRTY_FLAGS:x}")
    if not dirty.flags or ffs(dirty.flags) != fls(dirty.flags):
        raise VfioError(errno.EINVAL, "DIRTY_PAGES takes exactly one of START, STOP, GET_BITMAP")
    if dirty.flags & VFIO_IOMMU_DIRTY_PAGES_FLAG_START:
        start(iommu)
    elif dirty.flags & VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP:
        stop(iommu)
    else:
        get_bitmap(iommu, dirty, arg)
    return 0


def start(iommu: "Type1Iommu") -> None:
    with iommu.lock:
        if iommu.dirty_page_tracking:
            return
        bitmaps = [(dma, new_bitmap(iommu, dma)) for dma in iommu.dmas]
        for dma, bits in bitmaps:
            dma.dirty = bits
        iommu.dirty_page_tracking = True


def stop(iommu: "Type1Iommu") -> None:
    with iommu.lock:
        if iommu.dirty_page_tracking:
            iommu.dirty_page_tracking = False
            for dma in iommu.dmas:
                dma.dirty = None


def new_bitmap(iommu: "Type1Iommu", dma: DmaMapping) -> bytearray:
    """``vfio_dma_bitmap_alloc``."""
    npages = dma.size // iommu.pgsize
    if npages > DIRTY_BITMAP_PAGES_MAX:
        raise VfioError(errno.EINVAL, f"{dma!r} has more pages than a dirty bitmap can track")
    return bytearray(dirty_bitmap_bytes(npages))


def get_bitmap(iommu: "Type1Iommu", dirty, arg) -> None:
    data_size = dirty.argsz - _DIRTY_MINSZ
    if not data_size or data_size < ctypes.sizeof(vfio_iommu_type1_dirty_bitmap_get):
        raise VfioError(errno.EINVAL, "DIRTY_PAGES GET_BITMAP: argsz leaves no room for the range")
    rng = vfio_iommu_type1_dirty_bitmap_get.from_buffer_copy(
        arg.read(_DIRTY_MINSZ, ctypes.sizeof(vfio_iommu_type1_dirty_bitmap_get)))
    if (rng.iova + rng.size) & U64_MASK < rng.iova:
        raise VfioError(errno.EINVAL, "DIRTY_PAGES GET_BITMAP: the range wraps around 2^64")
    if not access_ok(rng.bitmap.data, rng.bitmap.size):
        raise VfioError(errno.EINVAL, f"DIRTY_PAGES GET_BITMAP: bitmap 0x{rng.bitmap.data:x} is not user memory")
    verify_bitmap_size(rng.size >> ffs(rng.bitmap.pgsize), rng.bitmap.size)
    with iommu.lock:
        pgsize = iommu.pgsize
        if rng.bitmap.pgsize != pgsize:
            raise VfioError(errno.EINVAL, f"DIRTY_PAGES GET_BITMAP: bitmap pgsize must be 0x{pgsize:x}")
        if rng.iova & (pgsize - 1) or not rng.size or rng.size & (pgsize - 1):
            raise VfioError(errno.EINVAL, "DIRTY_PAGES GET_BITMAP: iova and size must be non-zero "
                                          f"multiples of 0x{pgsize:x}")
        if not iommu.dirty_page_tracking:
            raise VfioError(errno.EINVAL, "DIRTY_PAGES GET_BITMAP before START")
        iova_dirty_bitmap(iommu, arg.memory, rng.bitmap.data, rng.iova, rng.size, pgsize)


def iova_dirty_bitmap(iommu: "Type1Iommu", memory, data: int, iova: int, size: int, pgsize: int) -> None:
    """``vfio_iova_dirty_bitmap``: the range must cover whole mappings."""
    iommu.dmas.check_whole(iova, size, "GET_BITMAP")
    reported = []
    for dma in iommu.dmas.walk_at_or_after(iova):
        if dma.iova > iova + size - 1:
            break
        update_user_bitmap(iommu, memory, data, dma, iova, pgsize)
        reported.append(dma)
    # Reported pages start clean again (the kernel re-populates from the
    # pinned-page list, which is empty for a hardware IOMMU).
    for dma in reported:
        if dma.dirty is not None:
            dma.dirty[:] = bytes(len(dma.dirty))


def update_user_bitmap(iommu: "Type1Iommu", memory, data: int, dma: DmaMapping, base_iova: int, pgsize: int) -> None:
    """``update_user_bitmap``: OR one mapping's bits into the user's u64 array at its offset."""
    pgshift = ffs(pgsize)
    nbits = dma.size >> pgshift
    bit_offset = (dma.iova - base_iova) >> pgshift
    addr = data + bit_offset // 64 * 8
    shift = bit_offset % 64
    if iommu.driver.precise_dirty:
        bits = int.from_bytes(dma.dirty or b"", "little")
    else:
        # A group behind a hardware IOMMU "can dirty memory directly"
        # (num_non_pinned_groups), so every page of an IOMMU-mapped
        # vfio_dma is reported dirty.
        bits = (1 << nbits) - 1
    if shift:
        leftover = int.from_bytes(memory.read(addr, 8), "little")
        bits = (bits << shift) | (leftover & ((1 << shift) - 1))
    memory.write(addr, bits.to_bytes(dirty_bitmap_bytes(nbits + shift), "little"))


def mark_dirty(iommu: "Type1Iommu", dma: DmaMapping, offset: int, length: int) -> None:
    """A device wrote [offset, offset + length) of ``dma`` (lock held)."""
    bits = dma.dirty
    if bits is None or not length:
        return
    pgshift = ffs(iommu.pgsize_bitmap)
    for page in range(offset >> pgshift, ((offset + length - 1) >> pgshift) + 1):
        bits[page >> 3] |= 1 << (page & 7)
