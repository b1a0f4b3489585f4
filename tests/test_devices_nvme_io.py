"""The NVMe model's I/O path: data to and from the backing file, PRPs, IOMMU faults, queues, injection."""

import os
import struct
import threading
import time

import pytest

from cuse_vfio.devices import create_model
from cuse_vfio.devices.nvme import spec
from cuse_vfio.devices.nvme.storage import parse_size
from devices_fakes import cfg_read, cfg_write
from nvme_host import MEM, PAGE, ready_host, sqe, u64

READ, WRITE = spec.NVM_READ, spec.NVM_WRITE


@pytest.fixture
def image(tmp_path):
    return str(tmp_path / "disk.img")


def pattern(n, seed=0):
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


# -- data at the right place -----------------------------------------------------------------
def test_written_blocks_are_in_the_file_at_their_offset(image):
    h = ready_host(backing=image, size="8M", namespaces=2)
    try:
        buf = h.alloc(2 * PAGE)
        data = pattern(2048, 1)
        h.write(buf, data)
        assert h.io(WRITE, slba=10, nlb=4, buf=buf) == 0
        assert h.io(WRITE, slba=0, nlb=1, nsid=2, buf=buf) == 0
        with open(image, "rb") as f:
            f.seek(10 * 512)
            assert f.read(2048) == data                                     # namespace 1 at 0
            f.seek(4 << 20)
            assert f.read(512) == data[:512]                                # namespace 2 at half the file
        out = h.alloc(2 * PAGE)
        assert h.io(READ, slba=10, nlb=4, buf=out) == 0 and h.read(out, 2048) == data
        assert h.io(READ, slba=0, nlb=1, nsid=3, buf=out) == spec.INVALID_NAMESPACE | spec.DNR
    finally:
        h.close()


def test_existing_file_is_used_as_it_is(image):
    with open(image, "wb") as f:
        f.write(b"\xAB" * 4096 * 4)
    h = ready_host(backing=image, lba_size=4096)
    try:
        assert h.fn.namespaces[0].nlbas == 4
        out = h.alloc(PAGE)
        assert h.io(READ, slba=3, nlb=1, buf=out) == 0 and h.read(out, 4096) == b"\xAB" * 4096
        assert h.io(READ, slba=4, nlb=1, buf=out) == spec.LBA_OUT_OF_RANGE | spec.DNR
    finally:
        h.close()


def test_backing_options_are_checked(image):
    with pytest.raises(ValueError, match="does not exist"):
        create_model("nvme", backing=image, manual_time=True)
    with pytest.raises(ValueError, match="not a whole number of 4096-byte LBAs"):
        create_model("nvme", backing=image, size=4096 * 3 + 512, lba_size=4096, manual_time=True)
    assert not os.path.exists(image)                                       # nothing created on a refusal
    with pytest.raises(ValueError, match="for each of 2 namespaces"):
        create_model("nvme", size=1536, namespaces=2, manual_time=True)
    fn = create_model("nvme", backing=image, size="64K", manual_time=True)
    fn.shutdown()
    with pytest.raises(ValueError, match="holds 65536 bytes but size says"):
        create_model("nvme", backing=image, size="128K", manual_time=True)
    with open(image, "ab") as f:
        f.write(b"x" * 100)
    with pytest.raises(ValueError, match="not a whole number of 512-byte LBAs"):
        create_model("nvme", backing=image, manual_time=True)
    assert [parse_size(s) for s in ("512", 4096, "64K", "3m", "1G", "2T")] == \
        [512, 4096, 64 << 10, 3 << 20, 1 << 30, 2 << 40]


def test_anonymous_backing_is_a_deleted_sparse_file():
    fn = create_model("nvme", manual_time=True)
    try:
        st = os.fstat(fn.backing.fd)
        assert st.st_nlink == 0 and st.st_size == 1 << 30 and st.st_blocks == 0
    finally:
        fn.shutdown()
    assert fn.backing.closed


