"""type1 container ioctls against Linux 6.1.y vfio_iommu_type1.c: extensions, GET_INFO, MAP_DMA, UNMAP_DMA."""

import ctypes
import errno
import struct

import pytest

from core_fakes import Topology
from cuse_vfio.errors import VfioError
from cuse_vfio.iommu import DIRTY_BITMAP_SIZE_MAX, Type1Driver
from cuse_vfio.uapi import (
    VFIO_CHECK_EXTENSION,
    VFIO_DMA_CC_IOMMU,
    VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_VADDR,
    VFIO_DMA_MAP_FLAG_WRITE,
    VFIO_DMA_UNMAP_FLAG_ALL,
    VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
    VFIO_DMA_UNMAP_FLAG_VADDR,
    VFIO_EEH,
    VFIO_GROUP_SET_CONTAINER,
    VFIO_IOMMU_ENABLE,
    VFIO_IOMMU_GET_INFO,
    VFIO_IOMMU_INFO_CAPS,
    VFIO_IOMMU_INFO_PGSIZES,
    VFIO_IOMMU_MAP_DMA,
    VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION,
    VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL,
    VFIO_IOMMU_UNMAP_DMA,
    VFIO_NOIOMMU_IOMMU,
    VFIO_SET_IOMMU,
    VFIO_SPAPR_TCE_IOMMU,
    VFIO_TYPE1_IOMMU,
    VFIO_TYPE1_NESTING_IOMMU,
    VFIO_TYPE1v2_IOMMU,
    VFIO_UNMAP_ALL,
    VFIO_UPDATE_VADDR,
    parse_caps,
    vfio_iommu_type1_dma_map,
    vfio_iommu_type1_dma_unmap,
    vfio_iommu_type1_info,
    vfio_iommu_type1_info_cap_migration,
)
from test_iommu_common import PAGE, RW, Client, errname, fails

R, W, VADDR = VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_DMA_MAP_FLAG_VADDR
MSI_LOW, MSI_HIGH = 0xFEE00000, 0xFEEFFFFF
APERTURE_END = (1 << 39) - 1


@pytest.fixture
def c():
    return Client()


@pytest.fixture
def v1():
    return Client(iommu_type=VFIO_TYPE1_IOMMU)


# -- extensions and SET_IOMMU ---------------------------------------------------------
def test_check_extension_without_container_follows_the_driver_ops_with_null_iommu():
    d = Type1Driver()
    assert [d.check_extension(e) for e in (VFIO_TYPE1_IOMMU, VFIO_TYPE1v2_IOMMU, VFIO_TYPE1_NESTING_IOMMU,
                                           VFIO_UNMAP_ALL)] == [1, 1, 1, 1]
    # iommu == NULL: no domain to ask about coherency, and (6.1.16+) vaddr updates depend on the groups
    assert d.check_extension(VFIO_DMA_CC_IOMMU) == 0
    assert d.check_extension(VFIO_UPDATE_VADDR) == 0
    assert [d.check_extension(e) for e in (VFIO_SPAPR_TCE_IOMMU, VFIO_EEH, VFIO_NOIOMMU_IOMMU, 99)] == [0, 0, 0, 0]


def test_check_extension_through_the_container_before_and_after_set_iommu():
    c = Client(set_iommu=False)
    assert c.p.ioctl(c.cfd, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) == 1
    assert c.p.ioctl(c.cfd, VFIO_CHECK_EXTENSION, VFIO_UPDATE_VADDR) == 0
    c.p.ioctl(c.cfd, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)
    assert c.p.ioctl(c.cfd, VFIO_CHECK_EXTENSION, VFIO_UPDATE_VADDR) == 1
    assert c.p.ioctl(c.cfd, VFIO_CHECK_EXTENSION, VFIO_UNMAP_ALL) == 1
    # QEMU's VT-d has no snoop control: the domain cannot enforce coherency
    assert c.p.ioctl(c.cfd, VFIO_CHECK_EXTENSION, VFIO_DMA_CC_IOMMU) == 0
    assert c.p.ioctl(c.cfd, VFIO_CHECK_EXTENSION, VFIO_NOIOMMU_IOMMU) == 0


