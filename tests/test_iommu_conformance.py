"""type1 against the real kernel: the type1 part of tests/conformance/vfio-conformance.c, replayed in process.

``REAL_6_1`` is what that program printed on Debian's 6.1.0-56 (6.1.192) in the
q35 + intel-iommu + edu VM (``scripts/vm --mode vfio-edu``).  The steps below
are the C program's, in its order and with its arguments, so each observation
name means the same call; the emulator must print the same values.
"""

import ctypes
import struct

import pytest

from core_fakes import Topology
from cuse_vfio.iommu import register_default_drivers
from cuse_vfio.transport.local import LocalProcess
from cuse_vfio.uapi import (
    VFIO_CHECK_EXTENSION,
    VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_VADDR,
    VFIO_DMA_MAP_FLAG_WRITE,
    VFIO_DMA_UNMAP_FLAG_ALL,
    VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
    VFIO_DMA_UNMAP_FLAG_VADDR,
    VFIO_GROUP_SET_CONTAINER,
    VFIO_IOMMU_DIRTY_PAGES,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP,
    VFIO_IOMMU_GET_INFO,
    VFIO_IOMMU_INFO_CAPS,
    VFIO_IOMMU_MAP_DMA,
    VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION,
    VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL,
    VFIO_IOMMU_UNMAP_DMA,
    VFIO_SET_IOMMU,
    VFIO_SPAPR_TCE_IOMMU,
    VFIO_TYPE1_IOMMU,
    VFIO_TYPE1v2_IOMMU,
    parse_caps,
)

PAGE = 0x1000
RW = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE
IOVA_A, IOVA_B, IOVA_VADDR, IOVA_DIRTY, IOVA_FREE = 0x100000, 0x200000, 0x300000, 0x500000, 0x800000

