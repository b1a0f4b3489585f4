"""vfio-pci's region reads and writes and its ioeventfds, as ``vfio_pci_rdwr.c``.

Regions sit at ``index << 40`` of the device fd: BAR0-5, ROM, CONFIG, VGA
(never present: EINVAL).  BAR reads and writes are split into naturally
aligned accesses of 8, 4, 2 or 1 bytes (at most 4 before 6.9: rule
BAR_IO_WIDTH); the MSI-X table reads as 0xff and drops writes;
a memory BAR fails with EIO while the (virtual) memory-enable bit is clear.
Config space goes to the virtual config (:mod:`.config`).

An ioeventfd is a write the device does by itself when the client signals
an eventfd (``watch(callback)`` on the fetched eventfd, returning a cancel
function).
"""

from __future__ import annotations

import errno
import logging
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from ...errors import VfioError
from ...uapi import (
    VFIO_DEVICE_IOEVENTFD_SIZE_MASK,
    VFIO_PCI_BAR5_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_NUM_REGIONS,
    VFIO_PCI_ROM_REGION_INDEX,
    VFIO_PCI_VGA_REGION_INDEX,
    offsetofend,
    vfio_device_ioeventfd,
)
from ...uapi.abi import Rule
from .intrs import release_eventfd

if TYPE_CHECKING:
    from .core import VfioPciDevice

log = logging.getLogger(__name__)

#: vfio-pci's region layout (vfio_pci_core.h): region index in the top bits of the file offset
VFIO_PCI_OFFSET_SHIFT = 40
VFIO_PCI_OFFSET_MASK = (1 << VFIO_PCI_OFFSET_SHIFT) - 1
#: most ioeventfds one device takes (vfio_pci_priv.h)
VFIO_PCI_IOEVENTFD_MAX = 1000

#: the widest access a BAR read or write is split into
BAR_IO_WIDTH = Rule(
    "vfio_pci.bar_io_width", 4, since={"6.9": 8},
    why="vfio_pci_core_do_io_rw splits BAR accesses into at most 4 bytes in 6.1; 'vfio/pci: Support "
        "8-byte PCI loads and stores' (2b938e3db335, 6.9) adds the ioread64/iowrite64 step, so an 8-byte "
        "read of edu's 0x80 returns the whole DMA source address instead of 0xffffffff above it.")


_from_bytes = int.from_bytes  # (looked up once: a BAR write decodes its value with it)


def VFIO_PCI_INDEX_TO_OFFSET(index: int) -> int:
    return index << VFIO_PCI_OFFSET_SHIFT


def vfio_pci_rw(vdev: "VfioPciDevice", offset: int, count: int, data: Optional[bytes]):
    """vfio_pci_rw: a pread (``data`` None: the bytes read) or pwrite (the count written) of the device fd.

    What ``awake()`` does around it is spelled out here, as every region access comes this way:
    the device lock, and the device awake (pm_runtime_resume_and_get) for the access; a device
    already awake with a usage count held skips the get/put pair, which would change nothing.
    The region is ``vdev.region_rw[index]`` (:func:`region_table`).
    """
    index = offset >> VFIO_PCI_OFFSET_SHIFT
    pm = vdev.runtime_pm
    lock = vdev.lock
    lock.acquire()  # (a with statement, spelled out: it costs more than the access)
    try:
        if index >= VFIO_PCI_NUM_REGIONS:
            raise VfioError(errno.EINVAL, f"{vdev.name}: offset 0x{offset:x} is in no region")
        if pm.usage > 0 and pm.suspend_state is None:
            return vdev.region_rw[index](offset & VFIO_PCI_OFFSET_MASK, count, data)
        pm.get()
        try:
            return vdev.region_rw[index](offset & VFIO_PCI_OFFSET_MASK, count, data)
        finally:
            pm.put()
    finally:
        lock.release()