def test_dma_cc_iommu_with_a_coherent_domain():
    c = Client(driver=Type1Driver(enforce_cache_coherency=True))
    assert c.p.ioctl(c.cfd, VFIO_CHECK_EXTENSION, VFIO_DMA_CC_IOMMU) == 1


def test_open_rejects_other_types_with_einval():
    with pytest.raises(VfioError) as e:
        Type1Driver().open(VFIO_SPAPR_TCE_IOMMU)
    assert errname(e) == "EINVAL"


def test_open_v1_v2():
    d = Type1Driver()
    assert d.open(VFIO_TYPE1_IOMMU).v2 is False
    assert d.open(VFIO_TYPE1v2_IOMMU).v2 is True


def test_nesting_container_fails_to_attach_with_enodev_on_vtd_without_nesting():
    c = Client(set_iommu=False)
    fails("ENODEV", c.p.ioctl, c.cfd, VFIO_SET_IOMMU, VFIO_TYPE1_NESTING_IOMMU)
    # the container is still usable with a real type
    c.p.ioctl(c.cfd, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)


def test_nesting_container_attaches_when_the_iommu_can_nest():
    c = Client(iommu_type=VFIO_TYPE1_NESTING_IOMMU, driver=Type1Driver(nesting=True))
    assert c.iommu.v2 and c.iommu.nesting


def test_unknown_container_ioctl_is_enotty(c):
    fails("ENOTTY", c.p.ioctl, c.cfd, VFIO_IOMMU_ENABLE)


def test_attach_same_group_twice_is_einval(c):
    group = c.topo.groups[2]
    with pytest.raises(VfioError) as e:
        c.iommu.attach_group(group)
    assert errname(e) == "EINVAL"


def test_second_group_joins_a_set_container():
    t = Topology(drivers=[Type1Driver()])
    t.add("0000:00:02.0", 2)
    t.add("0000:00:03.0", 3)
    c = Client(topo=t, groups=(2, 3))
    assert [g.id for g in c.iommu.groups] == [2, 3]


# -- GET_INFO ------------------------------------------------------------------------------
def get_info(c, argsz, size=None):
    buf = bytearray(size if size is not None else max(argsz, 24))
    buf[0:4] = struct.pack("<I", argsz)
    buf[16:24] = b"\xaa" * 8  # cap_offset and padding: garbage in
    c.p.ioctl(c.cfd, VFIO_IOMMU_GET_INFO, buf)
    return vfio_iommu_type1_info.from_buffer_copy(bytes(buf[:24])), bytes(buf)


def test_get_info_argsz_below_minsz_is_einval(c):
    fails("EINVAL", get_info, c, 15, size=24)


def test_get_info_minimal_argsz_gets_pgsizes_and_the_needed_size(c):
    info, raw = get_info(c, 16)
    assert info.flags == VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS
    assert info.iova_pgsizes == 0x40201000  # 4K | 2M | 1G, as intel-iommu reports under QEMU
    # 6.1 copies back only offsetofend(iova_pgsizes) when argsz < offsetofend(cap_offset)
    assert raw[16:20] == b"\xaa" * 4
    # info, migration 32, DMA avail 12 (6.1 does not pad it), IOVA ranges 16 + 2 * 16
    assert info.argsz == 24 + 32 + 12 + 16 + 2 * 16 == 0x74