# -- PRPs ----------------------------------------------------------------------------------
def test_prp1_offset_and_prp2_page(image):
    h = ready_host(backing=image, size="1M")
    try:
        data = pattern(4096, 3)
        with open(image, "r+b") as f:
            f.write(data)
        base = h.alloc(3 * PAGE)
        assert h.io(READ, slba=0, nlb=8, buf=base + 0x200, prp2=base + PAGE) == 0
        assert h.read(base + 0x200, 4096) == data                            # 3.5 KiB in page 1, 0.5 in page 2
        assert h.read(base, 0x200) == bytes(0x200)
        other = h.alloc(PAGE)                                                # PRP2 need not follow PRP1
        h.write(other, b"\xEE" * PAGE)
        assert h.io(READ, slba=0, nlb=8, buf=base + 0xE00, prp2=other) == 0
        assert h.read(base + 0xE00, 0x200) == data[:0x200] and h.read(other, 0xE00) == data[0x200:]
        assert h.io(READ, slba=0, nlb=8, buf=base + 0x200, prp2=other + 8) == spec.PRP_OFFSET_INVALID | spec.DNR
        assert h.io(READ, slba=0, nlb=1, buf=base + 2) == spec.PRP_OFFSET_INVALID | spec.DNR
    finally:
        h.close()


def test_prp_list_inside_a_page_and_scattered_pages(image):
    h = ready_host(backing=image, size="1M")
    try:
        data = pattern(5 * PAGE, 5)
        with open(image, "r+b") as f:
            f.write(data)
        pages = [h.alloc(PAGE) for _ in range(6)]
        first, rest = pages[0] + 0x800, pages[1:]                             # starts mid-page: 6 pages
        lst = h.alloc(PAGE) + 0x100                                           # a list from a 256-byte pool
        h.write(lst, struct.pack("<5Q", *rest[::-1]))                         # pages in reverse order
        assert h.io(READ, slba=0, nlb=40, buf=first, prp2=lst) == 0
        got = h.read(first, 0x800) + b"".join(h.read(p, PAGE) for p in rest[::-1])
        assert got[:len(data)] == data
        h.write(lst + 8, struct.pack("<Q", rest[0] + 0x10))                   # a list entry with an offset
        assert h.io(READ, slba=0, nlb=40, buf=first, prp2=lst) == spec.PRP_OFFSET_INVALID | spec.DNR
        assert h.io(READ, slba=0, nlb=40, buf=first, prp2=lst + 4) == spec.PRP_OFFSET_INVALID | spec.DNR
    finally:
        h.close()


