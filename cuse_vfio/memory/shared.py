"""A client's DMA memory that is a shared file, mapped into the server too: a model's DMA as a memcpy.

Real clients very often give a device memory that is a file both sides can
map: QEMU's ``memory-backend-memfd`` and ``memory-backend-file`` (on /dev/shm
or hugetlbfs), DPDK's and SPDK's hugepages, ``MAP_SHARED | MAP_ANONYMOUS``
(shmem too).  When every mapping (VMA) of a MAP_DMA's range is a MAP_SHARED
mapping of a regular file on tmpfs/shmem or hugetlbfs, MAP_DMA maps the same
file pages into the server (a ``SharedWindow``), and DMA to that IOVA range is
a copy in this process (csrc/shared.c), with no hand-off to a copier thread.

That is closer to the kernel than the copier, not further: the kernel pins
the pages at MAP_DMA, and the device reaches those pages whatever the process
maps at the vaddr later; so does a window.  Everything else (private or
anonymous memory, files on any other file system, above all FUSE, whose
daemon could stall whoever faults its pages) keeps the copier.

What the client controls can still fault: it may truncate the file, or a
hugetlbfs page may not be there to allocate, and an access to the window
raises SIGBUS here.  Every copy runs under csrc/shared.c's guard, and a SIGBUS
is a failed copy (EFAULT): the IOMMU logs it as it logs a copier's failure.

A window lives as long as its mapping: UNMAP_DMA, unmap-all, the container's
release, a vaddr invalidated (and made again when the vaddr is updated), the
client's exit (its container goes) drop it (``iommu/type1.py``).  Only a MAP_DMA
whose VMAs are all shared and file-backed pays for more than the probe it
makes anyway; private anonymous memory pays nothing.  The VMAs come from that
probe: PROCMAP_QUERY (Linux 6.11), or /proc/PID/maps on an older kernel.
"""

from __future__ import annotations

import array
import errno
import itertools
import logging
import os
import threading
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import VfioError
from . import process
from ._copier import ffi as _ffi
from ._copier import lib as _lib
from .process import PAGE_SIZE, ProcessImage

log = logging.getLogger(__name__)

#: ``statfs.f_type`` of the file systems whose pages a window may map (include/uapi/linux/magic.h)
TMPFS_MAGIC = 0x01021994
HUGETLBFS_MAGIC = 0x958458F6
_MAGICS = _ffi.new("long[]", [TMPFS_MAGIC, HUGETLBFS_MAGIC])
#: their names in mountinfo
_MEMORY_FS_TYPES = (b"tmpfs", b"hugetlbfs")

#: ``procmap_query.vma_flags``: a MAP_SHARED mapping
PROCMAP_QUERY_VMA_SHARED = 0x08
#: memfd_create's MFD_HUGETLB and the shift of its page size (include/uapi/linux/memfd.h)
MFD_HUGETLB = 0x0004
MFD_HUGE_SHIFT = 26

#: mappings (VMAs) all windows may add to the server at most, far below vm.max_map_count
#: (65530 by default), so a client that maps 65535 pieces of a file cannot exhaust it; past it, the copier
MAX_WINDOW_VMAS = 8192

#: (start, end, offset, inode, dev major, dev minor, page size) of one VMA of a MAP_DMA's range
Vma = Tuple[int, int, int, int, int, int, int]