def test_get_info_too_small_for_caps_succeeds_with_caps_flag_and_cap_offset_zero(c):
    info, raw = get_info(c, 24)
    assert info.flags & VFIO_IOMMU_INFO_CAPS
    assert info.cap_offset == 0
    needed = info.argsz
    assert needed > 24
    info, raw = get_info(c, needed)
    assert info.cap_offset == 24
    caps = parse_caps(raw, info.cap_offset)
    # the kernel's order: migration, DMA avail, IOVA ranges
    assert [cap.id for cap in caps] == [VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL,
                                        VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE]
    assert all(cap.version == 1 for cap in caps)
    mig = vfio_iommu_type1_info_cap_migration.from_buffer_copy(raw, caps[0].offset)
    assert (mig.flags, mig.pgsize_bitmap, mig.max_dirty_bitmap_size) == (0, PAGE, DIRTY_BITMAP_SIZE_MAX)
    assert DIRTY_BITMAP_SIZE_MAX == 1 << 28
    assert struct.unpack_from("<I", caps[1].body) == (65535,)
    nr, _ = struct.unpack_from("<II", caps[2].body)
    ranges = [struct.unpack_from("<QQ", caps[2].body, 8 + 16 * i) for i in range(nr)]
    assert ranges == [(0, MSI_LOW - 1), (MSI_HIGH + 1, APERTURE_END)]


def test_get_info_dma_avail_counts_down(c):
    c.map(0x100000, PAGE)
    c.map(0x200000, PAGE)
    info, raw = get_info(c, 200)
    caps = parse_caps(raw, info.cap_offset)
    assert struct.unpack_from("<I", caps[1].body) == (65533,)


def test_get_info_configurable_iommu():
    c = Client(driver=Type1Driver(pgsize_bitmap=0xFFFFFFFFFFFFF000, aperture=(0, (1 << 48) - 1),
                                  reserved_regions=[(MSI_LOW, MSI_HIGH), (0, 0xFFF)], dma_entry_limit=7))
    info, raw = get_info(c, 300)
    assert info.iova_pgsizes == 0xFFFFFFFFFFFFF000
    caps = parse_caps(raw, info.cap_offset)
    assert struct.unpack_from("<I", caps[1].body) == (7,)
    nr, _ = struct.unpack_from("<II", caps[2].body)
    assert [struct.unpack_from("<QQ", caps[2].body, 8 + 16 * i) for i in range(nr)] == \
        [(0x1000, MSI_LOW - 1), (MSI_HIGH + 1, (1 << 48) - 1)]


def test_get_info_efault_when_the_struct_is_not_there(c):
    from cuse_vfio.uapi import VFIO_IOMMU_GET_INFO as cmd
    arg = c.topo.dispatcher.make_arg(0x1000, c.p)  # unmapped address in the client
    assert c.topo.dispatcher.ioctl(c.container, cmd, arg) == -errno.EFAULT


# -- MAP_DMA -------------------------------------------------------------------------------
def test_map_dma_records_owner_and_vaddr(c):
    vaddr = c.map(0x100000, 2 * PAGE)
    (dma,) = c.iommu.mappings()
    assert (dma.iova, dma.size, dma.vaddr, dma.prot, dma.owner) == (0x100000, 2 * PAGE, vaddr, RW, c.p)


def test_map_dma_argsz_below_minsz_is_einval(c):
    fails("EINVAL", c.map, 0x100000, PAGE, argsz=31)


def test_map_dma_unknown_flag_is_einval(c):
    fails("EINVAL", c.map, 0x100000, PAGE, flags=RW | 8)


def test_map_dma_without_read_or_write_is_einval(c):
    fails("EINVAL", c.map, 0x100000, PAGE, flags=0)


def test_map_dma_vaddr_with_read_or_write_is_einval(c):
    fails("EINVAL", c.map, 0x100000, PAGE, flags=VADDR | R)


@pytest.mark.parametrize("iova,size,vaddr_off", [
    (0x100000, 0, 0),             # size 0
    (0x100800, PAGE, 0),          # iova misaligned
    (0x100000, PAGE + 1, 0),      # size misaligned
    (0x100000, PAGE, 0x10),       # vaddr misaligned
])
def test_map_dma_size_zero_and_alignment_are_einval(c, iova, size, vaddr_off):
    vaddr = c.buffer(2 * PAGE) + vaddr_off
    fails("EINVAL", c.map, iova, size, vaddr=vaddr)
    assert c.iommu.mappings() == []


def test_map_dma_iova_wrap_is_einval(c):
    fails("EINVAL", c.map, (1 << 64) - PAGE, 2 * PAGE, vaddr=c.buffer(2 * PAGE))