def region_table(vdev: "VfioPciDevice") -> List[Callable[[int, int, Optional[bytes]], Any]]:
    """vfio_pci_rw's choice of region, made once an open has its virtual config: index ->
    ``rw(pos, count, data)``, bytes read (``data`` None) or the count written.

    A BAR's entry carries what its accesses never change (the BAR, the MSI-X table range to
    exclude, the function's accessors); config is the virtual config of this open.
    """
    assert vdev.vconfig is not None  # made when the device is probed and opened
    fn = vdev.function
    table: List[Callable[[int, int, Optional[bytes]], Any]] = []
    for index in range(VFIO_PCI_BAR5_REGION_INDEX + 1):
        x_start = x_end = 0
        msix = fn.msix
        if msix is not None and msix.table_bar == index:
            x_start, x_end = msix.table_offset, msix.table_offset + msix.table_size
        bar = fn.bars[index]
        test_mem = bar is not None and not bar.io
        table.append(partial(bar_rw, vdev, index, bar, test_mem, x_start, x_end,
                             partial(fn.bar_read, index), partial(fn.bar_write, index)))
    table.insert(VFIO_PCI_ROM_REGION_INDEX, partial(rom_rw, vdev))
    table.insert(VFIO_PCI_CONFIG_REGION_INDEX, vdev.vconfig.rw)
    table.insert(VFIO_PCI_VGA_REGION_INDEX, partial(vga_rw, vdev))
    assert len(table) == VFIO_PCI_NUM_REGIONS
    return table


def bar_rw(vdev: "VfioPciDevice", index: int, bar, test_mem: bool, x_start: int, x_end: int, read, write,
           pos: int, count: int, data: Optional[bytes]):
    """vfio_pci_bar_rw: the MSI-X table (``x_start``..``x_end``) is excluded, the rest goes to the function;
    a memory BAR (``test_mem``) is reached only with memory decode enabled."""
    if bar is None or not bar.address:
        raise VfioError(errno.EINVAL, f"{vdev.name}: BAR{index} is not implemented")
    size = bar.size
    if pos >= size:
        raise VfioError(errno.EINVAL, f"{vdev.name}: 0x{pos:x} is beyond BAR{index}")
    if count > size - pos:
        count = size - pos
    if 0 < count <= vdev.io_width and not count & (count - 1) and not pos & (count - 1) and \
            (pos >= x_end or pos + count <= x_start):
        # One naturally aligned access outside the excluded range (a driver's register
        # access): do_io_rw's loop would take it in one step.
        vconfig = vdev.vconfig
        assert vconfig is not None  # made when the device is opened
        if test_mem and not vconfig.memory_enabled():
            raise VfioError(errno.EIO, f"{vdev.name}: memory access with memory decode disabled")
        try:  # (vdev.guarded, spelled out)
            if data is None:
                return read(pos, count).to_bytes(count, "little")
            write(pos, count, _from_bytes(data if count == len(data) else data[:count], "little"))
        except Exception as e:
            raise vdev.model_failure(e) from None
        return count
    return do_io_rw(vdev, pos, count, data, x_start, x_end, vdev.io_width, test_mem, read, write)


def rom_rw(vdev: "VfioPciDevice", pos: int, count: int, data: Optional[bytes]) -> bytes:
    if data is not None:
        raise VfioError(errno.EINVAL, f"{vdev.name}: the ROM is read-only")
    return rom_read(vdev, pos, count)


def vga_rw(vdev: "VfioPciDevice", pos: int, count: int, data: Optional[bytes]):
    raise VfioError(errno.EINVAL, f"{vdev.name} has no VGA region")


def rom_read(vdev: "VfioPciDevice", pos: int, count: int) -> bytes:
    rom = vdev.function.rom
    if rom is None or not rom.address:
        raise VfioError(errno.EINVAL, f"{vdev.name} has no ROM")
    if pos >= rom.size:
        raise VfioError(errno.EINVAL, f"{vdev.name}: 0x{pos:x} is beyond the ROM BAR")
    image = rom.image_size()
    if not image:
        raise VfioError(errno.ENOMEM, f"{vdev.name}: the ROM has no valid image")
    count = min(count, rom.size - pos)
    # Bytes past the image read as 0xff; ROMs never see 8-byte accesses.
    return do_io_rw(vdev, pos, count, None, image, rom.size, 4, True, vdev.function.rom_read)


