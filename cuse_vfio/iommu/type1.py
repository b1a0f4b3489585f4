"""The type1 IOMMU driver (``drivers/vfio/vfio_iommu_type1.c``, Linux 6.1.y as Debian ships it).

``Type1Driver`` is what the core registers; SET_IOMMU opens a ``Type1Iommu``
(``struct vfio_iommu``) per container, which owns the container's DMA
mappings and answers MAP_DMA, UNMAP_DMA, GET_INFO and DIRTY_PAGES with the
kernel's argument rules and errno.  Its ``Type1DmaSpace`` is what device
models of the container's groups DMA through: an IOVA becomes (process,
vaddr) of the client that mapped it, and the bytes move through that
process's memory.  Dirty page tracking is in :mod:`.dirty`, the device's
side of the IOMMU (``Type1DmaSpace``) in :mod:`.dmaspace`.

Where this differs from the kernel, it is because user space cannot pin
pages; each such place says so.  The hardware being emulated is QEMU's
``-device intel-iommu`` on ``-machine q35`` (second-level translation,
``aw-bits=39``), which is what ``Type1Driver``'s defaults report.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import VfioError
from ..memory import ProcessImage
from ..memory.shared import SharedWindow, pin_shared, window_for
from ..uapi import (
    VFIO_CHECK_EXTENSION,
    VFIO_DMA_CC_IOMMU,
    VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_VADDR,
    VFIO_DMA_MAP_FLAG_WRITE,
    VFIO_DMA_UNMAP_FLAG_ALL,
    VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
    VFIO_DMA_UNMAP_FLAG_VADDR,
    VFIO_IOMMU_DIRTY_PAGES,
    VFIO_IOMMU_GET_INFO,
    VFIO_IOMMU_INFO_CAPS,
    VFIO_IOMMU_INFO_PGSIZES,
    VFIO_IOMMU_MAP_DMA,
    VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION,
    VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL,
    VFIO_IOMMU_UNMAP_DMA,
    VFIO_TYPE1_IOMMU,
    VFIO_TYPE1_NESTING_IOMMU,
    VFIO_UNMAP_ALL,
    VFIO_UPDATE_VADDR,
    CapChain,
    VFIO_TYPE1v2_IOMMU,
    offsetofend,
    vfio_bitmap,
    vfio_iommu_type1_dma_map,
    vfio_iommu_type1_dma_unmap,
    vfio_iommu_type1_info,
    vfio_iommu_type1_info_cap_iova_range,
    vfio_iommu_type1_info_cap_migration,
    vfio_iommu_type1_info_dma_avail,
    vfio_iova_range,
)
from ..uapi.abi import KernelAbi
from . import dirty
from .dirty import DIRTY_BITMAP_SIZE_MAX, access_ok, ffs, verify_bitmap_size
from .dma import U64_MASK, DmaList, DmaMapping
from .dmaspace import Type1DmaSpace
from .faults import FaultLog

if TYPE_CHECKING:
    from ..core.bus import IommuGroup

log = logging.getLogger(__name__)

SZ_4K, SZ_2M, SZ_1G = 1 << 12, 1 << 21, 1 << 30

#: what an intel-iommu domain allows under QEMU's VT-d: 4 KiB pages plus the
#: 2 MiB and 1 GiB superpages of CAP.SLLPS (``domain_super_pgsize_bitmap``)
INTEL_VTD_PGSIZES = SZ_4K | SZ_2M | SZ_1G
#: the domain aperture for ``-device intel-iommu,aw-bits=39`` (QEMU's default
#: before 9.0): ``__DOMAIN_MAX_ADDR(39)``.  aw-bits=48 gives (1 << 48) - 1.
Q35_VTD_APERTURE = (0, (1 << 39) - 1)
#: intel-iommu reserves the interrupt window for every device (IOAPIC_RANGE_START..END, IOMMU_RESV_MSI)
X86_MSI_WINDOW = (0xFEE00000, 0xFEEFFFFF)

#: ``dma_entry_limit`` module parameter default (U16_MAX)
DMA_ENTRY_LIMIT = 0xFFFF

_MAP_FLAGS = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE | VFIO_DMA_MAP_FLAG_VADDR
_UNMAP_FLAGS = VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP | VFIO_DMA_UNMAP_FLAG_VADDR | VFIO_DMA_UNMAP_FLAG_ALL

_INFO_MINSZ = offsetofend(vfio_iommu_type1_info, "iova_pgsizes")
_INFO_CAPSZ = offsetofend(vfio_iommu_type1_info, "cap_offset")
_MAP_MINSZ = offsetofend(vfio_iommu_type1_dma_map, "size")
_UNMAP_MINSZ = offsetofend(vfio_iommu_type1_dma_unmap, "size")













def iova_ranges(aperture: Tuple[int, int], reserved: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """The aperture minus the reserved regions (``vfio_iommu_resv_exclude``), inclusive bounds."""
    ranges = [(aperture[0], aperture[1])]
    for rstart, rend in reserved:
        out = []
        for start, end in ranges:
            if rstart > end or rend < start:
                out.append((start, end))
                continue
            if rstart > start:
                out.append((start, rstart - 1))
            if rend < end:
                out.append((rend + 1, end))
        ranges = out
    if not ranges:
        # vfio_iommu_resv_exclude: an empty list fails the attach
        raise VfioError(errno.EINVAL, "reserved regions cover the whole IOMMU aperture")
    return ranges


def _pin(owner, vaddr: int, size: int, write: bool) -> Optional[SharedWindow]:
    """Stand-in for ``vfio_pin_map_dma``: the memory must exist now (EFAULT if not).

    The kernel pins every page, with FOLL_WRITE when the device may write,
    so read-only memory fails a writable mapping.  User space cannot pin.
    An address space that can ``probe(addr, size, write)`` without touching
    the bytes is asked that; otherwise the first and the last byte are
    read, and pages unmapped (or read-only) in between fault at DMA time.
    A client's memory that is a shared file of memory is mapped into the
    server as well (``memory.shared``, in the same probe): the window is
    returned, the mapping's DMA goes there.
    """
    memory = owner.memory
    try:
        if isinstance(memory, ProcessImage):
            return pin_shared(memory, vaddr, size, write)
        probe = getattr(memory, "probe", None)
        if probe is not None:
            probe(vaddr, size, write)
        else:
            memory.read(vaddr, 1)
            if size > 1:
                memory.read(vaddr + size - 1, 1)
    except OSError as e:
        raise VfioError(errno.EFAULT, f"MAP_DMA: pid {getattr(owner, 'pid', '?')} has no "
                                      f"{'writable ' if write else ''}memory at vaddr "
                                      f"[0x{vaddr:x}, 0x{vaddr + size:x}): {e.strerror}") from None
    return None


def _account(owner, size: int, dma: Optional[DmaMapping] = None):
    """vfio_lock_acct: the owner's memory counts ``size`` more pinned bytes (ENOMEM past its
    RLIMIT_MEMLOCK); returns that memory, or None for memory that keeps no account.  When it
    fails, the window ``_pin`` made for ``dma`` goes."""
    memory = owner.memory
    account = getattr(memory, "account_pinned", None)
    if account is None:
        return None
    try:
        account(size)
    except VfioError:
        if dma is not None:
            dma.drop_shared()
        raise
    return memory


class Type1Driver:
    """``vfio_iommu_driver_ops_type1``; the keyword arguments describe the emulated IOMMU.

    * ``pgsize_bitmap``: the domain's page sizes (GET_INFO ``iova_pgsizes``);
      the smallest is the granule every MAP/UNMAP must be aligned to.
    * ``aperture``, ``reserved_regions``: inclusive IOVA bounds; what is left
      is the IOVA range capability and where MAP_DMA may go.
    * ``dma_entry_limit``, ``allow_unsafe_interrupts``, ``disable_hugepages``:
      the module parameters of those names (read when a container's IOMMU
      is set or a group attached, as the kernel reads its globals).
    * ``interrupt_remapping``: the IOMMU isolates MSIs (QEMU's ``intremap=on``);
      without it, and without ``allow_unsafe_interrupts``, no group attaches.
    * ``enforce_cache_coherency``: the answer to VFIO_DMA_CC_IOMMU once a
      group is attached (QEMU's VT-d has no snoop control unless
      ``snoop-control=on``, so 0).
    * ``nesting``: whether the IOMMU can nest; QEMU's VT-d cannot, so a
      VFIO_TYPE1_NESTING_IOMMU container fails to attach with ENODEV.
    * ``precise_dirty``: report as dirty only the pages devices wrote.  The
      kernel cannot see writes through a hardware IOMMU and reports every
      mapped page dirty while tracking; that is the default.
    """

    name = "vfio-iommu-type1"
    noiommu = False

    def __init__(self, *, pgsize_bitmap: int = INTEL_VTD_PGSIZES,
                 aperture: Tuple[int, int] = Q35_VTD_APERTURE,
                 reserved_regions: Sequence[Tuple[int, int]] = (X86_MSI_WINDOW,),
                 dma_entry_limit: int = DMA_ENTRY_LIMIT,
                 allow_unsafe_interrupts: bool = False,
                 disable_hugepages: bool = False,
                 interrupt_remapping: bool = True,
                 enforce_cache_coherency: bool = False,
                 nesting: bool = False,
                 precise_dirty: bool = False,
                 fault_log: Optional[FaultLog] = None,
                 abi: Optional[KernelAbi] = None):
        if not pgsize_bitmap:
            raise ValueError("pgsize_bitmap needs at least one page size")
        # vfio_update_pgsize_bitmap: sizes below PAGE_SIZE are hidden behind PAGE_SIZE
        if pgsize_bitmap & (SZ_4K - 1):
            pgsize_bitmap = (pgsize_bitmap & ~(SZ_4K - 1)) | SZ_4K
        self.pgsize_bitmap = pgsize_bitmap
        self.aperture = (aperture[0], aperture[1])
        self.reserved_regions = [(r[0], r[1]) for r in reserved_regions]
        self.iova_ranges = iova_ranges(self.aperture, self.reserved_regions)
        self.dma_entry_limit = dma_entry_limit
        self.allow_unsafe_interrupts = allow_unsafe_interrupts
        self.disable_hugepages = disable_hugepages
        self.interrupt_remapping = interrupt_remapping
        self.enforce_cache_coherency = enforce_cache_coherency
        self.nesting = nesting
        self.precise_dirty = precise_dirty
        #: the kernel release whose capability layout GET_INFO follows
        self.abi = abi or KernelAbi()
        #: every fault of every container of this driver
        self.fault_log = fault_log if fault_log is not None else FaultLog()

    def __repr__(self) -> str:
        return f"Type1Driver(pgsizes=0x{self.pgsize_bitmap:x}, aperture={self.aperture})"

    # -- IommuDriverOps --------------------------------------------------
    def check_extension(self, ext: int) -> int:
        """CHECK_EXTENSION on a container without an IOMMU (``iommu == NULL``)."""
        return self.extension(None, ext)

    def extension(self, iommu: Optional["Type1Iommu"], ext: int) -> int:
        """``vfio_iommu_type1_check_extension``."""
        if ext in (VFIO_TYPE1_IOMMU, VFIO_TYPE1v2_IOMMU, VFIO_TYPE1_NESTING_IOMMU, VFIO_UNMAP_ALL):
            return 1
        if ext == VFIO_UPDATE_VADDR:
            # 6.1.16+ (stable backport of "vfio/type1: exclude mdevs from
            # VFIO_UPDATE_VADDR"): only a container can say, since mdev groups
            # take the feature away.  This project has no mdev groups.
            return int(iommu is not None)
        if ext == VFIO_DMA_CC_IOMMU:
            if iommu is None:
                return 0
            # vfio_domains_have_enforce_cache_coherency: 1 unless some domain cannot
            return int(self.enforce_cache_coherency or not iommu.groups)
        return 0

    def open(self, arg: int) -> "Type1Iommu":
        """``vfio_iommu_type1_open``: v1, v2, or v2 with nesting."""
        if arg == VFIO_TYPE1_IOMMU:
            return Type1Iommu(self, v2=False, nesting=False)
        if arg == VFIO_TYPE1v2_IOMMU:
            return Type1Iommu(self, v2=True, nesting=False)
        if arg == VFIO_TYPE1_NESTING_IOMMU:
            return Type1Iommu(self, v2=True, nesting=True)
        raise VfioError(errno.EINVAL, f"{self.name} has no IOMMU type {arg}")


class Type1Iommu:
    """One container's type1 IOMMU (``struct vfio_iommu``): groups, mappings, dirty tracking.

    Every ioctl arrives with the core's lock held; DMA arrives from device
    threads that do not hold it.  ``lock`` serialises both, and is held while
    bytes move, so once UNMAP_DMA returns no DMA touches the unmapped memory
    (as the kernel's IOTLB flush before unpinning guarantees).
    """

    def __init__(self, driver: Type1Driver, v2: bool, nesting: bool):
        self.driver = driver
        self.v2 = v2
        self.nesting = nesting
        self.lock = threading.RLock()
        self.dmas = DmaList()
        self.dma_avail = driver.dma_entry_limit
        self.pgsize_bitmap = driver.pgsize_bitmap
        #: attached IOMMU groups (``core.IommuGroup``), in attach order
        self.groups: List[IommuGroup] = []
        #: valid IOVA ranges; empty until a group (a domain) is attached
        self.iova_ranges: List[Tuple[int, int]] = []
        self.dirty_page_tracking = False
        self.vaddr_invalid_count = 0
        self.released = False
        self.dma_space = Type1DmaSpace(self)
        # device -> the ops we handed the DMA space to; group -> its notifier.
        # Binds come from any thread: _handed_lock guards these two only.
        self._handed: Dict[object, Any] = {}  # device -> its ops (found by getattr)
        self._notifiers: Dict[object, object] = {}
        self._handed_lock = threading.Lock()
        # The last MAP_DMA's memory, held while the container is open: a client that maps
        # and unmaps over and over keeps one ProcessImage (fds, account), not one per MAP.
        self._recent_memory: object = None

    def __repr__(self) -> str:
        return (f"Type1Iommu({'v2' if self.v2 else 'v1'}, groups={[g.id for g in self.groups]}, "
                f"mappings={len(self.dmas)})")

    @property
    def pgsize(self) -> int:
        """The smallest page size: every IOVA, size and vaddr is aligned to it."""
        return 1 << ffs(self.pgsize_bitmap)

    def mappings(self) -> List[DmaMapping]:
        """A snapshot of the mappings in IOVA order (for tools and tests)."""
        with self.lock:
            return list(self.dmas)

    # -- IommuData: groups -------------------------------------------------------
    def attach_group(self, group) -> None:
        """``vfio_iommu_type1_attach_group``, then the group's vfio devices get the DMA space."""
        with self.lock:
            if self.released:
                raise VfioError(errno.EINVAL, "attach to a released type1 IOMMU")
            if any(g is group for g in self.groups):
                raise VfioError(errno.EINVAL, f"IOMMU group {group.id} is already attached to this container")
            if getattr(group, "noiommu", False):
                raise VfioError(errno.EINVAL, f"IOMMU group {group.id} is a noiommu group: it has no IOMMU "
                                              "for type1 to program")
            if self.vaddr_invalid_count:
                # 6.1 blocks here (vfio_iommu_replay waits for every vaddr to be
                # updated); a server cannot block its loop, so answer as 6.3+ does.
                raise VfioError(errno.EBUSY, f"IOMMU group {group.id} cannot attach while "
                                             f"{self.vaddr_invalid_count} mapping(s) have an invalidated vaddr")
            if not self.driver.interrupt_remapping and not self.driver.allow_unsafe_interrupts:
                # vfio_iommu_type1_attach_group: MSIs of a device the IOMMU cannot
                # isolate could be forged to reach any interrupt of the host
                log.warning("%s: No interrupt remapping support.  Use the module param "
                            "\"allow_unsafe_interrupts\" to enable VFIO IOMMU support on this platform",
                            self.driver.name)
                raise VfioError(errno.EPERM, f"IOMMU group {group.id}: the IOMMU has no interrupt remapping; "
                                             "set vfio_iommu_type1's allow_unsafe_interrupts to use it anyway")
            if self.nesting and not self.driver.nesting:
                # iommu_enable_nesting -> intel_iommu_enable_nesting: no nested mode support
                raise VfioError(errno.ENODEV, "the emulated IOMMU cannot nest: use VFIO_TYPE1v2_IOMMU")
            self.groups.append(group)
            self.iova_ranges = list(self.driver.iova_ranges)
        register = getattr(group, "register_notifier", None)
        if register is not None:
            notifier = self._group_notifier(group)
            with self._handed_lock:
                self._notifiers[group] = notifier
            register(notifier)
        for dev in list(getattr(group, "devices", ())):
            self._hand_dma_space(dev)

    def detach_group(self, group) -> None:
        """``vfio_iommu_type1_detach_group``: the last domain going away takes every mapping with it."""
        with self.lock:
            if not any(g is group for g in self.groups):
                return
            self.groups = [g for g in self.groups if g is not group]
            if not self.groups:
                self._remove_all()
                self.iova_ranges = []
        self._forget_group(group)

    def release(self) -> None:
        """``vfio_iommu_type1_release``: every mapping and group goes."""
        with self.lock:
            self.released = True
            self._recent_memory = None
            groups, self.groups = self.groups, []
            self._remove_all()
            self.dirty_page_tracking = False
        for group in groups:
            self._forget_group(group)
        with self._handed_lock:
            devs = list(self._handed)
        for dev in devs:
            self._withdraw_dma_space(dev)

    def _group_notifier(self, group):
        # The core's NotifyAction lives above this layer: match on its value.
        def notifier(action, dev) -> None:
            name = getattr(action, "value", action)
            try:
                if name == "bound":
                    self._hand_dma_space(dev)
                elif name == "unbound":
                    self._withdraw_dma_space(dev)
            except Exception:
                # A bind must not fail because a model could not take its DMA space.
                log.exception("%s: could not %s the DMA space of IOMMU group %s", getattr(dev, "name", dev),
                              "attach" if name == "bound" else "detach", group.id)
        return notifier

    def _forget_group(self, group) -> None:
        with self._handed_lock:
            notifier = self._notifiers.pop(group, None)
            devs = [d for d in self._handed if getattr(d, "iommu_group", None) is group]
        if notifier is not None:
            group.unregister_notifier(notifier)
        for dev in devs + list(getattr(group, "devices", ())):
            self._withdraw_dma_space(dev)

    # Called without self.lock: a device's set_dma_space may take the device's
    # lock, which a device thread holds while it waits for self.lock in DMA.
    def _hand_dma_space(self, dev) -> None:
        ops = getattr(getattr(dev, "drvdata", None), "ops", None)
        setter = getattr(ops, "set_dma_space", None)
        if setter is None or self.released:
            return
        setter(self.dma_space)
        with self._handed_lock:
            self._handed[dev] = ops

    def _withdraw_dma_space(self, dev) -> None:
        with self._handed_lock:
            ops = self._handed.pop(dev, None)
        if ops is not None:
            ops.set_dma_space(None)

    # -- IommuData: ioctls -------------------------------------------------------
    def ioctl(self, cmd: int, arg) -> int:
        """``vfio_iommu_type1_ioctl``."""
        if cmd == VFIO_CHECK_EXTENSION:
            return self.driver.extension(self, arg.value)
        handler = _IOCTLS.get(cmd)
        if handler is None:
            raise VfioError(errno.ENOTTY, f"{self.driver.name}: unknown container ioctl 0x{cmd:x}")
        return handler(self, arg)

    # GET_INFO ----------------------------------------------------------------
    def _get_info(self, arg) -> int:
        info = arg.fetch_struct(vfio_iommu_type1_info, _INFO_MINSZ)
        # 6.1: cap_offset is copied back only when the caller's struct has it
        # ("for backward compatibility, cannot require this"); 6.6 copies
        # min(argsz, sizeof(info)) instead.
        copy_out = _INFO_CAPSZ if info.argsz >= _INFO_CAPSZ else _INFO_MINSZ
        info.cap_offset = 0
        with self.lock:
            info.flags = VFIO_IOMMU_INFO_PGSIZES
            info.iova_pgsizes = self.pgsize_bitmap
            caps = self._info_caps()
        chain = caps.place(info, VFIO_IOMMU_INFO_CAPS)
        if chain:
            arg.write(ctypes.sizeof(info), chain)
        arg.write(0, bytes(info)[:copy_out])
        return 0

    def _info_caps(self) -> CapChain:
        # vfio_iommu_type1_get_info builds them in this order: migration,
        # DMA avail, IOVA ranges (the last only when the list is not empty).
        # 6.1 packs them (the 12-byte DMA avail capability puts the IOVA
        # ranges at 0x44, argsz 0x74 in all); 6.6+ pads each to 8 (0x48, 0x78).
        caps = CapChain.for_abi(self.driver.abi)
        migration = vfio_iommu_type1_info_cap_migration(
            flags=0, pgsize_bitmap=self.pgsize, max_dirty_bitmap_size=DIRTY_BITMAP_SIZE_MAX)
        caps.add_struct(migration, VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, 1)
        caps.add_struct(vfio_iommu_type1_info_dma_avail(avail=self.dma_avail), VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, 1)
        if self.iova_ranges:
            ranges = b"".join(bytes(vfio_iova_range(start=s, end=e)) for s, e in self.iova_ranges)
            cap = vfio_iommu_type1_info_cap_iova_range(nr_iovas=len(self.iova_ranges))
            caps.add_struct(cap, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1, ranges)
        return caps

    # MAP_DMA -----------------------------------------------------------------
    def _map_dma(self, arg) -> int:
        dma_map = arg.fetch_struct(vfio_iommu_type1_dma_map, _MAP_MINSZ)
        if dma_map.flags & ~_MAP_FLAGS:
            raise VfioError(errno.EINVAL, f"MAP_DMA: unknown flags 0x{dma_map.flags & ~_MAP_FLAGS:x}")
        self.map(dma_map.iova, dma_map.size, dma_map.vaddr, dma_map.flags, arg.caller)
        return 0

    def map(self, iova: int, size: int, vaddr: int, flags: int, owner) -> None:
        """``vfio_dma_do_map``: map ``size`` bytes of ``owner``'s memory at ``vaddr`` to ``iova``.

        With VFIO_DMA_MAP_FLAG_VADDR it instead gives an invalidated mapping
        its new vaddr, and ``owner`` becomes the process whose memory backs it.
        """
        set_vaddr = bool(flags & VFIO_DMA_MAP_FLAG_VADDR)
        # READ/WRITE from the device's point of view.  (The kernel first checks
        # the u64 fields fit size_t/unsigned long: always so on x86-64.)
        prot = flags & (VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE)
        if prot and set_vaddr:
            raise VfioError(errno.EINVAL, "MAP_DMA: VFIO_DMA_MAP_FLAG_VADDR updates a vaddr and takes no READ/WRITE")
        if not prot and not set_vaddr:
            raise VfioError(errno.EINVAL, "MAP_DMA: a mapping needs VFIO_DMA_MAP_FLAG_READ and/or _WRITE")
        with self.lock:
            pgsize = self.pgsize
            if not size or (size | iova | vaddr) & (pgsize - 1):
                raise VfioError(errno.EINVAL, f"MAP_DMA: iova 0x{iova:x}, vaddr 0x{vaddr:x} and size 0x{size:x} "
                                              f"must be non-zero multiples of the 0x{pgsize:x} page size")
            if iova + size - 1 > U64_MASK or vaddr + size - 1 > U64_MASK:
                raise VfioError(errno.EINVAL, "MAP_DMA: the IOVA or vaddr range wraps around 2^64")
            dma = self.dmas.find(iova, size)
            if set_vaddr:
                self._update_vaddr(dma, iova, size, vaddr, owner)
                return
            if dma is not None:
                raise VfioError(errno.EEXIST, f"MAP_DMA: [0x{iova:x}, 0x{iova + size:x}) overlaps {dma!r}")
            if not self.dma_avail:
                raise VfioError(errno.ENOSPC, f"MAP_DMA: the container already has {len(self.dmas)} mappings, "
                                              "the dma_entry_limit")
            if not self._iova_valid(iova, iova + size - 1):
                raise VfioError(errno.EINVAL, f"MAP_DMA: [0x{iova:x}, 0x{iova + size - 1:x}] is not inside one "
                                              f"valid IOVA range {self._ranges_text()}")
            dma = DmaMapping(iova, size, vaddr, prot, owner)
            dma.shared = _pin(owner, vaddr, size, bool(prot & VFIO_DMA_MAP_FLAG_WRITE))
            # vfio_pin_pages_remote: with disable_hugepages every page is pinned
            # and given to iommu_map alone, so no superpage ever backs it
            dma.iommu_pgsizes = pgsize if self.driver.disable_hugepages else self.pgsize_bitmap
            dma.pinned_in = _account(owner, size, dma)
            self._recent_memory = dma.pinned_in
            if self.dirty_page_tracking:
                dma.dirty = dirty.new_bitmap(self, dma)
            self.dmas.insert(dma)
            self.dma_avail -= 1

    def _update_vaddr(self, dma: Optional[DmaMapping], iova: int, size: int, vaddr: int, owner) -> None:
        if dma is None:
            raise VfioError(errno.ENOENT, f"MAP_DMA with VADDR: nothing is mapped at [0x{iova:x}, 0x{iova + size:x})")
        if not dma.vaddr_invalid or dma.iova != iova or dma.size != size:
            raise VfioError(errno.EINVAL, f"MAP_DMA with VADDR must name exactly one mapping whose vaddr was "
                                          f"invalidated; found {dma!r}")
        # vfio_change_dma_owner (6.1.16+): the caller (say, the process that
        # exec'd) now owns the mapping; its memory backs the IOVA from now on,
        # and the pinned pages count against its RLIMIT_MEMLOCK, not the old one's.
        pinned_in = _account(owner, dma.size)
        if dma.pinned_in is not None:
            dma.pinned_in.release_pinned(dma.size)
        dma.pinned_in = pinned_in
        dma.owner = owner
        dma.vaddr = vaddr
        dma.vaddr_invalid = False
        # The new vaddr's pages, mapped here if they are a shared file (QEMU's cpr-exec maps its memfd again)
        dma.shared = window_for(owner.memory, vaddr, dma.size, dma.writable)
        self.vaddr_invalid_count -= 1

    def _iova_valid(self, start: int, end: int) -> bool:
        """``vfio_iommu_iova_dma_valid``."""
        if not self.iova_ranges:
            return True
        return any(s <= start and end <= e for s, e in self.iova_ranges)

    def _ranges_text(self) -> str:
        return ", ".join(f"[0x{s:x}, 0x{e:x}]" for s, e in self.iova_ranges)



    # UNMAP_DMA ---------------------------------------------------------------
    def _unmap_dma(self, arg) -> int:
        unmap = arg.fetch_struct(vfio_iommu_type1_dma_unmap, _UNMAP_MINSZ)
        if unmap.flags & ~_UNMAP_FLAGS:
            raise VfioError(errno.EINVAL, f"UNMAP_DMA: unknown flags 0x{unmap.flags & ~_UNMAP_FLAGS:x}")
        get_bitmap = bool(unmap.flags & VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP)
        if get_bitmap and unmap.flags & (VFIO_DMA_UNMAP_FLAG_ALL | VFIO_DMA_UNMAP_FLAG_VADDR):
            raise VfioError(errno.EINVAL, "UNMAP_DMA: GET_DIRTY_BITMAP cannot be combined with ALL or VADDR")
        bitmap = None
        if get_bitmap:
            if unmap.argsz < _UNMAP_MINSZ + ctypes.sizeof(vfio_bitmap):
                raise VfioError(errno.EINVAL, f"UNMAP_DMA: argsz {unmap.argsz} leaves no room for struct vfio_bitmap")
            bitmap = vfio_bitmap.from_buffer_copy(arg.read(_UNMAP_MINSZ, ctypes.sizeof(vfio_bitmap)))
            if not access_ok(bitmap.data, bitmap.size):
                raise VfioError(errno.EINVAL, f"UNMAP_DMA: bitmap 0x{bitmap.data:x}+{bitmap.size} is not user memory")
            verify_bitmap_size(unmap.size >> ffs(bitmap.pgsize), bitmap.size)
        unmap.size = self.unmap(unmap.iova, unmap.size, unmap.flags, bitmap,
                                arg.memory if bitmap is not None else None)
        # Success only: on an error the kernel returns before copy_to_user.
        arg.write(0, bytes(unmap)[:_UNMAP_MINSZ])
        return 0

    def unmap(self, iova: int, size: int, flags: int = 0, bitmap: Optional[vfio_bitmap] = None,
              memory=None) -> int:
        """``vfio_dma_do_unmap``: returns how many bytes were unmapped (or had their vaddr invalidated)."""
        unmap_all = bool(flags & VFIO_DMA_UNMAP_FLAG_ALL)
        invalidate_vaddr = bool(flags & VFIO_DMA_UNMAP_FLAG_VADDR)
        with self.lock:
            pgsize = self.pgsize
            if iova & (pgsize - 1):
                raise VfioError(errno.EINVAL, f"UNMAP_DMA: iova 0x{iova:x} is not aligned to 0x{pgsize:x}")
            if unmap_all:
                if iova or size:
                    raise VfioError(errno.EINVAL, "UNMAP_DMA with VFIO_DMA_UNMAP_FLAG_ALL needs iova and size 0")
                size = U64_MASK
            elif not size or size & (pgsize - 1) or iova + size - 1 > U64_MASK:
                raise VfioError(errno.EINVAL, f"UNMAP_DMA: size 0x{size:x} must be a non-zero multiple of "
                                              f"0x{pgsize:x} that does not wrap")
            if bitmap is not None and (not self.dirty_page_tracking or bitmap.pgsize != pgsize):
                raise VfioError(errno.EINVAL, "UNMAP_DMA with GET_DIRTY_BITMAP needs dirty tracking started and "
                                              f"bitmap pgsize 0x{pgsize:x}")
            if self.v2 and not unmap_all:
                # v2: the range may not cut a mapping at either end.
                self.dmas.check_whole(iova, size, "UNMAP_DMA")
            victims = self._victims(iova, size)
            if invalidate_vaddr:
                return self._invalidate_vaddr(victims)
            if bitmap is not None:
                done = 0
                try:
                    for dma in victims:
                        dirty.update_user_bitmap(self, memory, bitmap.data, dma, iova, pgsize)
                        done += 1
                except OSError:
                    # An EFAULT on the bitmap stops the kernel's loop after the
                    # mappings before it were removed; they stay removed.
                    self._remove(victims[:done])
                    raise
            if len(victims) == len(self.dmas):
                self._remove_all()
            else:
                self._remove(victims)
            return sum(dma.size for dma in victims)

    def _victims(self, iova: int, size: int) -> List[DmaMapping]:
        """The mappings the kernel's unmap loop walks (v1 stops at a mapping starting below iova)."""
        end = (iova + size) & U64_MASK
        victims = []
        for dma in self.dmas.walk_from(iova):
            if dma.iova >= end:
                break
            # v1: an unmap starting inside a mapping unmaps nothing (and succeeds);
            # one covering a mapping's first byte unmaps all of it.
            if not self.v2 and iova > dma.iova:
                break
            victims.append(dma)
        return victims

    def _invalidate_vaddr(self, victims: List[DmaMapping]) -> int:
        already = next((dma for dma in victims if dma.vaddr_invalid), None)
        if already is not None:
            # The kernel undoes what this call invalidated and fails.
            raise VfioError(errno.EINVAL, f"UNMAP_DMA with VADDR: {already!r} is already invalidated")
        for dma in victims:
            dma.vaddr_invalid = True
            dma.drop_shared()  # no DMA reaches it until the vaddr is updated
        self.vaddr_invalid_count += len(victims)
        return sum(dma.size for dma in victims)

    def _remove(self, dmas: List[DmaMapping]) -> None:
        """``vfio_remove_dma``, for each of ``dmas``."""
        for dma in dmas:
            self.dmas.remove(dma)
        self._forget(dmas)

    # DIRTY_PAGES (dirty.py) --------------------------------------------------
    def start_dirty_tracking(self) -> None:
        dirty.start(self)

    def stop_dirty_tracking(self) -> None:
        dirty.stop(self)

    def mark_dirty(self, dma: DmaMapping, offset: int, length: int) -> None:
        """A device wrote [offset, offset + length) of ``dma`` (lock held)."""
        dirty.mark_dirty(self, dma, offset, length)

    def _remove_all(self) -> None:
        self._forget(self.dmas.clear())

    def _forget(self, dmas: List[DmaMapping]) -> None:
        for dma in dmas:
            dma.drop_shared()
            if dma.vaddr_invalid:
                self.vaddr_invalid_count -= 1
            if dma.pinned_in is not None:
                dma.pinned_in.release_pinned(dma.size)
                dma.pinned_in = None
        self.dma_avail += len(dmas)

    # DIRTY_PAGES -------------------------------------------------------------


#: vfio_iommu_type1_ioctl's switch (VFIO_CHECK_EXTENSION is the driver's), looked up per ioctl
_IOCTLS: Dict[int, Callable[[Type1Iommu, Any], int]] = {
    VFIO_IOMMU_GET_INFO: Type1Iommu._get_info,
    VFIO_IOMMU_MAP_DMA: Type1Iommu._map_dma,
    VFIO_IOMMU_UNMAP_DMA: Type1Iommu._unmap_dma,
    VFIO_IOMMU_DIRTY_PAGES: dirty.dirty_pages,
}