def test_map_dma_vaddr_wrap_is_einval(c):
    fails("EINVAL", c.map, 0x100000, 2 * PAGE, vaddr=(1 << 64) - PAGE)


def test_map_dma_overlap_is_eexist(c):
    c.map(0x100000, 4 * PAGE)
    for iova, size in ((0x100000, PAGE), (0x0FF000, 2 * PAGE), (0x103000, 2 * PAGE), (0x0F0000, 0x20000)):
        fails("EEXIST", c.map, iova, size)
    c.map(0x104000, PAGE)  # adjacent is fine
    c.map(0x0FF000, PAGE)


def test_map_dma_outside_iova_ranges_is_einval(c):
    fails("EINVAL", c.map, MSI_LOW, PAGE)                    # the MSI window is reserved
    fails("EINVAL", c.map, MSI_LOW - PAGE, 2 * PAGE)         # straddles into it
    fails("EINVAL", c.map, APERTURE_END + 1, PAGE)           # beyond aw-bits=39
    c.map(MSI_LOW - PAGE, PAGE)
    c.map(MSI_HIGH + 1, PAGE)
    c.map(APERTURE_END + 1 - PAGE, PAGE)


def test_map_dma_unmapped_vaddr_is_efault(c):
    fails("EFAULT", c.map, 0x100000, PAGE, vaddr=0x10000)
    # the last page is checked too: a buffer one page too short
    vaddr = c.buffer(PAGE)
    fails("EFAULT", c.map, 0x100000, 2 * PAGE, vaddr=vaddr)
    assert c.iommu.mappings() == [] and c.iommu.dma_avail == 65535


def test_map_dma_enospc_when_dma_entry_limit_is_reached():
    c = Client(driver=Type1Driver(dma_entry_limit=3))
    vaddr = c.buffer(PAGE)
    for i in range(3):
        c.map(0x100000 + i * PAGE, PAGE, vaddr=vaddr)
    fails("ENOSPC", c.map, 0x200000, PAGE, vaddr=vaddr)
    c.unmap(0x100000, PAGE)
    c.map(0x200000, PAGE, vaddr=vaddr)
    # EEXIST is checked before ENOSPC, as in vfio_dma_do_map
    fails("EEXIST", c.map, 0x200000, PAGE, vaddr=vaddr)


# -- UNMAP_DMA -----------------------------------------------------------------------------
def test_unmap_returns_the_size_unmapped(c):
    c.map(0x100000, 2 * PAGE)
    c.map(0x102000, PAGE)
    assert c.unmap(0x100000, 3 * PAGE) == 3 * PAGE
    assert c.iommu.mappings() == []
    assert c.iommu.dma_avail == 65535


def test_unmap_argsz_and_flags(c):
    u = vfio_iommu_type1_dma_unmap(argsz=23, iova=0, size=PAGE)
    fails("EINVAL", c.p.ioctl, c.cfd, VFIO_IOMMU_UNMAP_DMA, u)
    fails("EINVAL", c.unmap, 0x100000, PAGE, flags=8)
    fails("EINVAL", c.unmap, 0x100000, PAGE, flags=VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP | VFIO_DMA_UNMAP_FLAG_ALL)
    fails("EINVAL", c.unmap, 0x100000, PAGE, flags=VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP | VFIO_DMA_UNMAP_FLAG_VADDR)


def test_unmap_alignment_and_size_rules(c):
    c.map(0x100000, PAGE)
    fails("EINVAL", c.unmap, 0x100800, PAGE)
    fails("EINVAL", c.unmap, 0x100000, 0)
    fails("EINVAL", c.unmap, 0x100000, PAGE + 1)
    fails("EINVAL", c.unmap, (1 << 64) - PAGE, 2 * PAGE)  # wraps
    assert len(c.iommu.mappings()) == 1


def test_unmap_empty_range_succeeds_with_size_zero(c):
    c.map(0x100000, PAGE)
    assert c.unmap(0x200000, 0x10000) == 0
    assert len(c.iommu.mappings()) == 1


