"""The DMA space a type1 container gives its devices, the fault log, and dirty page tracking."""

import errno
import struct
import threading

import pytest

from cuse_vfio.core import BusDevice, device_bind
from cuse_vfio.devices.pci import DmaFault
from cuse_vfio.iommu import (
    CLIENT_MEMORY,
    READ_NOT_PERMITTED,
    UNMAPPED,
    VADDR_INVALIDATED,
    WRITE_NOT_PERMITTED,
    FaultLog,
    IommuFault,
    Type1Driver,
)
from cuse_vfio.uapi import (
    VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_VADDR,
    VFIO_DMA_MAP_FLAG_WRITE,
    VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
    VFIO_DMA_UNMAP_FLAG_VADDR,
    VFIO_IOMMU_DIRTY_PAGES,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP,
    VFIO_IOMMU_UNMAP_DMA,
    VFIO_TYPE1_IOMMU,
)
from test_iommu_common import DEV, PAGE, Client, EduTopology, fails

R, W = VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE
PCI_COMMAND, PCI_COMMAND_MASTER = 0x04, 0x04


@pytest.fixture
def c():
    return Client()


def fault_of(fn, *args, **kwargs):
    with pytest.raises(IommuFault) as e:
        fn(*args, **kwargs)
    assert e.value.errno == errno.EFAULT
    return e.value


# -- translation and byte movement --------------------------------------------------------
def test_dma_read_and_write_go_to_the_client_memory_at_vaddr_plus_offset(c):
    vaddr = c.map(0x100000, 2 * PAGE)
    space = c.iommu.dma_space
    space.dma_write(0x100ff0, b"0123456789abcdefXYZ", device=DEV)   # crosses a page, same mapping
    assert c.memory.read(vaddr + 0xff0, 19) == b"0123456789abcdefXYZ"
    c.memory.write(vaddr + 0x1800, b"from the client")
    assert space.dma_read(0x101800, 15) == b"from the client"
    assert space.translate(0x101800, 15) == [(c.memory, vaddr + 0x1800, 15)]


def test_a_transfer_spanning_two_adjacent_mappings(c):
    a = c.map(0x100000, PAGE)
    b = c.map(0x101000, PAGE)          # a different buffer, adjacent in IOVA space
    assert b != a + PAGE
    space = c.iommu.dma_space
    space.dma_write(0x100ffc, b"ABCDEFGH")
    assert c.memory.read(a + 0xffc, 4) == b"ABCD" and c.memory.read(b, 4) == b"EFGH"
    assert space.dma_read(0x100ffe, 4) == b"CDEF"
    assert [(addr, n) for _, addr, n in space.translate(0x100ffc, 8)] == [(a + 0xffc, 4), (b, 4)]


def test_unmapped_iova_faults_and_moves_nothing(c):
    vaddr = c.map(0x100000, PAGE)
    space = c.iommu.dma_space
    f = fault_of(space.dma_write, 0x100ff0, b"x" * 32, device=DEV)   # runs off the end of the mapping
    assert f.reason == UNMAPPED and f.iova == 0x100ff0 and f.size == 32 and f.write
    assert c.memory.read(vaddr + 0xff0, 16) == bytes(16)
    assert fault_of(space.dma_read, 0x200000, 4).reason == UNMAPPED
    assert fault_of(space.dma_read, (1 << 64) - 2, 4).reason == UNMAPPED


def test_a_gap_between_mappings_faults(c):
    c.map(0x100000, PAGE)
    c.map(0x102000, PAGE)
    assert fault_of(c.iommu.dma_space.dma_read, 0x100800, 0x2000).reason == UNMAPPED