class SharedWindow:
    """The server's own mapping of the file pages behind ``size`` bytes at ``vaddr`` of process ``pid``.

    An address space (``core.ops.AddressSpace``) whose addresses are offsets
    into the DMA mapping: ``read``, ``write``, ``readv``, ``writev``, as
    ``ProcessImage`` has them.  Its owner (the IOMMU) holds it under its lock
    and ``close``s it once the mapping goes; nothing else keeps it.
    """

    __slots__ = ("pid", "vaddr", "size", "writable", "vmas", "_base", "_span", "_span_len")

    def __init__(self, pid: int, vaddr: int, size: int, writable: bool, span: int, span_len: int, base: int,
                 vmas: int):
        self.pid = pid
        self.vaddr = vaddr
        self.size = size
        self.writable = writable
        #: mappings this window added to the server
        self.vmas = vmas
        self._span = span
        self._span_len = span_len
        self._base = _ffi.cast("char *", base)

    def __repr__(self) -> str:
        return (f"SharedWindow(pid {self.pid}: 0x{self.size:x} bytes at vaddr 0x{self.vaddr:x}, "
                f"here at 0x{int(_ffi.cast('uintptr_t', self._base)):x})")

    @property
    def address(self) -> int:
        """Where the window starts in the server (0 once closed)."""
        return int(_ffi.cast("uintptr_t", self._base)) if self._span else 0

    def read(self, addr: int, size: int) -> bytes:
        if size <= 0 or addr < 0 or addr + size > self.size or not self._span:
            return self._refuse(addr, size, "read")
        buf = bytearray(size)
        if _lib.cv_shared_copy(_ffi.from_buffer(buf), self._base + addr, size) != size:
            raise self._bus_error(addr, size, "read")
        return bytes(buf)

    def write(self, addr: int, data) -> None:
        size = len(data)
        if size <= 0 or addr < 0 or addr + size > self.size or not self._span or not self.writable:
            self._refuse(addr, size, "written")
            return
        if _lib.cv_shared_copy(self._base + addr, _ffi.from_buffer(data), size) != size:
            raise self._bus_error(addr, size, "written")

    def readv(self, pieces: Sequence[Tuple[int, int]], origin: int = 0) -> Optional[bytes]:
        """[(addr, size), ...] read in order in one call: their bytes joined, or None when not every
        byte could be (the caller goes piece by piece to tell which failed, and why).  With
        ``origin``, the addresses are ``origin`` plus the offset in the window (IOVAs, say)."""
        size = sum(n for _, n in pieces)
        flat = self._flat(pieces)
        if flat is None:
            return None
        buf = bytearray(size)
        if _lib.cv_shared_copy_list(_ffi.from_buffer(buf), self._base, origin, self.size, flat, len(pieces), 0) != size:
            return None
        return bytes(buf)

    def writev(self, pieces: Sequence[Tuple[int, int]], data, origin: int = 0) -> bool:
        """``data`` written over [(addr, size), ...] in order; False when not all of it was (what
        precedes the piece that failed is written; the caller goes on piece by piece).  Nothing is
        written when some piece is not inside the window, or ``data`` is not as long as the pieces.
        ``origin`` as for ``readv``."""
        flat = self._flat(pieces)
        if flat is None or not self.writable or sum(n for _, n in pieces) != len(data):
            return False
        return _lib.cv_shared_copy_list(_ffi.from_buffer(data), self._base, origin, self.size, flat, len(pieces),
                                        1) == len(data)

    def _flat(self, pieces: Sequence[Tuple[int, int]]):
        """The pieces as C's (address, length) pairs; None when the window is closed or a number is
        not an unsigned 64-bit one (C checks each piece is inside the window)."""
        if not self._span:
            return None
        try:
            return _ffi.from_buffer("uint64_t[]", array.array("Q", itertools.chain.from_iterable(pieces)))
        except (OverflowError, TypeError):
            return None

    def close(self) -> None:
        """Unmap it from the server (once; later calls do nothing)."""
        span, self._span = self._span, 0
        if span:
            _release(self.vmas)
            err = _lib.cv_shared_unmap(_ffi.cast("void *", span), self._span_len)
            if err:
                log.error("%r: munmap: %s", self, os.strerror(-err))

    def _refuse(self, addr: int, size: int, verb: str) -> bytes:
        """Nothing to move (b""), or the EFAULT of a copy the window cannot make."""
        if size == 0:
            return b""
        why = "it is read-only" if self._span and verb == "written" and not self.writable else (
            f"it is outside the shared window of {self.size} bytes" if self._span else "the window is closed")
        raise VfioError(errno.EFAULT, f"pid {self.pid}: {size} bytes at vaddr 0x{self.vaddr + addr:x} cannot be "
                                      f"{verb}: {why}")

    def _bus_error(self, addr: int, size: int, verb: str) -> VfioError:
        return VfioError(errno.EFAULT, f"pid {self.pid}: {size} bytes at vaddr 0x{self.vaddr + addr:x} cannot be "
                                       f"{verb}: the shared file's page raised SIGBUS (truncated, or no huge page)")


