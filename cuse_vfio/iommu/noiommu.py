"""The noiommu driver (``vfio_noiommu_ops`` in ``drivers/vfio/container.c``, 6.1).

With ``enable_unsafe_noiommu_mode`` a device without an IOMMU still gets a
(fake) group, ``/dev/vfio/noiommu-N``, and can be used through VFIO with no
protection whatever: the device DMAs to the physical addresses the user
programs into it.  The driver only says "yes" to VFIO_NOIOMMU_IOMMU, has no
MAP_DMA, and wants CAP_SYS_RAWIO of whoever sets it (``vfio_noiommu_open``).

DMA here: a device of a noiommu container reaches the physical pages of the
process that set the container's IOMMU (its *opener*), and only those.  A
driver does what a real noiommu driver (DPDK with IOVA as PA) does: it
locks a buffer, reads the buffer's page frame numbers from
``/proc/self/pagemap`` and programs ``PFN << 12 | offset`` into the device.
The server reads the opener's pagemap to find which of its virtual pages
holds that frame, and moves the bytes there; a physical address that is no
page of the opener faults ("unmapped") in the fault log instead of reaching
another process.  Pages the opener has not locked may move (swap,
compaction) after the driver read their PFN, as on a real host.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ..errors import VfioError
from ..uapi import VFIO_CHECK_EXTENSION, VFIO_NOIOMMU_IOMMU
from .faults import CLIENT_MEMORY, UNMAPPED, FaultLog, FaultLogged

log = logging.getLogger(__name__)

CAP_SYS_RAWIO = 17
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
_PM_PRESENT = 1 << 63
_PM_PFN_MASK = (1 << 55) - 1

if TYPE_CHECKING:
    from ..core.bus import BusDevice, IommuGroup


class NoIommuDriver:
    """The noiommu IOMMU driver; off until ``enable_unsafe_noiommu_mode`` is set (a module switch in Linux)."""

    name = "vfio-noiommu"
    #: the core keeps noiommu containers and this driver for each other
    noiommu = True

    def __init__(self, enable_unsafe_noiommu_mode: bool = False, fault_log: Optional[FaultLog] = None):
        self.enable_unsafe_noiommu_mode = enable_unsafe_noiommu_mode
        self.fault_log = fault_log if fault_log is not None else FaultLog()

    def __repr__(self) -> str:
        return f"NoIommuDriver(enabled={self.enable_unsafe_noiommu_mode})"

    def check_extension(self, ext: int) -> int:
        """``vfio_noiommu_ioctl(NULL, VFIO_CHECK_EXTENSION, ext)``."""
        return int(self.enable_unsafe_noiommu_mode and ext == VFIO_NOIOMMU_IOMMU)

    def open(self, arg: int) -> "NoIommu":
        return self.open_as(arg, None)

    def open_as(self, arg: int, caller) -> "NoIommu":
        """``vfio_noiommu_open`` for ``caller`` (None: in-process, as root)."""
        if not self.enable_unsafe_noiommu_mode:
            raise VfioError(errno.ENODEV, "noiommu mode is off: set enable_unsafe_noiommu_mode to use it")
        if arg != VFIO_NOIOMMU_IOMMU:
            raise VfioError(errno.EINVAL, f"{self.name} only opens VFIO_NOIOMMU_IOMMU, not type {arg}")
        check = getattr(caller, "capable", None)
        if check is not None and not check(CAP_SYS_RAWIO):
            raise VfioError(errno.EPERM, "SET_IOMMU to VFIO_NOIOMMU_IOMMU needs CAP_SYS_RAWIO")
        return NoIommu(self, caller)


class NoIommu:
    """A noiommu container's IOMMU state: the groups, and nothing else."""

    def __init__(self, driver: NoIommuDriver, opener=None):
        self.driver = driver
        self.groups: List[IommuGroup] = []
        #: the devices' view of memory: the opener's physical pages (None: an in-process opener has none)
        self.dma_space = PagemapDmaSpace(opener, driver.fault_log) if getattr(opener, "pid", None) else None
        self._handed: List[BusDevice] = []

    def __repr__(self) -> str:
        return f"NoIommu(groups={[g.id for g in self.groups]})"

    def release(self) -> None:
        for group in self.groups:
            self.detach_group(group)
        self.groups = []

    def attach_group(self, group) -> None:
        # The core never mixes group kinds; refuse here too, in case.
        if not getattr(group, "noiommu", False):
            raise VfioError(errno.EINVAL, f"IOMMU group {group.id} has an IOMMU: use a type1 container")
        if any(g is group for g in self.groups):
            raise VfioError(errno.EINVAL, f"IOMMU group {group.id} is already attached to this container")
        self.groups.append(group)
        if self.dma_space is None:
            return
        for dev in getattr(group, "devices", ()):
            setter = getattr(getattr(getattr(dev, "drvdata", None), "ops", None), "set_dma_space", None)
            if setter is not None:
                setter(self.dma_space)
                self._handed.append(dev)

    def detach_group(self, group) -> None:
        self.groups = [g for g in self.groups if g is not group]
        for dev in [d for d in self._handed if getattr(d, "iommu_group", None) is group]:
            self._handed.remove(dev)
            setter = getattr(getattr(dev.drvdata, "ops", None), "set_dma_space", None)
            if setter is not None:  # it was there when attach_group handed the space
                setter(None)

    def ioctl(self, cmd: int, arg) -> int:
        if cmd == VFIO_CHECK_EXTENSION:
            return self.driver.check_extension(arg.value)
        raise VfioError(errno.ENOTTY, f"{self.driver.name}: no container ioctl 0x{cmd:x} (a noiommu container "
                                      "has no DMA mappings)")