def test_direction_permissions(c):
    ro = c.map(0x100000, PAGE, flags=R)        # device may read only
    wo = c.map(0x200000, PAGE, flags=W)        # device may write only
    space = c.iommu.dma_space
    assert fault_of(space.dma_write, 0x100000, b"no").reason == WRITE_NOT_PERMITTED
    assert c.memory.read(ro, 2) == bytes(2)
    assert fault_of(space.dma_read, 0x200000, 2).reason == READ_NOT_PERMITTED
    space.dma_write(0x200000, b"ok")
    assert c.memory.read(wo, 2) == b"ok"
    assert space.dma_read(0x100000, 2) == bytes(2)


def test_permission_checked_on_every_mapping_of_a_spanning_transfer(c):
    a = c.map(0x100000, PAGE)
    c.map(0x101000, PAGE, flags=R)
    f = fault_of(c.iommu.dma_space.dma_write, 0x100ff0, b"z" * 32)
    assert f.reason == WRITE_NOT_PERMITTED
    assert c.memory.read(a + 0xff0, 16) == bytes(16)     # the allowed half was not written either


def test_client_memory_gone_is_a_fault(c):
    vaddr = c.map(0x100000, PAGE)
    c.memory.free(vaddr)                       # the client unmapped its buffer under the mapping
    f = fault_of(c.iommu.dma_space.dma_read, 0x100000, 8, device=DEV)
    assert f.reason == CLIENT_MEMORY and f"0x{vaddr:x}" in f.fault.detail


def test_spanning_write_with_the_second_buffer_gone_writes_nothing(c):
    a = c.map(0x100000, PAGE)
    b = c.map(0x101000, PAGE)
    c.memory.free(b)
    assert fault_of(c.iommu.dma_space.dma_write, 0x100ff0, b"q" * 32).reason == CLIENT_MEMORY
    assert c.memory.read(a + 0xff0, 16) == bytes(16)


def test_spanning_write_into_vanished_client_memory_faults_the_rest_and_keeps_what_was_written(c):
    a = c.map(0x100000, PAGE)
    ro = c.buffer(PAGE)
    c.map(0x101000, PAGE, vaddr=ro)
    c.memory.protect(ro, writable=False)       # the client's memory changes after the map
    c.memory.write(a + 0xff0, b"k" * 16)
    assert fault_of(c.iommu.dma_space.dma_write, 0x100ff0, b"q" * 32).reason == CLIENT_MEMORY
    # As on hardware there is no undo: the first mapping's bytes were written.
    assert c.memory.read(a + 0xff0, 16) == b"q" * 16


def test_a_scatter_list_moves_in_one_pass_one_copy_per_run_contiguous_in_client_memory(c):
    vaddr = c.map(0x100000, 4 * PAGE)
    other = c.map(0x200000, PAGE)
    space = c.iommu.dma_space
    copies = []
    write = c.memory.write

    def counted(addr, data):
        copies.append((addr, len(data)))
        write(addr, data)

    c.memory.write = counted
    # Pages 0 and 1 are adjacent in client memory, then another mapping, then page 3.
    sg = [(0x100000, PAGE), (0x101000, PAGE), (0x200000, 16), (0x103000, 8)]
    data = bytes(range(256)) * 32 + b"S" * 16 + b"T" * 8
    space.dma_writev(sg, data, device=DEV)
    assert copies == [(vaddr, 2 * PAGE), (other, 16), (vaddr + 3 * PAGE, 8)]
    assert space.dma_readv(sg, device=DEV) == data
    assert space.dma_readv([], device=DEV) == b""