def pin_shared(image: ProcessImage, vaddr: int, size: int, write: bool) -> Optional[SharedWindow]:
    """MAP_DMA's check of ``image`` (``ProcessImage.probe``: EFAULT unless every page of the range is
    mapped, and writable with ``write``), then, when the range is all shared files of memory, the
    window onto them; None otherwise (and whenever a window cannot be made: the copier serves it)."""
    vmas = _probe(image, vaddr, size, write)
    if vmas is None:  # no PROCMAP_QUERY here: the same from /proc/PID/maps
        vmas = _probe_maps(image, vaddr, size, write)
    if not vmas:
        return None
    return _window(image.pid, vaddr, size, write, vmas)


def window_for(image: object, vaddr: int, size: int, write: bool) -> Optional[SharedWindow]:
    """A window onto [vaddr, vaddr + size) of ``image`` if it is all shared files of memory now; None
    otherwise, and never an error (MAP_DMA with VADDR checks nothing, as the kernel does not)."""
    if not isinstance(image, ProcessImage) or size <= 0:
        return None
    try:
        vmas = _probe(image, vaddr, size, write)
        if vmas is None:
            vmas = _probe_maps(image, vaddr, size, write)
    except VfioError:
        return None
    return _window(image.pid, vaddr, size, write, vmas) if vmas else None


def _probe(image: ProcessImage, addr: int, size: int, write: bool) -> Optional[List[Vma]]:
    """``ProcessImage``'s PROCMAP_QUERY probe, keeping what a window needs of each VMA: [] once one is
    not a shared file; None when this kernel has no PROCMAP_QUERY (nothing is checked then)."""
    if image._maps_fd is None or not process._have_procmap_query or size <= 0:
        return None
    vmas: List[Vma] = []
    shared = [True]

    def keep(q) -> None:
        if not shared[0]:
            return  # one private or anonymous VMA: the copier serves the range, only the probe goes on
        if q.vma_flags & PROCMAP_QUERY_VMA_SHARED and q.inode:
            vmas.append((q.vma_start, q.vma_end, q.vma_offset, q.inode, q.dev_major, q.dev_minor,
                         max(q.vma_page_size, PAGE_SIZE)))
        else:
            shared[0] = False

    if not image._query(addr, size, write, keep):
        return None
    return vmas if shared[0] else []


def _probe_maps(image: ProcessImage, addr: int, size: int, write: bool) -> List[Vma]:
    """The probe of a kernel without PROCMAP_QUERY (``ProcessImage.probe`` then reads /proc/PID/maps,
    and asks whether the image is still the process's), keeping each VMA as ``_probe`` does; a VMA's
    page size is not in that file (0 here: ``_memory_devs`` knows it from the file system)."""
    end, pos = addr + size, addr
    vmas: Optional[List[Vma]] = []
    try:
        with open(f"/proc/{image.pid}/maps", "rb") as maps:
            for line in maps:
                fields = line.split(None, 5)
                start, stop = (int(x, 16) for x in fields[0].split(b"-"))
                if stop <= pos:
                    continue
                if start > pos or fields[1][1 if write else 0] == ord("-"):
                    break
                if vmas is not None and fields[1][3] == ord("s") and int(fields[4]):
                    major, minor = (int(x, 16) for x in fields[3].split(b":"))
                    vmas.append((start, stop, int(fields[2], 16), int(fields[4]), major, minor, 0))
                else:
                    vmas = None
                pos = stop
                if pos >= end:
                    break
    except OSError:
        raise image._gone() from None
    if pos < end:
        raise VfioError(errno.EFAULT, f"pid {image.pid}: 0x{pos:x} (in [0x{addr:x}, 0x{end:x})) is not mapped"
                                      + (" writable" if write else " readable"))
    if not image.current(addr):
        raise image._gone()
    return vmas if vmas is not None else []