def do_io_rw(vdev: "VfioPciDevice", pos, count, data, x_start, x_end, max_width, test_mem, read, write=None):
    """vfio_pci_core_do_io_rw: naturally aligned accesses, an excluded range, EIO when memory is off."""
    out = bytearray()
    done = 0
    while done < count:
        off = pos + done
        left = count - done
        fillable = min(left, x_start - off) if off < x_start else left if off >= x_end else 0
        if fillable:
            n = next(w for w in (8, 4, 2, 1) if w <= max_width and fillable >= w and off % w == 0)
            assert vdev.vconfig is not None  # made when the device is opened
            if test_mem and not vdev.vconfig.memory_enabled():
                raise VfioError(errno.EIO, f"{vdev.name}: memory access with memory decode disabled")
            if data is None:
                out += vdev.guarded(read, off, n).to_bytes(n, "little")
            else:
                vdev.guarded(write, off, n, int.from_bytes(data[done:done + n], "little"))
        else:
            n = min(left, x_end - off)  # excluded: reads fill with 0xff, writes are dropped
            if data is None:
                out += b"\xff" * n
        done += n
    return bytes(out) if data is None else done


class Ioeventfds:
    """The ioeventfds of one device (``vdev->ioeventfds_list``), and VFIO_DEVICE_IOEVENTFD."""

    def __init__(self, vdev: "VfioPciDevice"):
        self.vdev = vdev
        #: (bar, offset, data, size) -> (the fetched eventfd, the cancel of its watch)
        self.table: Dict[tuple, tuple] = {}

    def __len__(self) -> int:
        return len(self.table)

    def release_all(self) -> None:
        """The last close: every watch cancelled, every eventfd reference dropped."""
        for efd, cancel in self.table.values():
            cancel()
            release_eventfd(efd)
        self.table.clear()

    def ioctl(self, arg) -> int:
        """vfio_pci_ioctl_ioeventfd, then vfio_pci_ioeventfd: add one, or remove it with fd -1."""
        vdev = self.vdev
        minsz = offsetofend(vfio_device_ioeventfd, "fd")
        req = arg.fetch_struct(vfio_device_ioeventfd, minsz)
        if req.flags & ~VFIO_DEVICE_IOEVENTFD_SIZE_MASK:
            raise VfioError(errno.EINVAL, f"IOEVENTFD: unknown flags 0x{req.flags:x}")
        count = req.flags & VFIO_DEVICE_IOEVENTFD_SIZE_MASK
        if bin(count).count("1") != 1 or req.fd < -1:
            raise VfioError(errno.EINVAL, "IOEVENTFD: give exactly one access size and an fd >= -1")
        bar_index = req.offset >> VFIO_PCI_OFFSET_SHIFT
        pos = req.offset & VFIO_PCI_OFFSET_MASK
        if bar_index > VFIO_PCI_BAR5_REGION_INDEX:
            raise VfioError(errno.EINVAL, "IOEVENTFD: only into BARs")
        bar = vdev.function.bars[bar_index]
        if pos + count > (bar.size if bar is not None else 0):
            raise VfioError(errno.EINVAL, "IOEVENTFD: beyond the BAR")
        msix = vdev.function.msix
        if msix is not None and msix.table_bar == bar_index and \
                not (pos + count <= msix.table_offset or pos >= msix.table_offset + msix.table_size):
            raise VfioError(errno.EINVAL, "IOEVENTFD: would write the MSI-X table")
        key = (bar_index, pos, req.data, count)
        if key in self.table:
            if req.fd == -1:
                # vfio_pci_ioctl_ioeventfd removal: the virqfd goes, and with it the eventfd reference
                efd, cancel = self.table.pop(key)
                cancel()
                release_eventfd(efd)
                return 0
            raise VfioError(errno.EEXIST, "IOEVENTFD: already registered")
        if req.fd < 0:
            raise VfioError(errno.ENODEV, "IOEVENTFD: nothing registered to remove")
        if len(self.table) >= VFIO_PCI_IOEVENTFD_MAX:
            raise VfioError(errno.ENOSPC, "IOEVENTFD: too many")
        efd = arg.caller.get_eventfd(req.fd)
        watch = getattr(efd, "watch", None)
        if watch is None:
            release_eventfd(efd)
            raise VfioError(errno.EOPNOTSUPP, "this transport cannot watch an eventfd (ioeventfd)")
        data = req.data.to_bytes(8, "little")[:count]
        try:
            cancel = watch(lambda: self._write(data, req.offset))
        except BaseException:
            release_eventfd(efd)
            raise
        self.table[key] = (efd, cancel)
        return 0

    def _write(self, data: bytes, offset: int) -> None:
        """vfio_pci_ioeventfd_handler: the write happens, or is dropped (memory disabled, model failure)."""
        try:
            self.vdev.write(data, offset)
        except VfioError as e:
            log.debug("%s: ioeventfd write at 0x%x dropped: %s", self.vdev.name, offset, e)