def test_runs_in_one_client_memory_move_in_one_copy_and_a_failed_copy_goes_run_by_run(c):
    a = c.map(0x100000, PAGE)
    b = c.map(0x200000, PAGE)
    space = c.iommu.dma_space
    memory = c.memory
    copies = []

    def readv(pieces):
        copies.append(pieces)
        return b"".join(memory.read(addr, n) for addr, n in pieces)

    def writev(pieces, data):
        copies.append(pieces)
        pos = 0
        for addr, n in pieces:
            memory.write(addr, bytes(data[pos:pos + n]))
            pos += n
        return True

    memory.readv, memory.writev = readv, writev
    sg = [(0x100000, 16), (0x200800, 8), (0x100100, 4)]
    data = b"A" * 16 + b"B" * 8 + b"C" * 4
    space.dma_writev(sg, data, device=DEV)
    assert copies == [[(a, 16), (b + 0x800, 8), (a + 0x100, 4)]]
    assert space.dma_readv(sg, device=DEV) == data and len(copies) == 2
    assert space.dma_readv([(0x100000, 16)], device=DEV) == b"A" * 16 and len(copies) == 2  # one run: a copy
    # The copy fails (the second mapping's memory is gone): run by run, the fault names that run.
    memory.readv = lambda pieces: None
    memory.free(b)
    f = fault_of(space.dma_readv, sg, device=DEV)
    assert f.reason == CLIENT_MEMORY and f.iova == 0x200800 and f.size == 8


def test_a_scatter_list_write_keeps_what_precedes_a_refused_entry(c):
    vaddr = c.map(0x100000, PAGE)
    space = c.iommu.dma_space
    f = fault_of(space.dma_writev, [(0x100000, 8), (0x300000, 8)], b"A" * 8 + b"B" * 8, device=DEV)
    assert f.reason == UNMAPPED and f.iova == 0x300000 and f.size == 8
    assert c.memory.read(vaddr, 8) == b"A" * 8      # streamed in order, as a device would
    assert fault_of(space.dma_readv, [(0x100000, 8), (0x300000, 8)], device=DEV).reason == UNMAPPED


def test_zero_length_dma_does_nothing(c):
    assert c.iommu.dma_space.dma_read(0x999000, 0) == b""
    c.iommu.dma_space.dma_write(0x999000, b"")
    assert c.driver.fault_log.total == 0


def test_invalidated_vaddr_faults_until_updated_then_uses_the_new_memory(c):
    old = c.map(0x100000, PAGE)
    space = c.iommu.dma_space
    c.unmap(0x100000, PAGE, flags=VFIO_DMA_UNMAP_FLAG_VADDR)
    f = fault_of(space.dma_write, 0x100000, b"during")
    assert f.reason == VADDR_INVALIDATED
    new = c.buffer(PAGE)
    c.map(0x100000, PAGE, vaddr=new, flags=VFIO_DMA_MAP_FLAG_VADDR)
    space.dma_write(0x100000, b"after")
    assert c.memory.read(new, 5) == b"after" and c.memory.read(old, 6) == bytes(6)


def test_unmap_then_dma_faults(c):
    c.map(0x100000, PAGE)
    c.unmap(0x100000, PAGE)
    assert fault_of(c.iommu.dma_space.dma_read, 0x100000, 1).reason == UNMAPPED


def test_dma_through_a_released_container_faults(c):
    c.map(0x100000, PAGE)
    space = c.iommu.dma_space
    c.p.close(c.gfds[2])                       # last group: the IOMMU goes
    assert fault_of(space.dma_read, 0x100000, 1).reason == UNMAPPED


# -- the fault log ----------------------------------------------------------------------------
def test_fault_records_say_what_happened(c):
    c.map(0x100000, PAGE, flags=R)
    with pytest.raises(IommuFault):
        c.iommu.dma_space.dma_write(0x100010, b"abc", device=DEV)
    (fault,) = c.driver.fault_log.faults()
    assert (fault.device, fault.iova, fault.length, fault.direction, fault.reason) == \
        (DEV, 0x100010, 3, "write", WRITE_NOT_PERMITTED)
    assert fault.time > 0 and "VFIO_DMA_MAP_FLAG_WRITE" in fault.detail
    assert c.iommu.dma_space.faults() == [fault]