class PagemapDmaSpace(FaultLogged):
    """A noiommu device's DMA (``core.ops.DmaSpace``): physical addresses of the opener's pages.

    ``/proc/<pid>/pagemap`` gives, per virtual page, the frame behind it
    (bits 0-54, bit 63 present; PFNs need CAP_SYS_ADMIN of the reader, i.e. the
    server).  Frames seen once are remembered, and each use checks the page
    still holds that frame; a miss re-reads the opener's whole map.
    """

    def __init__(self, opener, fault_log: FaultLog):
        self.opener = opener
        self.fault_log = fault_log
        self._lock = threading.Lock()
        self._vaddr_of: Dict[int, int] = {}

    def __repr__(self) -> str:
        return f"PagemapDmaSpace(pid={getattr(self.opener, 'pid', None)})"

    def translate(self, addr: int, size: int, write: bool = False,
                  device: Optional[str] = None) -> List[Tuple[Any, int, int]]:  # (the opener's memory, vaddr, n)
        with self._lock:
            return [(self.opener.memory, vaddr, n) for vaddr, n in self._translate(addr, size, write, device)]

    def dma_read(self, addr: int, size: int, device: Optional[str] = None) -> bytes:
        chunks = []
        for memory, vaddr, n in self.translate(addr, size, False, device):
            chunks.append(self._move(memory.read, addr, size, False, device, vaddr, n))
        return b"".join(chunks)

    def dma_write(self, addr: int, data: bytes, device: Optional[str] = None) -> None:
        data = bytes(data)
        pos = 0
        for memory, vaddr, n in self.translate(addr, len(data), True, device):
            self._move(lambda v, _n, p=pos: memory.write(v, data[p:p + _n]), addr, len(data), True, device, vaddr, n)
            pos += n

    def _move(self, op, addr, size, write, device, vaddr, n):
        try:
            return op(vaddr, n)
        except OSError as e:
            self._fault(CLIENT_MEMORY, addr, size, write, device,
                        f"pid {self.opener.pid} memory at vaddr 0x{vaddr:x}+{n}: {e.strerror or e}")


    # -- physical -> the opener's virtual ---------------------------------------
    def _translate(self, addr: int, size: int, write: bool, device: Optional[str]) -> List[Tuple[int, int]]:
        segments: List[Tuple[int, int]] = []
        pos, end = addr, addr + size
        while pos < end:
            n = min(end, (pos | (PAGE_SIZE - 1)) + 1) - pos
            page = self._page_of(pos >> PAGE_SHIFT)
            if page is None:
                self._fault(UNMAPPED, addr, size, write, device,
                            f"physical address 0x{pos:x} is no page of pid {self.opener.pid}, which set the "
                            "noiommu container (a noiommu device reaches only its opener's memory)")
            vaddr = page + (pos & (PAGE_SIZE - 1))
            if segments and segments[-1][0] + segments[-1][1] == vaddr:
                segments[-1] = (segments[-1][0], segments[-1][1] + n)
            else:
                segments.append((vaddr, n))
            pos += n
        return segments

    def _page_of(self, pfn: int) -> Optional[int]:
        vaddr = self._vaddr_of.get(pfn)
        if vaddr is not None and self._pfn_at(vaddr) == pfn:
            return vaddr
        self._vaddr_of = self._scan()
        return self._vaddr_of.get(pfn)

    def _pfn_at(self, vaddr: int) -> Optional[int]:
        try:
            with open(f"/proc/{self.opener.pid}/pagemap", "rb") as f:
                entry, = struct.unpack("<Q", os.pread(f.fileno(), 8, (vaddr >> PAGE_SHIFT) * 8))
        except (OSError, struct.error):
            return None
        return entry & _PM_PFN_MASK if entry & _PM_PRESENT else None

    def _scan(self) -> Dict[int, int]:
        found: Dict[int, int] = {}
        pid = self.opener.pid
        try:
            with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
                for line in maps:
                    start, end = (int(x, 16) for x in line.split()[0].split("-"))
                    if start >> 63:
                        continue  # [vsyscall]: not in the pagemap
                    for first in range(start, end, 1 << 30):  # 2 MiB of entries per read
                        last = min(end, first + (1 << 30))
                        raw = os.pread(pagemap.fileno(), (last - first) >> PAGE_SHIFT << 3, (first >> PAGE_SHIFT) * 8)
                        for i, (entry,) in enumerate(struct.iter_unpack("<Q", raw)):
                            if entry & _PM_PRESENT and entry & _PM_PFN_MASK:
                                found.setdefault(entry & _PM_PFN_MASK, first + (i << PAGE_SHIFT))
        except OSError as e:
            log.warning("noiommu DMA: cannot read the page map of pid %s: %s", pid, e.strerror)
        return found