REAL_6_1 = dict(line.split("=", 1) for line in """
    container.check_extension.pre.0=0
    container.check_extension.pre.1=1
    container.check_extension.pre.2=0
    container.check_extension.pre.3=1
    container.check_extension.pre.4=0
    container.check_extension.pre.5=0
    container.check_extension.pre.6=1
    container.check_extension.pre.7=0
    container.check_extension.pre.8=0
    container.check_extension.pre.9=1
    container.check_extension.pre.10=0
    container.check_extension.pre.11=0
    container.check_extension.pre.0x7fffffff=0
    container.set_iommu.no_group=ERR:EINVAL
    container.set_iommu.bad_type=ERR:ENODEV
    container.set_iommu.spapr=ERR:ENODEV
    container.set_iommu.type1v2=0
    container.set_iommu.again=ERR:EINVAL
    container.set_iommu.again_type1=ERR:EINVAL
    container.check_extension.post.0=0
    container.check_extension.post.1=1
    container.check_extension.post.2=0
    container.check_extension.post.3=1
    container.check_extension.post.4=0
    container.check_extension.post.5=0
    container.check_extension.post.6=1
    container.check_extension.post.7=0
    container.check_extension.post.8=0
    container.check_extension.post.9=1
    container.check_extension.post.10=1
    container.check_extension.post.11=0
    container.check_extension.post.0x7fffffff=0
    type1.get_info.argsz8=ERR:EINVAL
    type1.get_info.argsz16=0
    type1.get_info.argsz16.argsz=0x74
    type1.get_info.argsz16.flags=0x3
    type1.get_info.argsz16.pgsizes=0x40201000
    type1.get_info.argsz16.cap_offset_untouched=0x1
    type1.get_info.sizeof=0
    type1.get_info.sizeof.argsz=0x74
    type1.get_info.sizeof.flags=0x3
    type1.get_info.sizeof.pgsizes=0x40201000
    type1.get_info.sizeof.cap_offset=0x0
    type1.get_info.full=0
    type1.get_info.full.argsz=0x1000
    type1.get_info.full.flags=0x3
    type1.get_info.full.pgsizes=0x40201000
    type1.get_info.full.cap_offset=0x18
    type1.cap.0.offset=0x18
    type1.cap.0.id=2
    type1.cap.0.version=1
    type1.cap.0.flags=0x0
    type1.cap.0.pgsize_bitmap=0x1000
    type1.cap.0.max_dirty_bitmap_size=0x10000000
    type1.cap.1.offset=0x38
    type1.cap.1.id=3
    type1.cap.1.version=1
    type1.cap.1.avail=65535
    type1.cap.2.offset=0x44
    type1.cap.2.id=1
    type1.cap.2.version=1
    type1.cap.2.nr_iovas=2
    type1.cap.2.iova.0.start=0x0
    type1.cap.2.iova.0.end=0xfedfffff
    type1.cap.2.iova.1.start=0xfef00000
    type1.cap.2.iova.1.end=0x7fffffffff
    type1.cap.count=3
    type1.dma_avail.initial=65535
    type1.map.ok=0
    type1.dma_avail.after_map1=65534
    type1.map.overlap_exact=ERR:EEXIST
    type1.map.overlap_head=ERR:EEXIST
    type1.map.overlap_tail=ERR:EEXIST
    type1.map.overlap_inside=ERR:EEXIST
    type1.map.overlap_around=ERR:EEXIST
    type1.map.unaligned_iova=ERR:EINVAL
    type1.map.unaligned_size=ERR:EINVAL
    type1.map.unaligned_vaddr=ERR:EINVAL
    type1.map.size0=ERR:EINVAL
    type1.map.no_rw_flags=ERR:EINVAL
    type1.map.unknown_flag=ERR:EINVAL
    type1.map.argsz_short=ERR:EINVAL
    type1.map.argsz_large=0
    type1.map.argsz_large.unmap=0
    type1.map.argsz_large.unmap.size=0x1000
    type1.map.iova_wrap=ERR:EINVAL
    type1.map.vaddr_wrap=ERR:EINVAL
    type1.map.iova_msi_window=ERR:EINVAL
    type1.map.iova_2p39=ERR:EINVAL
    type1.map.iova_2p48=ERR:EINVAL
    type1.map.unmapped_vaddr=ERR:EFAULT
    type1.map.readonly_vaddr.rw=ERR:EFAULT
    type1.map.readonly_vaddr.read=0
    type1.map.readonly_vaddr.unmap=0
    type1.map.readonly_vaddr.unmap.size=0x1000
    type1.map.write_only=0
    type1.dma_avail.after_write_only=65533
    type1.map.write_only.unmap=0
    type1.map.write_only.unmap.size=0x1000
    type1.dma_avail.after_unmap_write_only=65534
    type1.map.b=0
    type1.dma_avail.after_map2=65533
    type1.unmap.straddle_start=ERR:EINVAL
    type1.unmap.straddle_end=ERR:EINVAL
    type1.unmap.first_page=ERR:EINVAL
    type1.unmap.unaligned_iova=ERR:EINVAL
    type1.unmap.unaligned_size=ERR:EINVAL
    type1.unmap.size0=ERR:EINVAL
    type1.unmap.argsz_short=ERR:EINVAL
    type1.unmap.unknown_flag=ERR:EINVAL
    type1.unmap.wrap=ERR:EINVAL
    type1.unmap.dirty_bitmap_not_tracking=ERR:EINVAL
    type1.unmap.empty=0
    type1.unmap.empty.size=0x0
    type1.unmap.exact=0
    type1.unmap.exact.size=0x4000
    type1.dma_avail.after_unmap=65534
    type1.map.c1=0
    type1.map.c2=0
    type1.dma_avail.after_c1_c2=65532
    type1.unmap.covering_two=0
    type1.unmap.covering_two.size=0x3000
    type1.map.d=0
    type1.unmap_all.iova_nonzero=ERR:EINVAL
    type1.unmap_all.size_nonzero=ERR:EINVAL
    type1.unmap_all.with_dirty_bitmap=ERR:EINVAL
    type1.unmap_all=0
    type1.unmap_all.size=0x6000
    type1.dma_avail.after_unmap_all=65535
    type1.unmap_all.empty=0
    type1.unmap_all.empty.size=0x0
    type1.vaddr.map=0
    type1.vaddr.update_valid=ERR:EINVAL
    type1.vaddr.invalidate_partial=ERR:EINVAL
    type1.vaddr.invalidate=0
    type1.vaddr.invalidate.size=0x4000
    type1.vaddr.invalidate_again=ERR:EINVAL
    type1.vaddr.invalidate_with_dirty=ERR:EINVAL
    type1.vaddr.update_size_mismatch=ERR:EINVAL
    type1.vaddr.update_iova_mismatch=ERR:EINVAL
    type1.vaddr.update_with_rw=ERR:EINVAL
    type1.vaddr.map_over_invalid=ERR:EEXIST
    type1.vaddr.dma_avail_invalid=65534
    type1.vaddr.update=0
    type1.vaddr.unmap=0
    type1.vaddr.unmap.size=0x4000
    type1.vaddr.map2=0
    type1.vaddr.invalidate_all=0
    type1.vaddr.invalidate_all.size=0x4000
    type1.vaddr.update2=0
    type1.vaddr.unmap_all=0
    type1.vaddr.unmap_all.size=0x4000
    type1.dirty.map=0
    type1.dirty.argsz_short=ERR:EINVAL
    type1.dirty.flags0=ERR:EINVAL
    type1.dirty.start_stop=ERR:EINVAL
    type1.dirty.unknown_flag=ERR:EINVAL
    type1.dirty.get_not_started=ERR:EINVAL
    type1.dirty.start=0
    type1.dirty.start_again=0
    type1.dirty.get=0
    type1.dirty.get.bitmap=0xf
    type1.dirty.get_again=0
    type1.dirty.get_again.bitmap=0xf
    type1.dirty.get_argsz_no_data=ERR:EINVAL
    type1.dirty.get_bad_pgsize=ERR:EINVAL
    type1.dirty.get_bitmap_small=ERR:EINVAL
    type1.dirty.get_unaligned_iova=ERR:EINVAL
    type1.dirty.get_size0=ERR:EINVAL
    type1.dirty.get_partial=ERR:EINVAL
    type1.dirty.get_unmapped_range=0
    type1.dirty.get_unmapped_range.bitmap=0x0
    type1.dirty.get_straddle=ERR:EINVAL
    type1.dirty.get_start=ERR:EINVAL
    type1.dirty.unmap_with_bitmap=0
    type1.dirty.unmap_with_bitmap.size=0x4000
    type1.dirty.unmap_with_bitmap.bitmap=0xf
    type1.dirty.stop=0
    type1.dirty.stop_again=0
    type1.dirty.unmap_all=0
    type1.dirty.unmap_all.size=0x0
""".split())