def test_v2_unmap_cutting_a_mapping_is_einval(c):
    c.map(0x100000, 4 * PAGE)
    fails("EINVAL", c.unmap, 0x101000, PAGE)           # inside
    fails("EINVAL", c.unmap, 0x100000, PAGE)           # cuts the end
    fails("EINVAL", c.unmap, 0x0FF000, 2 * PAGE)       # cuts the start
    fails("EINVAL", c.unmap, 0x103000, 2 * PAGE)       # starts inside
    assert c.unmap(0x0F0000, 0x20000) == 4 * PAGE     # covering it whole is fine


def test_v2_unmap_covering_several_mappings_with_holes(c):
    c.map(0x100000, PAGE)
    c.map(0x103000, 2 * PAGE)
    c.map(0x200000, PAGE)
    assert c.unmap(0x100000, 0x5000) == 3 * PAGE
    assert [d.iova for d in c.iommu.mappings()] == [0x200000]


def test_v1_unmap_inside_a_mapping_succeeds_with_size_zero(v1):
    v1.map(0x100000, 4 * PAGE)
    assert v1.unmap(0x101000, PAGE) == 0
    assert len(v1.iommu.mappings()) == 1


def test_v1_unmap_covering_the_first_page_unmaps_the_whole_mapping(v1):
    v1.map(0x100000, 4 * PAGE)
    v1.map(0x104000, 4 * PAGE)
    # touches the first page of both: both go, 8 pages for a 1-page-ish request
    assert v1.unmap(0x100000, 0x4001 + PAGE - 1) == 8 * PAGE
    assert v1.iommu.mappings() == []


def test_v1_unmap_starting_before_a_mapping_unmaps_it_entirely(v1):
    v1.map(0x100000, 4 * PAGE)
    assert v1.unmap(0x0FF000, 2 * PAGE) == 4 * PAGE


def test_v1_unmap_starting_inside_stops_even_if_later_mappings_are_covered(v1):
    v1.map(0x100000, 2 * PAGE)
    v1.map(0x102000, PAGE)
    # the loop meets the mapping containing iova first and stops there
    assert v1.unmap(0x101000, 2 * PAGE) == 0
    assert len(v1.iommu.mappings()) == 2


def test_unmap_all(c):
    for i in range(5):
        c.map(0x100000 + 2 * i * PAGE, PAGE)
    assert c.unmap(0, 0, flags=VFIO_DMA_UNMAP_FLAG_ALL) == 5 * PAGE
    assert c.iommu.mappings() == [] and c.iommu.dma_avail == 65535
    fails("EINVAL", c.unmap, 0x100000, 0, flags=VFIO_DMA_UNMAP_FLAG_ALL)
    fails("EINVAL", c.unmap, 0, PAGE, flags=VFIO_DMA_UNMAP_FLAG_ALL)


def test_unmap_all_on_v1(v1):
    v1.map(0x100000, PAGE)
    assert v1.unmap(0, 0, flags=VFIO_DMA_UNMAP_FLAG_ALL) == PAGE


# -- VADDR (live update) -------------------------------------------------------------------------
def test_vaddr_invalidate_and_update(c):
    old = c.map(0x100000, 2 * PAGE)
    c.map(0x200000, PAGE)
    assert c.unmap(0x100000, 2 * PAGE, flags=VFIO_DMA_UNMAP_FLAG_VADDR) == 2 * PAGE
    dma = c.iommu.mappings()[0]
    assert dma.vaddr_invalid and c.iommu.vaddr_invalid_count == 1
    assert c.iommu.dma_avail == 65533  # still mapped
    new = c.buffer(2 * PAGE)
    c.map(0x100000, 2 * PAGE, vaddr=new, flags=VADDR)
    assert (dma.vaddr, dma.vaddr_invalid, dma.prot) == (new, False, RW)
    assert new != old and c.iommu.vaddr_invalid_count == 0