def test_fault_log_is_bounded_but_counts_everything():
    log = FaultLog(maxlen=3)
    c = Client(driver=Type1Driver(fault_log=log))
    for i in range(5):
        with pytest.raises(IommuFault):
            c.iommu.dma_space.dma_read(0x1000 * i, 1)
    assert log.total == 5
    assert [f.iova for f in log.faults()] == [0x2000, 0x3000, 0x4000]
    log.clear()
    assert log.faults() == [] and log.total == 5


def test_fault_log_subscribers_see_each_fault_and_can_leave(c):
    seen = []
    unsubscribe = c.driver.fault_log.subscribe(seen.append)
    with pytest.raises(IommuFault):
        c.iommu.dma_space.dma_read(0x5000, 4)
    unsubscribe()
    with pytest.raises(IommuFault):
        c.iommu.dma_space.dma_read(0x6000, 4)
    assert [f.iova for f in seen] == [0x5000]


def test_a_failing_subscriber_does_not_stop_the_log(c):
    def broken(fault):
        raise RuntimeError("subscriber bug")
    c.driver.fault_log.subscribe(broken)
    with pytest.raises(IommuFault):
        c.iommu.dma_space.dma_read(0x5000, 4)
    assert c.driver.fault_log.total == 1


def test_record_fault_from_outside_the_iommu(c):
    c.iommu.dma_space.record_fault(iova=0x1234, size=8, write=False, reason="bus-master-disabled", device=DEV)
    (fault,) = c.driver.fault_log.faults()
    assert (fault.iova, fault.length, fault.direction, fault.reason) == (0x1234, 8, "read", "bus-master-disabled")