_lock = threading.Lock()
_vmas_mapped = 0
#: the superblock of shmem's internal mount (memfd, MAP_SHARED|MAP_ANONYMOUS, SysV shm): one for every process
_shm_dev: Optional[Tuple[int, int]] = None
#: page size -> the superblock of hugetlbfs's internal mount of that size (MFD_HUGETLB memfds), or None
_hugetlb_devs: Dict[int, Optional[Tuple[int, int]]] = {}


def _take(vmas: int) -> bool:
    global _vmas_mapped
    with _lock:
        if _vmas_mapped + vmas > MAX_WINDOW_VMAS:
            return False
        _vmas_mapped += vmas
        return True


def _release(vmas: int) -> None:
    global _vmas_mapped
    with _lock:
        _vmas_mapped -= vmas


def windows_vmas() -> int:
    """The mappings all open windows add to the server now."""
    return _vmas_mapped


def _internal_dev(flags: int) -> Optional[Tuple[int, int]]:
    """The superblock of the kernel's own shmem or hugetlbfs mount, from a file of our own on it."""
    try:
        fd = os.memfd_create("cuse-vfio-superblock", os.MFD_CLOEXEC | flags)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return os.major(st.st_dev), os.minor(st.st_dev)


def _memory_devs(pid: int, vmas: List[Vma]) -> Dict[Tuple[int, int], int]:
    """Which of the VMAs' superblocks are tmpfs/shmem or hugetlbfs, known without touching a file, and
    their page sizes: the kernel's internal mounts (the same in every process), then the client's own
    mountinfo (hugetlbfs says its page size there)."""
    global _shm_dev
    sizes = {vma[6] for vma in vmas if vma[6] > PAGE_SIZE}
    if any(not vma[6] for vma in vmas):  # (from /proc/PID/maps) every huge page size the kernel has
        sizes.update(_huge_page_sizes())
    with _lock:
        if _shm_dev is None:
            _shm_dev = _internal_dev(0)
        known: Dict[Tuple[int, int], int] = {_shm_dev: PAGE_SIZE} if _shm_dev else {}
        for page in sizes:
            if page not in _hugetlb_devs:
                _hugetlb_devs[page] = _internal_dev(MFD_HUGETLB | (page.bit_length() - 1) << MFD_HUGE_SHIFT)
            dev = _hugetlb_devs[page]
            if dev is not None:
                known[dev] = page
    if not {(vma[4], vma[5]) for vma in vmas} - set(known):
        return known
    try:
        with open(f"/proc/{pid}/mountinfo", "rb") as mountinfo:
            for line in mountinfo:
                mount, _, fs = line.partition(b" - ")
                fs_type, _, options = fs.rstrip().partition(b" ")
                if fs_type in _MEMORY_FS_TYPES:
                    major, minor = (int(x) for x in mount.split()[2].split(b":"))
                    known[(major, minor)] = _page_size_option(options) if fs_type == b"hugetlbfs" else PAGE_SIZE
    except (OSError, ValueError, IndexError):
        pass
    return known


def _huge_page_sizes() -> List[int]:
    try:
        return [int(name[len("hugepages-"):-len("kB")]) * 1024 for name in os.listdir("/sys/kernel/mm/hugepages")]
    except (OSError, ValueError):
        return []


def _page_size_option(options: bytes) -> int:
    """A hugetlbfs mount's ``pagesize=2M`` (its super options in mountinfo); 0 when it says none."""
    for option in options.split(b" ")[-1].split(b","):
        if option.startswith(b"pagesize="):
            value = option[len(b"pagesize="):]
            unit = {b"K": 1 << 10, b"M": 1 << 20, b"G": 1 << 30}.get(value[-1:], 1)
            return int(value.rstrip(b"KMG")) * unit
    return 0