def test_chained_prp_list_pages_and_one_dma_per_contiguous_range(image):
    h = ready_host(backing=image, size="8M", mdts=0)
    try:
        length = 3 << 20                                                     # 768 pages: two list pages
        data = pattern(length, 9)
        with open(image, "r+b") as f:
            f.write(data)
        buf = h.alloc(length + PAGE)
        list1, list2 = h.alloc(PAGE), h.alloc(PAGE)
        entries = [buf + PAGE * i for i in range(1, 768)]                     # PRP1 is page 0
        h.write(list1, struct.pack("<511Q", *entries[:511]) + struct.pack("<Q", list2))
        h.write(list2, struct.pack(f"<{len(entries) - 511}Q", *entries[511:]))
        h.space.writes.clear()
        h.space.reads.clear()
        assert h.io(READ, slba=0, nlb=length // 512, buf=buf, prp2=list1) == 0
        assert h.read(buf, length) == data
        data_writes = [w for w in h.space.writes if w[1] > 16]
        assert data_writes == [(buf, length)]                                 # 768 contiguous pages: one transfer
        assert (list1, 512 * 8) in h.space.reads and (list2, 256 * 8) in h.space.reads
        h.write(list1 + 511 * 8, struct.pack("<Q", list2 + 8))                # a chain pointer with an offset
        assert h.io(READ, slba=0, nlb=length // 512, buf=buf, prp2=list1) == spec.PRP_OFFSET_INVALID | spec.DNR
    finally:
        h.close()


def test_mdts_lba_range_and_psdt():
    h = ready_host(size="8M")                                                # MDTS 7: 512 KiB
    try:
        assert h.io(READ, slba=0, nlb=1025, buf=h.alloc(PAGE)) == spec.INVALID_FIELD | spec.DNR
        assert h.io(READ, slba=16383, nlb=2) == spec.LBA_OUT_OF_RANGE | spec.DNR
        assert h.io(READ, slba=(1 << 64) - 1, nlb=2) == spec.LBA_OUT_OF_RANGE | spec.DNR
        assert h.io(READ, slba=0, nlb=1, flags=1 << 6) == spec.INVALID_FIELD | spec.DNR   # SGL: not supported
        assert h.io(spec.NVM_WRITE_ZEROES, slba=0, nlb=4096) == 0             # MDTS does not limit Write Zeroes
    finally:
        h.close()


# -- IOMMU faults ------------------------------------------------------------------------------
def test_unmapped_buffer_is_a_data_transfer_error_that_moves_nothing(image):
    h = ready_host(backing=image, size="1M")
    try:
        with open(image, "r+b") as f:
            f.write(b"\x11" * 4096)
        assert h.io(READ, slba=0, nlb=8, buf=0x9000_0000) == spec.DATA_TRANSFER_ERROR
        assert h.fn.dma.faults[-1]["iova"] == 0x9000_0000 and h.space.faults[-1]["write"]
        edge = MEM + (16 << 20) - 0x800                                       # half in the window, half beyond
        assert h.io(READ, slba=0, nlb=8, buf=edge, prp2=MEM + (16 << 20)) == spec.DATA_TRANSFER_ERROR
        assert h.read(edge, 0x800) == bytes(0x800)
        assert h.io(WRITE, slba=0, nlb=8, buf=0x9000_0000) == spec.DATA_TRANSFER_ERROR
        with open(image, "rb") as f:
            assert f.read(4096) == b"\x11" * 4096                             # the file is untouched
        assert h.io(READ, slba=0, nlb=16, buf=h.alloc(PAGE), prp2=0xA000_0000) == spec.DATA_TRANSFER_ERROR
        assert h.fn.dma.faults[-1]["iova"] == 0xA000_0000                     # the PRP list itself
        assert h.rd(spec.REG_CSTS) == spec.CSTS_RDY                           # data faults are not fatal
    finally:
        h.close()


def test_queue_fault_is_controller_fatal():
    h = ready_host(io_queues=0)
    try:
        cq = 0xB000_0000                                                      # nobody mapped it
        assert h.admin(spec.ADMIN_CREATE_CQ, prp1=cq, cdw10=1 | (15 << 16), cdw11=3 | (1 << 16))[0] == 0
        sq = h.alloc(16 * 64)
        assert h.admin(spec.ADMIN_CREATE_SQ, prp1=sq, cdw10=1 | (15 << 16), cdw11=1 | (1 << 16))[0] == 0
        h.write(sq, sqe(spec.NVM_FLUSH, 1, nsid=1))
        h.wr(spec.REG_DBS + 8, 1)
        assert h.rd(spec.REG_CSTS) & spec.CSTS_CFS                            # the completion could not be posted
        h.wr(spec.REG_DBS, 1)                                                 # ignored now
        assert h.fn.dma.faults[-1]["iova"] == cq
        h.wr(spec.REG_CC, 0)
        h.fn.complete_pending()
        assert h.rd(spec.REG_CSTS) == 0
    finally:
        h.close()


def test_bus_master_off_faults_the_queue_fetch():
    h = ready_host()
    try:
        cfg_write(h.vdev, 4, 2, cfg_read(h.vdev, 4, 2) & ~0x4)
        h.put(1, sqe(spec.NVM_FLUSH, 1, nsid=1))
        h.ring(1)
        assert h.rd(spec.REG_CSTS) & spec.CSTS_CFS
        assert h.fn.dma.faults[-1]["reason"] == "bus-master-disabled"
    finally:
        h.close()


# -- queues --------------------------------------------------------------------------------
def test_sq_wrap_and_cq_phase_wrap():
    h = ready_host(io_queues=0)
    try:
        h.create_io_queue(1, size=4, cq_size=3)
        seen = []
        for i in range(10):
            h.put(1, sqe(spec.NVM_FLUSH, 100 + i, nsid=1))
            h.ring(1)
            q = h.queues[1]
            phase, head = q.phase, q.cq_head
            (dw0, sqhd, sqid, cid, status), = h.completions(1)
            seen.append((head, phase, sqhd, cid))
            assert (sqid, status) == (1, 0)
        assert [s[3] for s in seen] == list(range(100, 110))
        assert [s[2] for s in seen] == [(i + 1) % 4 for i in range(10)]       # SQ head, wrapping at 4
        assert [s[:2] for s in seen[:7]] == [(0, 1), (1, 1), (2, 1), (0, 0), (1, 0), (2, 0), (0, 1)]
    finally:
        h.close()


def test_full_cq_holds_completions_until_the_head_moves():
    h = ready_host(io_queues=0)
    try:
        h.create_io_queue(1, size=8, cq_size=2)                               # room for one completion
        for i in range(3):
            h.put(1, sqe(spec.NVM_FLUSH, 200 + i, nsid=1))
        h.ring(1)
        first = h.completions(1, consume=False)
        assert [c[3] for c in first] == [200] and first[0][1] == 3            # SQ head: all three fetched
        assert h.fn.engine.sqs[1].inflight == 2
        assert [c[3] for c in h.completions(1)] == [200]                      # consuming rings the CQ head...
        assert [c[3] for c in h.completions(1)] == [201]                      # ...which lets the next one in
        assert [c[3] for c in h.completions(1)] == [202]
        assert h.completions(1) == []
    finally:
        h.close()


def test_overflowing_a_throttled_sq_is_an_invalid_doorbell_value():
    h = ready_host(io_queues=0)
    try:
        h.create_io_queue(1, size=4, cq_size=2)
        h.put(0, sqe(spec.ADMIN_ASYNC_EVENT, 0x700))
        h.ring(0)
        for i in range(6):
            h.put(1, sqe(spec.NVM_FLUSH, 10 + i, nsid=1))
            if i in (2, 5):
                h.ring(1)                                                     # 3 fetched, then 1 more: 3 held
        assert h.fn.engine.sqs[1].head == 0 and h.fn.engine.sqs[1].inflight == 3
        h.put(1, sqe(spec.NVM_FLUSH, 20, nsid=1))
        h.put(1, sqe(spec.NVM_FLUSH, 21, nsid=1))
        h.ring(1)                                                             # 2 more, but only 1 slot is free
        (dw0, _, _, cid, _), = h.completions(0)
        assert cid == 0x700 and dw0 & 0xFFFF == spec.AER_ERROR_INVALID_DB_VALUE << 8
        assert h.fn.engine.sqs[1].tail == 2                                   # the write was not taken
    finally:
        h.close()


def test_a_batch_is_one_sq_read_and_one_cq_write():
    h = ready_host(queue_size=64)
    try:
        for i in range(20):
            h.put(1, sqe(spec.NVM_FLUSH, 300 + i, nsid=1))
        h.space.reads.clear()
        h.space.writes.clear()
        h.ring(1)
        q = h.queues[1]
        assert h.space.reads == [(q.sq_base + 0, 20 * 64)]
        assert h.space.writes == [(q.cq_base, 20 * 16)]
        assert len(h.completions(1)) == 20
    finally:
        h.close()


def test_a_round_stops_after_a_mebibyte_and_the_next_goes_on():
    h = ready_host(size="8M")
    try:
        buf = h.alloc(512 << 10)
        lst = h.alloc(PAGE)
        h.write(lst, struct.pack("<127Q", *(buf + PAGE * i for i in range(1, 128))))
        for i in range(4):                                                    # 4 x 512 KiB
            h.put(1, sqe(READ, 400 + i, nsid=1, prp1=buf, prp2=lst, cdw10=1024 * i, cdw12=1023))
        assert h.fn.engine.doorbell(spec.REG_DBS + 8, 4)                      # the tail, without a round
        assert h.fn.engine.round() is True                                   # work is left
        assert [c[3] for c in h.completions(1, consume=False)] == [400, 401]
        assert h.fn.engine.round() is False
        assert [(c[3], c[4]) for c in h.completions(1)] == [(400 + i, 0) for i in range(4)]
    finally:
        h.close()


# -- flush, write zeroes, deallocate ---------------------------------------------------------------
def test_flush_write_zeroes_and_deallocate(image, monkeypatch):
    h = ready_host(backing=image, size="4M")
    try:
        with open(image, "r+b") as f:
            f.write(b"\x5A" * (1 << 20))
            os.fsync(f.fileno())
        synced = []
        real = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
        assert h.io(spec.NVM_FLUSH) == 0 and synced == [h.fn.backing.fd]
        assert h.io(spec.NVM_FLUSH, nsid=spec.NSID_BROADCAST) == 0 and len(synced) == 2
        assert h.io(spec.NVM_FLUSH, nsid=2) == spec.INVALID_NAMESPACE | spec.DNR
        assert h.io(spec.NVM_WRITE_ZEROES, slba=8, nlb=8) == 0
        assert h.io(spec.NVM_WRITE_ZEROES, slba=64, nlb=64, cdw12=spec.WZ_DEAC) == 0
        ranges = h.alloc(PAGE)
        h.write(ranges, spec.DSM_RANGE.pack(0, 128, 1024) + spec.DSM_RANGE.pack(0, 8, 1200))
        assert h.submit(1, spec.NVM_DSM, nsid=1, prp1=ranges, cdw10=1, cdw11=spec.DSM_AD)[0] == 0
        with open(image, "rb") as f:
            disk = f.read(1 << 20)
        assert disk[4096:8192] == bytes(4096) and disk[:4096] == b"\x5A" * 4096
        assert disk[64 * 512:128 * 512] == bytes(64 * 512)
        assert disk[1024 * 512:1152 * 512] == bytes(128 * 512) and disk[1152 * 512:1200 * 512] == b"\x5A" * 48 * 512
        assert disk[1200 * 512:1208 * 512] == bytes(8 * 512)
        h.write(ranges, spec.DSM_RANGE.pack(0, 8, 0) + spec.DSM_RANGE.pack(0, 8, 8192))
        assert h.submit(1, spec.NVM_DSM, nsid=1, prp1=ranges, cdw10=1, cdw11=spec.DSM_AD)[0] == \
            spec.LBA_OUT_OF_RANGE | spec.DNR
        with open(image, "rb") as f:
            assert f.read(512) == b"\x5A" * 512                               # no range was deallocated
        assert h.submit(1, spec.NVM_DSM, nsid=1, prp1=0xC000_0000, cdw11=spec.DSM_AD)[0] == \
            spec.DATA_TRANSFER_ERROR
    finally:
        h.close()


def test_fua_and_write_through_cache_write_with_dsync(image, monkeypatch):
    h = ready_host(backing=image, size="1M")
    try:
        calls = []
        real = os.pwritev
        monkeypatch.setattr(os, "pwritev", lambda fd, bufs, off, flags=0: (calls.append(flags),
                                                                          real(fd, bufs, off, flags))[1])
        buf = h.alloc(PAGE)
        assert h.io(WRITE, nlb=1, buf=buf) == 0
        assert h.io(WRITE, nlb=1, buf=buf, cdw12=spec.RW_FUA) == 0
        assert h.admin(spec.ADMIN_SET_FEATURES, cdw10=spec.FEAT_VOLATILE_WC, cdw11=0)[0] == 0
        assert h.io(WRITE, nlb=1, buf=buf) == 0
        assert calls == [0, os.RWF_DSYNC, os.RWF_DSYNC]
    finally:
        h.close()


# -- error injection --------------------------------------------------------------------------
def test_media_errors_on_an_lba_range():
    h = ready_host(inject=[{"kind": "media-error", "opcodes": ["read"], "lba": [100, 109]},
                           {"kind": "media-error", "opcodes": ["write"], "count": 1, "dnr": True}])
    try:
        out = h.alloc(PAGE)
        assert h.io(READ, slba=90, nlb=8, buf=out) == 0                       # 90..97: outside
        h.write(out, b"\x77" * 512)
        assert h.io(READ, slba=98, nlb=4, buf=out) == spec.UNRECOVERED_READ_ERROR  # 98..101 overlaps
        assert h.read(out, 512) == b"\x77" * 512                              # nothing was transferred
        assert h.io(READ, slba=109, nlb=1, buf=out) == spec.UNRECOVERED_READ_ERROR
        assert h.io(READ, slba=110, nlb=1, buf=out) == 0
        assert h.io(WRITE, slba=5, nlb=1, buf=out) == spec.WRITE_FAULT | spec.DNR
        assert h.io(WRITE, slba=5, nlb=1, buf=out) == 0                       # count = 1: spent
        _, page = h.get_log(spec.LOG_ERROR, 64)
        assert u64(page, 16) == 5                                             # newest first: the write fault's LBA
        _, page = h.get_log(spec.LOG_ERROR, 192)
        assert u64(page, 16 + 64) == 109 and u64(page, 16 + 128) == 100       # the first LBA inside the range
        _, smart = h.get_log(spec.LOG_SMART, 512)
        assert u64(smart, 160) == 3                                           # media errors
    finally:
        h.close()


def test_delayed_commands_complete_later_out_of_order_and_can_be_aborted():
    h = ready_host(inject=[{"kind": "delay", "opcodes": ["flush"], "seconds": 0.2}])
    try:
        h.put(1, sqe(spec.NVM_FLUSH, 1, nsid=1))
        h.put(1, sqe(READ, 2, nsid=1, prp1=h.alloc(PAGE)))
        h.put(1, sqe(spec.NVM_FLUSH, 3, nsid=1))
        h.ring(1)
        assert [c[3] for c in h.completions(1)] == [2]                        # the read overtook the flushes
        h.put(0, sqe(spec.ADMIN_ABORT, 50, cdw10=1 | (3 << 16)))
        h.ring(0)
        assert [(c[0] & 1, c[3]) for c in h.completions(0)] == [(0, 50)]       # aborted
        assert [(c[3], c[4]) for c in h.completions(1)] == [(3, spec.ABORT_REQUESTED)]
        h.fn.complete_pending()
        assert [(c[3], c[4]) for c in h.completions(1)] == [(1, 0)]
    finally:
        h.close()


def test_deleting_an_sq_aborts_its_held_commands():
    h = ready_host(inject=[{"kind": "delay", "seconds": 1}])
    try:
        h.put(1, sqe(spec.NVM_FLUSH, 9, nsid=1))
        h.ring(1)
        assert h.admin(spec.ADMIN_DELETE_SQ, cdw10=1)[0] == 0
        assert [(c[3], c[4]) for c in h.completions(1)] == [(9, spec.ABORT_SQ_DELETION)]
        h.fn.complete_pending()
        assert h.completions(1) == []
    finally:
        h.close()


def test_fatal_after_n_commands_and_on_an_opcode():
    h = ready_host(inject=[{"kind": "fatal", "after": 3}])
    try:
        for _ in range(3):
            assert h.io(spec.NVM_FLUSH) == 0
        h.put(1, sqe(spec.NVM_FLUSH, 77, nsid=1))
        h.ring(1)
        assert h.rd(spec.REG_CSTS) == spec.CSTS_RDY | spec.CSTS_CFS
        assert h.completions(1) == []
        h.wr(spec.REG_CC, 0)
        h.fn.complete_pending()
        h.queues.clear()
        h.enable()
        h.create_io_queue(1)
        assert h.io(spec.NVM_FLUSH) == 0                                      # fired once: spent
    finally:
        h.close()
    h = ready_host(inject=[{"kind": "fatal", "opcodes": ["admin:0xc0", "get-log-page"]}])
    try:
        assert h.io(spec.NVM_FLUSH) == 0
        h.put(0, sqe(spec.ADMIN_GET_LOG_PAGE, 5, cdw10=2))
        h.ring(0)
        assert h.rd(spec.REG_CSTS) & spec.CSTS_CFS and h.completions(0) == []
    finally:
        h.close()


# -- the I/O thread -------------------------------------------------------------------------------
def test_io_thread_runs_commands_off_the_doorbell_write(image):
    h = ready_host(backing=image, size="1M", manual_time=False)
    try:
        assert h.fn._io is not None
        buf = h.alloc(PAGE)
        h.write(buf, pattern(4096, 4))
        h.put(1, sqe(WRITE, 1, nsid=1, prp1=buf, cdw12=7))
        h.ring(1)
        done = []
        for _ in range(1000):                                                 # poll the CQ as a driver would
            done = h.completions(1)
            if done:
                break
            time.sleep(0.005)
        assert [(c[3], c[4]) for c in done] == [(1, 0)]
        with open(image, "rb") as f:
            assert f.read(4096) == pattern(4096, 4)
        assert any(t.name.startswith("nvme-io") for t in threading.enumerate())
    finally:
        h.close()
    assert not any(t.name == f"nvme-io {h.fn.name}" for t in threading.enumerate())