def test_faults_can_be_read_while_devices_fault_from_threads(c):
    c.map(0x100000, PAGE)
    space = c.iommu.dma_space
    errors = []

    def device(n):
        for i in range(200):
            try:
                space.dma_read(0x200000 + i * 8, 8, device=f"dev{n}")
            except IommuFault:
                pass
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)
            space.dma_write(0x100000 + n * 8, bytes([n]) * 8)

    threads = [threading.Thread(target=device, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        c.driver.fault_log.faults()
    for t in threads:
        t.join()
    assert errors == [] and c.driver.fault_log.total == 800
    assert c.memory.read(c.iommu.mappings()[0].vaddr, 32) == b"".join(bytes([n]) * 8 for n in range(4))


# -- devices of the container's groups get the DMA space ---------------------------------------------
def edu_client(**driver_options):
    t = EduTopology(**driver_options)
    t.add(DEV, 2)
    return t, Client(topo=t, driver=t.type1)


def enable_master(fn):
    fn.config_write(PCI_COMMAND, 2, fn.command() | PCI_COMMAND_MASTER)


def test_set_iommu_hands_the_dma_space_to_the_devices_of_the_group():
    t, c = edu_client()
    fn = t.functions[DEV]
    vaddr = c.map(0x100000, PAGE)
    enable_master(fn)
    fn.dma.write(0x100040, b"edu was here")
    assert c.memory.read(vaddr + 0x40, 12) == b"edu was here"
    c.memory.write(vaddr + 0x80, b"to the device")
    assert fn.dma.read(0x100080, 13) == b"to the device"


def test_a_device_fault_reaches_the_model_and_the_log():
    t, c = edu_client()
    fn = t.functions[DEV]
    enable_master(fn)
    with pytest.raises(IommuFault):
        fn.dma.write(0x300000, b"nowhere")
    (fault,) = t.type1.fault_log.faults()
    assert (fault.device, fault.reason, fault.direction) == (DEV, UNMAPPED, "write")
    assert fn.dma.faults[-1]["reason"] == UNMAPPED


def test_bus_master_disabled_is_logged_in_the_same_log():
    t, c = edu_client()
    fn = t.functions[DEV]
    c.map(0x100000, PAGE)
    with pytest.raises(DmaFault):
        fn.dma.read(0x100000, 4)               # master bit still clear
    (fault,) = t.type1.fault_log.faults()
    assert (fault.device, fault.reason) == (DEV, "bus-master-disabled")


def test_detaching_the_group_takes_the_dma_space_away():
    t, c = edu_client()
    fn = t.functions[DEV]
    c.map(0x100000, PAGE)
    enable_master(fn)
    c.p.close(c.gfds[2])
    with pytest.raises(DmaFault) as e:
        fn.dma.read(0x100000, 4)
    assert e.value.reason == "no-iommu-domain"


def test_a_device_bound_to_vfio_pci_later_gets_the_dma_space():
    t, c = edu_client()
    late = BusDevice("0000:00:02.1")
    t.groups[2].add_device(late)
    device_bind(late, t.vfio_pci)
    fn = t.functions["0000:00:02.1"]
    vaddr = c.map(0x100000, PAGE)
    enable_master(fn)
    fn.dma.write(0x100000, b"late")
    assert c.memory.read(vaddr, 4) == b"late"


def test_devices_of_a_type1_v1_container_dma_too():
    t = EduTopology()
    t.add(DEV, 2)
    c = Client(topo=t, driver=t.type1, iommu_type=VFIO_TYPE1_IOMMU)
    fn = t.functions[DEV]
    vaddr = c.map(0x100000, PAGE)
    enable_master(fn)
    fn.dma.write(0x100000, b"v1")
    assert c.memory.read(vaddr, 2) == b"v1"


# -- dirty page tracking -------------------------------------------------------------------------
def dirty(c, flags):
    c.p.ioctl(c.cfd, VFIO_IOMMU_DIRTY_PAGES, bytearray(struct.pack("<II", 8, flags)))


def get_bitmap(c, iova, size, words=4):
    bits = c.buffer(8 * words)
    c.memory.write(bits, b"\xff" * 8 * words)   # the kernel leaves untouched words alone
    req = struct.pack("<IIQQQQQ", 48, VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP, iova, size, PAGE, 8 * words, bits)
    c.p.ioctl(c.cfd, VFIO_IOMMU_DIRTY_PAGES, bytearray(req))
    return struct.unpack(f"<{words}Q", c.memory.read(bits, 8 * words))


def unmap_with_bitmap(c, iova, size, words=4, data=None):
    bits = data if data is not None else c.buffer(8 * words)
    tail = struct.pack("<QQQ", PAGE, 8 * words, bits)
    size = c.unmap(iova, size, flags=VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, trailing=tail)
    return size, struct.unpack(f"<{words}Q", c.memory.read(bits, 8 * words))


def test_dirty_pages_on_v1_is_eacces():
    c = Client(iommu_type=VFIO_TYPE1_IOMMU)
    fails("EACCES", dirty, c, VFIO_IOMMU_DIRTY_PAGES_FLAG_START)


def test_kernel_reports_every_mapped_page_dirty_while_tracking(c):
    c.map(0x100000, 4 * PAGE)
    dirty(c, VFIO_IOMMU_DIRTY_PAGES_FLAG_START)
    assert get_bitmap(c, 0x100000, 4 * PAGE)[0] == 0xF    # no DMA happened, all four pages
    assert get_bitmap(c, 0x100000, 4 * PAGE)[0] == 0xF    # and again
    dirty(c, VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP)
    fails("EINVAL", get_bitmap, c, 0x100000, 4 * PAGE)


def test_bits_of_mappings_share_u64_words_as_update_user_bitmap_shifts_them(c):
    c.map(0x100000, 2 * PAGE)                     # bits 0-1
    c.map(0x103000, PAGE)                         # bit 3: shifted into the same word, OR'ed with what is there
    c.map(0x100000 + 70 * PAGE, 2 * PAGE)         # bits 70-71: word 1
    dirty(c, VFIO_IOMMU_DIRTY_PAGES_FLAG_START)
    words = get_bitmap(c, 0x100000, 128 * PAGE)   # the user's buffer starts all ones
    # word 0: the first mapping writes it whole (0b11), the second ORs in the 3
    # bits below its own.  Word 1: bits 70-71, the 6 bits below kept from the buffer.
    assert words[:2] == (0b1011, 0b11 << 6 | 0x3F)
    assert words[2:] == (0xFFFFFFFFFFFFFFFF,) * 2  # beyond the last mapping: not written


def test_precise_dirty_reports_only_pages_devices_wrote():
    c = Client(driver=Type1Driver(precise_dirty=True))
    c.map(0x100000, 4 * PAGE)
    c.map(0x104000, 4 * PAGE)
    space = c.iommu.dma_space
    space.dma_write(0x100000, b"before tracking")
    dirty(c, VFIO_IOMMU_DIRTY_PAGES_FLAG_START)
    space.dma_write(0x102ff0, b"x" * 0x20)          # pages 2 and 3
    space.dma_read(0x100000, PAGE)                  # reads dirty nothing
    space.dma_write(0x106000, b"y")                 # page 6, in the second mapping
    assert get_bitmap(c, 0x100000, 8 * PAGE)[0] == 0b1001100
    assert get_bitmap(c, 0x100000, 8 * PAGE)[0] == 0   # reported pages start clean
    c.map(0x108000, PAGE)                           # mapped while tracking
    space.dma_write(0x108000, b"z")
    assert get_bitmap(c, 0x100000, 9 * PAGE)[0] == 1 << 8


def test_unmap_with_dirty_bitmap(c):
    c.map(0x100000, 4 * PAGE)
    c.map(0x104000, 2 * PAGE)
    dirty(c, VFIO_IOMMU_DIRTY_PAGES_FLAG_START)
    size, words = unmap_with_bitmap(c, 0x100000, 6 * PAGE)
    assert size == 6 * PAGE and words[0] == 0x3F
    assert c.iommu.mappings() == []


def test_unmap_with_dirty_bitmap_rules(c):
    c.map(0x100000, 4 * PAGE)
    fails("EINVAL", unmap_with_bitmap, c, 0x100000, 4 * PAGE)      # not tracking
    dirty(c, VFIO_IOMMU_DIRTY_PAGES_FLAG_START)
    # argsz without room for struct vfio_bitmap
    fails("EINVAL", c.unmap, 0x100000, 4 * PAGE, flags=VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP)
    # a bitmap too small for the range
    tail = struct.pack("<QQQ", PAGE, 0, c.buffer(8))
    fails("EINVAL", c.unmap, 0x100000, 4 * PAGE, flags=VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, trailing=tail)
    # a bitmap pointer above the user address space
    tail = struct.pack("<QQQ", PAGE, 8, 1 << 47)
    fails("EINVAL", c.unmap, 0x100000, 4 * PAGE, flags=VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, trailing=tail)
    # bitmap pgsize other than the IOMMU's smallest page
    tail = struct.pack("<QQQ", 2 * PAGE, 8, c.buffer(8))
    fails("EINVAL", c.unmap, 0x100000, 4 * PAGE, flags=VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, trailing=tail)
    assert len(c.iommu.mappings()) == 1


def test_unmap_with_an_unmapped_bitmap_is_efault_and_keeps_the_mapping(c):
    c.map(0x100000, 4 * PAGE)
    dirty(c, VFIO_IOMMU_DIRTY_PAGES_FLAG_START)
    hole = c.buffer(PAGE)
    c.memory.free(hole)
    fails("EFAULT", unmap_with_bitmap, c, 0x100000, 4 * PAGE, data=hole)
    assert len(c.iommu.mappings()) == 1


def test_unmap_size_written_back_only_on_success(c):
    c.map(0x100000, 4 * PAGE)
    u = bytearray(struct.pack("<IIQQ", 24, 0, 0x101000, PAGE))
    with pytest.raises(OSError):
        c.p.ioctl(c.cfd, VFIO_IOMMU_UNMAP_DMA, u)
    assert struct.unpack_from("<Q", u, 16)[0] == PAGE