def _window(pid: int, vaddr: int, size: int, write: bool, vmas: List[Vma]) -> Optional[SharedWindow]:
    """The window onto the VMAs (which cover [vaddr, vaddr + size) in order), or None (and why, in the log)."""
    where = f"pid {pid} [0x{vaddr:x}, 0x{vaddr + size:x})"
    memory = _memory_devs(pid, vmas)
    if any(not memory.get((vma[4], vma[5])) for vma in vmas):
        log.debug("%s: shared, but not all on tmpfs or hugetlbfs: DMA goes through the copier", where)
        return None
    vmas = [vma[:6] + (vma[6] or memory[vma[4], vma[5]],) for vma in vmas]
    err = _lib.cv_shared_guard()
    if err:
        log.warning("%s: no SIGBUS guard (%s): DMA goes through the copier", where, os.strerror(-err))
        return None
    if not _take(len(vmas)):
        log.info("%s: the server already maps %d pieces of client files: DMA goes through the copier",
                 where, MAX_WINDOW_VMAS)
        return None
    fds: List[int] = []
    try:
        magic = _ffi.new("long *")
        for start, stop, offset, inode, major, minor, page in vmas:
            fd = _lib.cv_shared_open(pid, start, stop, major, minor, inode, int(write), _MAGICS, len(_MAGICS), magic)
            if fd < 0:
                _release(len(vmas))
                log.debug("%s: the file of [0x%x, 0x%x) (inode %d) not opened: %s: DMA goes through the copier",
                          where, start, stop, inode, os.strerror(-fd))
                return None
            fds.append(fd)
        return _place(pid, vaddr, size, write, vmas, fds, where)
    finally:
        for fd in fds:
            os.close(fd)


def _place(pid: int, vaddr: int, size: int, write: bool, vmas: List[Vma], fds: List[int],
           where: str) -> Optional[SharedWindow]:
    """The files' pages mapped here, at the same distances from each other as in the client."""
    # Each piece is mapped whole pages of its own size: hugetlbfs maps only at huge page boundaries,
    # of the file and of the address, so the server's addresses keep the client's alignment to the
    # largest page (a VMA's bounds are aligned to its page size, so no piece grows into another).
    align = max(vma[6] for vma in vmas)
    lo, hi = vaddr & ~(align - 1), (vaddr + size + align - 1) & ~(align - 1)
    pieces = [(max(start, vaddr) & ~(page - 1), (min(stop, vaddr + size) + page - 1) & ~(page - 1))
              for start, stop, _, _, _, _, page in vmas]
    if len(vmas) == 1:  # one piece: where the kernel puts it (aligned to its page, for hugetlbfs too)
        span = _lib.cv_shared_map(_ffi.NULL, hi - lo, int(write), fds[0], vmas[0][2] + lo - vmas[0][0])
    else:
        span = _lib.cv_shared_reserve(hi - lo, align)
    if span == _ffi.NULL:
        _release(len(vmas))
        log.info("%s: no address space for a window (%s): DMA goes through the copier", where,
                 os.strerror(_ffi.errno))
        return None
    at = int(_ffi.cast("uintptr_t", span))
    window = SharedWindow(pid, vaddr, size, write, at, hi - lo, at + vaddr - lo, len(vmas))
    for (start, _, offset, _, _, _, _), (first, last), fd in zip(vmas, pieces, fds):
        if len(vmas) > 1 and _lib.cv_shared_map(_ffi.cast("void *", at + first - lo), last - first, int(write), fd,
                                                offset + first - start) == _ffi.NULL:
            err = _ffi.errno
            window.close()
            log.debug("%s: the file of [0x%x, 0x%x) not mapped: %s: DMA goes through the copier",
                      where, first, last, os.strerror(err))
            return None
    log.debug("%s: a shared file (%d piece%s), mapped here: DMA without the copier", where, len(vmas),
              "" if len(vmas) == 1 else "s")
    return window
