"""vfio-pci's regions as a client sees them: GET_REGION_INFO, what may be mapped, and mmap.

The kernel keeps this in ``vfio_pci_core.c`` (``vfio_pci_ioctl_get_region_info``,
``vdev->bar_mmap_supported``, ``vfio_pci_core_mmap``); it is a class of its own
here so that ``VfioPciDevice`` stays readable.

What may be mapped:

* a plain-memory BAR (``RamBar``) of at least a page, whole: VFIO_REGION_INFO_FLAG_MMAP
  and no capability, except MSIX_MAPPABLE on the MSI-X table's BAR (6.1 and
  6.12 map the table and PBA with the rest, since 4.16's "vfio-pci: Allow
  mapping MSIX BAR");
* the windows of a register BAR (``MmioBar.add_window``), when the device
  offers them (``mmap_windows``): FLAG_MMAP and a VFIO_REGION_INFO_CAP_SPARSE_MMAP
  capability listing them, one area each, as vfio-pci listed the pages around
  the MSI-X table before 4.16 (``msix_sparse_mmap_cap``).  A mapping must lie
  inside the areas; one that reaches a register that traps is EINVAL, as
  ``vfio_pci_mmap`` then refused a mapping overlapping the table.  No MSIX_MAPPABLE
  there: the table is never inside a window, so it cannot be mapped (QEMU's
  ``vfio_pci_fixup_msix_region`` then leaves mmaps other than one whole-BAR
  area as they are).

A client gets ``(memory, start)``: the BAR's memfd and where the mapping
starts in it, which is always the offset in the BAR.
"""

from __future__ import annotations

import ctypes
import errno
from typing import TYPE_CHECKING, List, Optional, Tuple

from ...errors import VfioError
from ...memory import PAGE_SIZE
from ...uapi import (
    VFIO_PCI_BAR5_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_NUM_REGIONS,
    VFIO_PCI_ROM_REGION_INDEX,
    VFIO_PCI_VGA_REGION_INDEX,
    VFIO_REGION_INFO_CAP_MSIX_MAPPABLE,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP,
    VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
    offsetofend,
    vfio_region_info,
    vfio_region_info_cap_sparse_mmap,
    vfio_region_sparse_mmap_area,
)
from ...uapi.caps import CapChain
from ..pci import Bar, SharedMemory
from .rdwr import VFIO_PCI_INDEX_TO_OFFSET, VFIO_PCI_OFFSET_MASK, VFIO_PCI_OFFSET_SHIFT

if TYPE_CHECKING:
    from .core import VfioPciDevice

#: VFIO_REGION_INFO_CAP_SPARSE_MMAP's version (vfio_info_cap_add(caps, size, ..., 1))
SPARSE_MMAP_VERSION = 1
#: VFIO_REGION_INFO_CAP_MSIX_MAPPABLE's version (msix_mmappable_cap)
MSIX_MAPPABLE_VERSION = 1

#: (offset, size) of each mappable area of a BAR
Areas = List[Tuple[int, int]]


def sparse_mmap_cap(areas: Areas) -> Tuple[ctypes.Structure, bytes]:
    """``vfio_region_info_cap_sparse_mmap`` and its areas, for ``CapChain.add_struct``."""
    cap = vfio_region_info_cap_sparse_mmap(nr_areas=len(areas))
    trailing = b"".join(bytes(vfio_region_sparse_mmap_area(offset=o, size=s)) for o, s in areas)
    return cap, trailing