def errno_text(e):
    import errno as errno_mod
    return "ERR:" + errno_mod.errorcode[e.errno]


class Run:
    def __init__(self):
        self.topo = Topology(drivers=[])
        register_default_drivers(self.topo.vfio)
        self.topo.add("0000:00:02.0", 2)
        self.p = LocalProcess(self.topo.dispatcher)
        self.mem = self.p.memory.alloc(64 * PAGE)
        self.out = {}

    def put(self, name, value):
        self.out[name] = value

    def rc(self, name, fn, *args):
        try:
            r = fn(*args)
        except OSError as e:
            self.put(name, errno_text(e))
            return None
        self.put(name, str(r))
        return r

    def ioctl(self, name, fd, cmd, arg=0):
        return self.rc(name, self.p.ioctl, fd, cmd, arg)

    # type1 tools
    def map(self, name, argsz, flags, vaddr, iova, size):
        buf = struct.pack("<IIQQQ", argsz, flags, vaddr, iova, size) + bytes(max(0, argsz - 32))
        self.ioctl(name, self.c, VFIO_IOMMU_MAP_DMA, bytearray(buf))

    def unmap(self, name, argsz, flags, iova, size, bitmap=None):
        buf = bytearray(struct.pack("<IIQQ", argsz, flags, iova, size) + (bitmap or b""))
        if self.ioctl(name, self.c, VFIO_IOMMU_UNMAP_DMA, buf) is not None:
            self.put(name + ".size", hex(struct.unpack_from("<Q", buf, 16)[0]))

    def info(self, size):
        buf = bytearray(size)
        struct.pack_into("<I", buf, 0, size)
        self.p.ioctl(self.c, VFIO_IOMMU_GET_INFO, buf)
        return buf

    def dma_avail(self, name):
        buf = self.info(4096)
        flags, cap_offset = struct.unpack_from("<I", buf, 4)[0], struct.unpack_from("<I", buf, 16)[0]
        caps = parse_caps(bytes(buf), cap_offset if flags & VFIO_IOMMU_INFO_CAPS else 0)
        avail = [struct.unpack_from("<I", c.body)[0] for c in caps if c.id == VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL]
        self.put(name, str(avail[0]) if avail else "absent")

    def hole_page(self):
        addr = self.p.memory.alloc(PAGE)
        self.p.memory.free(addr)
        return addr

    # the program's sections
    def check_extensions(self, when):
        for ext in list(range(12)) + [0x7fffffff]:
            label = "0x7fffffff" if ext == 0x7fffffff else str(ext)
            self.ioctl(f"container.check_extension.{when}.{label}", self.c, VFIO_CHECK_EXTENSION, ext)

    def container(self):
        self.c = self.p.open("/dev/vfio/vfio")
        self.check_extensions("pre")
        self.ioctl("container.set_iommu.no_group", self.c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)
        self.g = self.p.open("/dev/vfio/2")
        self.p.ioctl(self.g, VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(self.c))
        self.ioctl("container.set_iommu.bad_type", self.c, VFIO_SET_IOMMU, 0x7fff)
        self.ioctl("container.set_iommu.spapr", self.c, VFIO_SET_IOMMU, VFIO_SPAPR_TCE_IOMMU)
        self.ioctl("container.set_iommu.type1v2", self.c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)
        self.ioctl("container.set_iommu.again", self.c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)
        self.ioctl("container.set_iommu.again_type1", self.c, VFIO_SET_IOMMU, VFIO_TYPE1_IOMMU)
        self.check_extensions("post")

    def get_info(self):
        self.ioctl("type1.get_info.argsz8", self.c, VFIO_IOMMU_GET_INFO, bytearray(struct.pack("<I", 8) + bytes(20)))
        buf = bytearray(b"\xa5" * 24)
        struct.pack_into("<I", buf, 0, 16)
        if self.ioctl("type1.get_info.argsz16", self.c, VFIO_IOMMU_GET_INFO, buf) is not None:
            argsz, flags, pgsizes, cap_offset = struct.unpack_from("<IIQI", buf)
            self.put("type1.get_info.argsz16.argsz", hex(argsz))
            self.put("type1.get_info.argsz16.flags", hex(flags))
            self.put("type1.get_info.argsz16.pgsizes", hex(pgsizes))
            self.put("type1.get_info.argsz16.cap_offset_untouched", hex(int(cap_offset == 0xa5a5a5a5)))
        buf = bytearray(b"\xa5" * 24)
        struct.pack_into("<I", buf, 0, 24)
        if self.ioctl("type1.get_info.sizeof", self.c, VFIO_IOMMU_GET_INFO, buf) is not None:
            argsz, flags, pgsizes, cap_offset = struct.unpack_from("<IIQI", buf)
            for key, value in (("argsz", argsz), ("flags", flags), ("pgsizes", pgsizes), ("cap_offset", cap_offset)):
                self.put(f"type1.get_info.sizeof.{key}", hex(value))
        buf = self.info(4096)
        self.put("type1.get_info.full", "0")
        argsz, flags, pgsizes, cap_offset = struct.unpack_from("<IIQI", buf)
        for key, value in (("argsz", argsz), ("flags", flags), ("pgsizes", pgsizes), ("cap_offset", cap_offset)):
            self.put(f"type1.get_info.full.{key}", hex(value))
        caps = parse_caps(bytes(buf), cap_offset)
        for n, cap in enumerate(caps):
            pre = f"type1.cap.{n}"
            self.put(pre + ".offset", hex(cap.offset))
            self.put(pre + ".id", str(cap.id))
            self.put(pre + ".version", str(cap.version))
            if cap.id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
                nr = struct.unpack_from("<I", cap.body)[0]
                self.put(pre + ".nr_iovas", str(nr))
                for i in range(nr):
                    start, end = struct.unpack_from("<QQ", cap.body, 8 + 16 * i)
                    self.put(f"{pre}.iova.{i}.start", hex(start))
                    self.put(f"{pre}.iova.{i}.end", hex(end))
            elif cap.id == VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION:
                flags, pgsize, maxsz = struct.unpack_from("<I4xQQ", cap.body)
                self.put(pre + ".flags", hex(flags))
                self.put(pre + ".pgsize_bitmap", hex(pgsize))
                self.put(pre + ".max_dirty_bitmap_size", hex(maxsz))
            elif cap.id == VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL:
                self.put(pre + ".avail", str(struct.unpack_from("<I", cap.body)[0]))
        self.put("type1.cap.count", str(len(caps)))

    def type1_map(self):
        m, sz = self.mem, 32
        self.dma_avail("type1.dma_avail.initial")
        self.map("type1.map.ok", sz, RW, m, IOVA_A, 4 * PAGE)
        self.dma_avail("type1.dma_avail.after_map1")
        self.map("type1.map.overlap_exact", sz, RW, m, IOVA_A, 4 * PAGE)
        self.map("type1.map.overlap_head", sz, RW, m + 8 * PAGE, IOVA_A - PAGE, 2 * PAGE)
        self.map("type1.map.overlap_tail", sz, RW, m + 8 * PAGE, IOVA_A + 3 * PAGE, 2 * PAGE)
        self.map("type1.map.overlap_inside", sz, RW, m + 8 * PAGE, IOVA_A + PAGE, PAGE)
        self.map("type1.map.overlap_around", sz, RW, m + 8 * PAGE, IOVA_A - PAGE, 6 * PAGE)
        self.map("type1.map.unaligned_iova", sz, RW, m + 8 * PAGE, IOVA_FREE + 0x800, PAGE)
        self.map("type1.map.unaligned_size", sz, RW, m + 8 * PAGE, IOVA_FREE, 0x800)
        self.map("type1.map.unaligned_vaddr", sz, RW, m + 8 * PAGE + 0x800, IOVA_FREE, PAGE)
        self.map("type1.map.size0", sz, RW, m + 8 * PAGE, IOVA_FREE, 0)
        self.map("type1.map.no_rw_flags", sz, 0, m + 8 * PAGE, IOVA_FREE, PAGE)
        self.map("type1.map.unknown_flag", sz, RW | (1 << 3), m + 8 * PAGE, IOVA_FREE, PAGE)
        self.map("type1.map.argsz_short", sz - 8, RW, m + 8 * PAGE, IOVA_FREE, PAGE)
        self.map("type1.map.argsz_large", sz + 64, RW, m + 8 * PAGE, IOVA_FREE, PAGE)
        self.unmap("type1.map.argsz_large.unmap", 24, 0, IOVA_FREE, PAGE)
        self.map("type1.map.iova_wrap", sz, RW, m + 8 * PAGE, 0xfffffffffffff000, 2 * PAGE)
        self.map("type1.map.vaddr_wrap", sz, RW, 0xfffffffffffff000, IOVA_FREE, 2 * PAGE)
        self.map("type1.map.iova_msi_window", sz, RW, m + 8 * PAGE, 0xfee00000, PAGE)
        self.map("type1.map.iova_2p39", sz, RW, m + 8 * PAGE, 1 << 39, PAGE)
        self.map("type1.map.iova_2p48", sz, RW, m + 8 * PAGE, 1 << 48, PAGE)
        self.map("type1.map.unmapped_vaddr", sz, RW, self.hole_page(), IOVA_FREE, PAGE)
        ro = self.p.memory.alloc(PAGE, writable=False)
        self.map("type1.map.readonly_vaddr.rw", sz, RW, ro, IOVA_FREE, PAGE)
        self.map("type1.map.readonly_vaddr.read", sz, VFIO_DMA_MAP_FLAG_READ, ro, IOVA_FREE + PAGE, PAGE)
        self.unmap("type1.map.readonly_vaddr.unmap", 24, 0, IOVA_FREE, 2 * PAGE)
        self.p.memory.free(ro)
        self.map("type1.map.write_only", sz, VFIO_DMA_MAP_FLAG_WRITE, m + 8 * PAGE, IOVA_FREE, PAGE)
        self.dma_avail("type1.dma_avail.after_write_only")
        self.unmap("type1.map.write_only.unmap", 24, 0, IOVA_FREE, PAGE)
        self.dma_avail("type1.dma_avail.after_unmap_write_only")

    def type1_unmap(self):
        m, msz, usz = self.mem, 32, 24
        self.map("type1.map.b", msz, RW, m + 4 * PAGE, IOVA_B, 4 * PAGE)
        self.dma_avail("type1.dma_avail.after_map2")
        self.unmap("type1.unmap.straddle_start", usz, 0, IOVA_B - PAGE, 2 * PAGE)
        self.unmap("type1.unmap.straddle_end", usz, 0, IOVA_B + 3 * PAGE, 2 * PAGE)
        self.unmap("type1.unmap.first_page", usz, 0, IOVA_B, PAGE)
        self.unmap("type1.unmap.unaligned_iova", usz, 0, IOVA_B + 0x800, PAGE)
        self.unmap("type1.unmap.unaligned_size", usz, 0, IOVA_B, 0x800)
        self.unmap("type1.unmap.size0", usz, 0, IOVA_B, 0)
        self.unmap("type1.unmap.argsz_short", usz - 8, 0, IOVA_B, 4 * PAGE)
        self.unmap("type1.unmap.unknown_flag", usz, 1 << 3, IOVA_B, 4 * PAGE)
        self.unmap("type1.unmap.wrap", usz, 0, 0xfffffffffffff000, 2 * PAGE)
        self.unmap("type1.unmap.dirty_bitmap_not_tracking", usz, VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
                   IOVA_B, 4 * PAGE)
        self.unmap("type1.unmap.empty", usz, 0, IOVA_FREE, PAGE)
        self.unmap("type1.unmap.exact", usz, 0, IOVA_B, 4 * PAGE)
        self.dma_avail("type1.dma_avail.after_unmap")
        self.map("type1.map.c1", msz, RW, m + 4 * PAGE, IOVA_B, PAGE)
        self.map("type1.map.c2", msz, RW, m + 6 * PAGE, IOVA_B + 2 * PAGE, 2 * PAGE)
        self.dma_avail("type1.dma_avail.after_c1_c2")
        self.unmap("type1.unmap.covering_two", usz, 0, IOVA_B, 4 * PAGE)
        self.map("type1.map.d", msz, RW, m + 4 * PAGE, IOVA_B, 2 * PAGE)
        self.unmap("type1.unmap_all.iova_nonzero", usz, VFIO_DMA_UNMAP_FLAG_ALL, PAGE, 0)
        self.unmap("type1.unmap_all.size_nonzero", usz, VFIO_DMA_UNMAP_FLAG_ALL, 0, PAGE)
        self.unmap("type1.unmap_all.with_dirty_bitmap", usz,
                   VFIO_DMA_UNMAP_FLAG_ALL | VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, 0, 0)
        self.unmap("type1.unmap_all", usz, VFIO_DMA_UNMAP_FLAG_ALL, 0, 0)
        self.dma_avail("type1.dma_avail.after_unmap_all")
        self.unmap("type1.unmap_all.empty", usz, VFIO_DMA_UNMAP_FLAG_ALL, 0, 0)

    def type1_vaddr(self):
        msz, usz, v = 32, 24, self.mem + 16 * PAGE
        V, VA, ALL = VFIO_DMA_MAP_FLAG_VADDR, VFIO_DMA_UNMAP_FLAG_VADDR, VFIO_DMA_UNMAP_FLAG_ALL
        self.map("type1.vaddr.map", msz, RW, v, IOVA_VADDR, 4 * PAGE)
        self.map("type1.vaddr.update_valid", msz, V, v, IOVA_VADDR, 4 * PAGE)
        self.unmap("type1.vaddr.invalidate_partial", usz, VA, IOVA_VADDR, PAGE)
        self.unmap("type1.vaddr.invalidate", usz, VA, IOVA_VADDR, 4 * PAGE)
        self.unmap("type1.vaddr.invalidate_again", usz, VA, IOVA_VADDR, 4 * PAGE)
        self.unmap("type1.vaddr.invalidate_with_dirty", usz, VA | VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
                   IOVA_VADDR, 4 * PAGE)
        self.map("type1.vaddr.update_size_mismatch", msz, V, v, IOVA_VADDR, 2 * PAGE)
        self.map("type1.vaddr.update_iova_mismatch", msz, V, v, IOVA_VADDR + PAGE, 3 * PAGE)
        self.map("type1.vaddr.update_with_rw", msz, V | RW, v, IOVA_VADDR, 4 * PAGE)
        self.map("type1.vaddr.map_over_invalid", msz, RW, v, IOVA_VADDR, 4 * PAGE)
        self.dma_avail("type1.vaddr.dma_avail_invalid")
        self.map("type1.vaddr.update", msz, V, v, IOVA_VADDR, 4 * PAGE)
        self.unmap("type1.vaddr.unmap", usz, 0, IOVA_VADDR, 4 * PAGE)
        self.map("type1.vaddr.map2", msz, RW, v, IOVA_VADDR, 4 * PAGE)
        self.unmap("type1.vaddr.invalidate_all", usz, VA | ALL, 0, 0)
        self.map("type1.vaddr.update2", msz, V, v, IOVA_VADDR, 4 * PAGE)
        self.unmap("type1.vaddr.unmap_all", usz, ALL, 0, 0)

    def dirty_get(self, name, argsz, iova, size, pgsize, bmsize):
        bits = self.p.memory.alloc(32)
        buf = bytearray(struct.pack("<IIQQQQQ", argsz, VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP, iova, size,
                                    pgsize, bmsize, bits))
        if self.ioctl(name, self.c, VFIO_IOMMU_DIRTY_PAGES, buf) is not None:
            self.put(name + ".bitmap", hex(struct.unpack("<Q", self.p.memory.read(bits, 8))[0]))
        self.p.memory.free(bits)

    def dirty_flags(self, name, argsz, flags):
        self.ioctl(name, self.c, VFIO_IOMMU_DIRTY_PAGES, bytearray(struct.pack("<II", argsz, flags)))

    def type1_dirty(self):
        dsz, gsz = 8, 48
        START, STOP, GET = (VFIO_IOMMU_DIRTY_PAGES_FLAG_START, VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP,
                            VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP)
        self.map("type1.dirty.map", 32, RW, self.mem + 24 * PAGE, IOVA_DIRTY, 4 * PAGE)
        self.dirty_flags("type1.dirty.argsz_short", 4, START)
        self.dirty_flags("type1.dirty.flags0", dsz, 0)
        self.dirty_flags("type1.dirty.start_stop", dsz, START | STOP)
        self.dirty_flags("type1.dirty.unknown_flag", dsz, 1 << 3)
        self.dirty_get("type1.dirty.get_not_started", gsz, IOVA_DIRTY, 4 * PAGE, PAGE, 8)
        self.dirty_flags("type1.dirty.start", dsz, START)
        self.dirty_flags("type1.dirty.start_again", dsz, START)
        self.dirty_get("type1.dirty.get", gsz, IOVA_DIRTY, 4 * PAGE, PAGE, 8)
        self.dirty_get("type1.dirty.get_again", gsz, IOVA_DIRTY, 4 * PAGE, PAGE, 8)
        self.dirty_get("type1.dirty.get_argsz_no_data", dsz, IOVA_DIRTY, 4 * PAGE, PAGE, 8)
        self.dirty_get("type1.dirty.get_bad_pgsize", gsz, IOVA_DIRTY, 4 * PAGE, 2 * PAGE, 8)
        self.dirty_get("type1.dirty.get_bitmap_small", gsz, IOVA_DIRTY, 4 * PAGE, PAGE, 0)
        self.dirty_get("type1.dirty.get_unaligned_iova", gsz, IOVA_DIRTY + 0x800, 4 * PAGE, PAGE, 8)
        self.dirty_get("type1.dirty.get_size0", gsz, IOVA_DIRTY, 0, PAGE, 8)
        self.dirty_get("type1.dirty.get_partial", gsz, IOVA_DIRTY + PAGE, 2 * PAGE, PAGE, 8)
        self.dirty_get("type1.dirty.get_unmapped_range", gsz, IOVA_FREE, 4 * PAGE, PAGE, 8)
        self.dirty_get("type1.dirty.get_straddle", gsz, IOVA_DIRTY - PAGE, 4 * PAGE, PAGE, 8)
        self.dirty_flags("type1.dirty.get_start", dsz, GET | START)
        bits = self.p.memory.alloc(32)
        bitmap = struct.pack("<QQQ", PAGE, 8, bits)
        self.unmap("type1.dirty.unmap_with_bitmap", 48, VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, IOVA_DIRTY,
                   4 * PAGE, bitmap)
        if "type1.dirty.unmap_with_bitmap.size" in self.out:
            self.put("type1.dirty.unmap_with_bitmap.bitmap", hex(struct.unpack("<Q", self.p.memory.read(bits, 8))[0]))
        self.dirty_flags("type1.dirty.stop", dsz, STOP)
        self.dirty_flags("type1.dirty.stop_again", dsz, STOP)
        self.unmap("type1.dirty.unmap_all", 24, VFIO_DMA_UNMAP_FLAG_ALL, 0, 0)


@pytest.fixture(scope="module")
def observed():
    run = Run()
    run.container()
    run.get_info()
    run.type1_map()
    run.type1_unmap()
    run.type1_vaddr()
    run.type1_dirty()
    return run.out


def test_every_observation_of_the_real_kernel_was_made(observed):
    assert sorted(set(REAL_6_1) - set(observed)) == []
    assert sorted(set(observed) - set(REAL_6_1)) == []


@pytest.mark.parametrize("name", sorted(REAL_6_1))
def test_same_as_real_6_1(observed, name):
    assert observed.get(name) == REAL_6_1[name]