def test_vaddr_update_rules(c):
    c.map(0x100000, 2 * PAGE)
    new = c.buffer(2 * PAGE)
    fails("EINVAL", c.map, 0x100000, 2 * PAGE, vaddr=new, flags=VADDR)   # vaddr still valid
    c.unmap(0x100000, 2 * PAGE, flags=VFIO_DMA_UNMAP_FLAG_VADDR)
    fails("ENOENT", c.map, 0x300000, PAGE, vaddr=new, flags=VADDR)       # nothing there
    fails("EINVAL", c.map, 0x100000, PAGE, vaddr=new, flags=VADDR)       # size differs
    fails("EINVAL", c.map, 0x101000, PAGE, vaddr=new, flags=VADDR)       # iova differs
    fails("EINVAL", c.map, 0x100000, 2 * PAGE, vaddr=new, flags=VADDR | W)
    c.map(0x100000, 2 * PAGE, vaddr=new, flags=VADDR)


def test_vaddr_update_by_another_process_makes_it_the_owner(c):
    c.map(0x100000, PAGE)
    c.unmap(0x100000, PAGE, flags=VFIO_DMA_UNMAP_FLAG_VADDR)
    heir = c.topo.process()  # e.g. the process after exec, which got the container fd
    heir.fds[3] = c.container
    vaddr = heir.memory.alloc(PAGE)
    m = vfio_iommu_type1_dma_map(argsz=32, flags=VADDR, vaddr=vaddr, iova=0x100000, size=PAGE)
    heir.ioctl(3, VFIO_IOMMU_MAP_DMA, m)
    assert c.iommu.mappings()[0].owner is heir


def test_vaddr_invalidate_twice_fails_and_changes_nothing(c):
    c.map(0x100000, PAGE)
    c.map(0x101000, PAGE)
    c.unmap(0x101000, PAGE, flags=VFIO_DMA_UNMAP_FLAG_VADDR)
    fails("EINVAL", c.unmap, 0x100000, 2 * PAGE, flags=VFIO_DMA_UNMAP_FLAG_VADDR)
    assert [d.vaddr_invalid for d in c.iommu.mappings()] == [False, True]
    assert c.iommu.vaddr_invalid_count == 1


def test_vaddr_all_invalidates_everything(c):
    c.map(0x100000, PAGE)
    c.map(0x300000, PAGE)
    assert c.unmap(0, 0, flags=VFIO_DMA_UNMAP_FLAG_VADDR | VFIO_DMA_UNMAP_FLAG_ALL) == 2 * PAGE
    assert all(d.vaddr_invalid for d in c.iommu.mappings())


def test_unmapping_an_invalidated_mapping_drops_the_count(c):
    c.map(0x100000, PAGE)
    c.unmap(0x100000, PAGE, flags=VFIO_DMA_UNMAP_FLAG_VADDR)
    assert c.unmap(0x100000, PAGE) == PAGE
    assert c.iommu.vaddr_invalid_count == 0


def test_attach_while_a_vaddr_is_invalid_is_ebusy():
    t = Topology(drivers=[Type1Driver()])
    t.add("0000:00:02.0", 2)
    t.add("0000:00:03.0", 3)
    c = Client(topo=t, groups=(2,))
    c.map(0x100000, PAGE)
    c.unmap(0x100000, PAGE, flags=VFIO_DMA_UNMAP_FLAG_VADDR)
    g3 = c.p.open("/dev/vfio/3")
    fails("EBUSY", c.p.ioctl, g3, VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c.cfd))


# -- lifecycle -----------------------------------------------------------------------------------
def test_detaching_the_last_group_drops_the_mappings_and_the_iommu(c):
    iommu = c.iommu
    c.map(0x100000, PAGE)
    c.p.close(c.gfds[2])
    assert iommu.released and iommu.mappings() == []
    assert c.container.iommu_data is None


def test_detaching_one_of_two_groups_keeps_the_mappings():
    t = Topology(drivers=[Type1Driver()])
    t.add("0000:00:02.0", 2)
    t.add("0000:00:03.0", 3)
    c = Client(topo=t, groups=(2, 3))
    c.map(0x100000, PAGE)
    c.p.close(c.gfds[3])
    assert [g.id for g in c.iommu.groups] == [2]
    assert len(c.iommu.mappings()) == 1