class Regions:
    """The regions of one vfio-pci device: their info, their mappable parts, and mmap."""

    def __init__(self, vdev: "VfioPciDevice", mmap_windows: bool):
        self.vdev = vdev
        #: whether the BARs' windows are offered for mmap (sparse mmap areas)
        self.mmap_windows = mmap_windows
        fn = vdev.function
        msix = fn.msix
        for index, bar in enumerate(fn.bars):
            if bar is None or msix is None:
                continue
            # The table and PBA are emulated by the function (PciDevice.bar_read): a window over them
            # would show a mapping other bytes than a pread.
            for what, bir, start, size in (("table", msix.table_bar, msix.table_offset, msix.table_size),
                                           ("PBA", msix.pba_bar, msix.pba_offset, msix.pba_size)):
                for w in bar.windows:
                    if bir == index and start < w.end and w.offset < start + size:
                        raise ValueError(f"{vdev.name}: BAR{index} window {w!r} overlaps the MSI-X {what}")

    # -- what may be mapped (vdev->bar_mmap_supported) -----------------------------------------
    def _bar(self, index: int) -> Optional[Bar]:
        return self.vdev.function.bars[index] if 0 <= index <= VFIO_PCI_BAR5_REGION_INDEX else None

    def mappable_areas(self, index: int) -> Optional[Areas]:
        """The parts of BAR ``index`` a client may map, or None when it may map none.

        A plain-memory BAR of at least a page, whole (a sub-page BAR is not
        offered: Linux pads it to a page with a dummy resource, a memfd of the
        BAR's size cannot be); otherwise the windows the device offers.
        """
        bar = self._bar(index)
        if bar is None or bar.io:
            return None
        if bar.mmappable:
            return [(0, bar.size)] if bar.size >= PAGE_SIZE else None
        if self.mmap_windows and bar.windows:
            return [(w.offset, w.size) for w in bar.windows]
        return None

    def is_sparse(self, index: int) -> bool:
        bar = self._bar(index)
        return bar is not None and not bar.mmappable and self.mappable_areas(index) is not None

    # -- VFIO_DEVICE_GET_REGION_INFO --------------------------------------------------------------
    def _info(self, index: int) -> Optional[Tuple[int, int, CapChain]]:
        """(size, flags, capabilities) of a region, or None when the index is not a region of this device."""
        vdev = self.vdev
        fn = vdev.function
        chain = CapChain.for_abi(vdev.abi)
        if index == VFIO_PCI_CONFIG_REGION_INDEX:
            return fn.config.size, VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE, chain
        if index <= VFIO_PCI_BAR5_REGION_INDEX:
            bar = fn.bars[index]
            if bar is None:
                return 0, 0, chain
            flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
            areas = self.mappable_areas(index)
            if areas is not None:
                flags |= VFIO_REGION_INFO_FLAG_MMAP
                if self.is_sparse(index):
                    cap, trailing = sparse_mmap_cap(areas)
                    chain.add_struct(cap, VFIO_REGION_INFO_CAP_SPARSE_MMAP, SPARSE_MMAP_VERSION, trailing)
                elif fn.msix is not None and fn.msix.table_bar == index:
                    # vdev->msix_bar is the table's BIR (the PBA's BAR gets nothing); msix_mmappable_cap
                    chain.add(VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, MSIX_MAPPABLE_VERSION, b"")
            return bar.size, flags, chain
        if index == VFIO_PCI_ROM_REGION_INDEX:
            rom = fn.rom
            if rom is None or not rom.image_size():
                return 0, 0, chain  # no ROM, or pci_map_rom finds no valid image
            return rom.size, VFIO_REGION_INFO_FLAG_READ, chain
        return None  # VGA (this device has none) and anything beyond

    def get_region_info(self, arg) -> int:
        """vfio_pci_ioctl_get_region_info (6.1 and 6.12)."""
        vdev = self.vdev
        minsz = offsetofend(vfio_region_info, "offset")
        info = arg.fetch_struct(vfio_region_info, minsz)
        region = self._info(info.index) if info.index < VFIO_PCI_NUM_REGIONS else None
        if region is None:
            raise VfioError(errno.EINVAL, f"{vdev.name}: no region {info.index}"
                            + (" (no VGA)" if info.index == VFIO_PCI_VGA_REGION_INDEX else ""))
        info.offset = VFIO_PCI_INDEX_TO_OFFSET(info.index)
        info.size, info.flags, chain = region
        # cap_offset goes back as the caller passed it unless a capability is placed
        caps = chain.place(info, VFIO_REGION_INFO_FLAG_CAPS)
        if caps:
            arg.write(ctypes.sizeof(vfio_region_info), caps)
        arg.write(0, bytes(info)[:minsz])
        return 0

    # -- mmap --------------------------------------------------------------------------------------
    def region_memory(self, index: int) -> SharedMemory:
        """The shared memory behind a mappable region, for a transport (EINVAL: nothing there maps)."""
        if self.mappable_areas(index) is None:
            raise VfioError(errno.EINVAL, f"{self.vdev.name}: region {index} cannot be mapped")
        memory = getattr(self._bar(index), "memory", None)
        assert memory is not None  # a mappable BAR is memory, or has windows of it
        return memory

    def mmap(self, offset: int, length: int):
        """vfio_pci_core_mmap's checks for a client mapping ``length`` bytes at file ``offset``.

        Returns ``(memory, start)``.  A whole-memory BAR: any whole pages of it,
        the MSI-X table and PBA included (6.1).  A BAR with windows: only inside
        them; a mapping that reaches a trapped register is EINVAL (vfio_pci_mmap
        before 4.16: "If neither entirely above nor below, then it overlaps").
        """
        vdev = self.vdev
        index = offset >> VFIO_PCI_OFFSET_SHIFT
        pos = offset & VFIO_PCI_OFFSET_MASK
        if index >= VFIO_PCI_ROM_REGION_INDEX:
            raise VfioError(errno.EINVAL, f"{vdev.name}: region {index} cannot be mapped")
        if pos % PAGE_SIZE or length <= 0:
            raise VfioError(errno.EINVAL, f"{vdev.name}: mmap must start on a page")
        with vdev.lock:
            vdev.runtime_pm.resume()
            areas = self.mappable_areas(index)
            if areas is None:
                raise VfioError(errno.EINVAL, f"{vdev.name}: BAR{index} cannot be mapped")
            bar = self._bar(index)
            assert bar is not None
            phys_len = (bar.size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
            if pos + length > phys_len:
                raise VfioError(errno.EINVAL, f"{vdev.name}: 0x{pos:x}+0x{length:x} is beyond BAR{index}")
            if not _covered(areas, pos, pos + length):
                raise VfioError(errno.EINVAL, f"{vdev.name}: 0x{pos:x}+0x{length:x} of BAR{index} reaches registers "
                                              f"that trap; only its sparse mmap areas map")
            return self.region_memory(index), pos


def _covered(areas: Areas, start: int, end: int) -> bool:
    """Whether [start, end) lies inside the union of ``areas`` (sorted by offset)."""
    for offset, size in sorted(areas):
        if offset > start:
            return False
        if offset + size > start:
            start = offset + size
            if start >= end:
                return True
    return start >= end
