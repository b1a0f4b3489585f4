"""The NVMe controller model behind vfio-pci: PCI identity, registers, admin commands, events, resets.

Checked against NVMe 1.4, Linux 6.1 ``drivers/nvme/host/{pci,core}.c`` (what
the driver reads) and QEMU ``hw/nvme/ctrl.c`` (the device it imitates).
"""

import struct
import time

import pytest

from cuse_vfio import uapi
from cuse_vfio.machine import topology
from cuse_vfio.machine import Machine
from cuse_vfio.machine.topology import TopologyError
from cuse_vfio.devices import create_model
from cuse_vfio.devices.nvme import spec
from cuse_vfio.devices.pci import capability_offsets
from cuse_vfio.transport.local import LocalProcess
from cuse_vfio.uapi import VFIO_DEVICE_FLAGS_RESET, VFIO_DEVICE_GET_INFO, VFIO_DEVICE_RESET
from devices_fakes import cfg_read, cfg_write, ioctl
from nvme_host import PAGE, NvmeHost, ready_host, sqe, u16, u32, u64

GENERIC_ERRORS = [0x00, 0x01, 0x02, 0x04, 0x0B, 0x80]


@pytest.fixture
def host():
    h = ready_host()
    yield h
    h.close()


# -- PCI identity ---------------------------------------------------------------------------
def test_pci_identity_as_qemu_nvme():
    h = NvmeHost()
    try:
        v = h.vdev
        assert cfg_read(v, 0, 4) == 0x00101B36
        assert cfg_read(v, 8, 4) == 0x01080202           # class 010802, revision 2
        assert cfg_read(v, 0x2C, 4) == 0x11001AF4         # subsystem 1af4:1100
        assert cfg_read(v, 0x3D, 1) == 1                  # INTA
        caps = capability_offsets(lambda o, s: cfg_read(v, o, s))
        assert sorted(caps.values()) == [0x01, 0x05, 0x10, 0x11]  # PM, MSI, PCIe, MSI-X
        msix = next(o for o, c in caps.items() if c == 0x11)
        assert cfg_read(v, msix + 2, 2) & 0x7FF == 64      # 65 vectors: admin + 64 I/O queues
        assert cfg_read(v, msix + 4, 4) == 0x2000          # table in BAR0 at 0x2000
        assert cfg_read(v, msix + 8, 4) == 0x3000          # PBA in BAR0 at 0x3000
        exp = next(o for o, c in caps.items() if c == 0x10)
        assert cfg_read(v, exp + 4, 4) & (1 << 28)         # FLR
        for reg in (0x10, 0x14):
            cfg_write(v, reg, 4, 0xFFFFFFFF)
        assert cfg_read(v, 0x10, 4) == 0xFFFFC004          # 16 KiB, 64-bit memory
        assert cfg_read(v, 0x14, 4) == 0xFFFFFFFF
        _, out = ioctl(v, VFIO_DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0))
        assert struct.unpack_from("<I", out, 4)[0] & VFIO_DEVICE_FLAGS_RESET
    finally:
        h.close()


def test_bar0_grows_with_max_queues():
    fn = create_model("nvme", max_queues=300, manual_time=True)
    try:
        assert fn.vectors == 301
        assert fn.msix.table_offset == 0x2000               # 0x1000 + 8 * 301 doorbells, rounded up
        assert fn.msix.pba_offset == 0x4000                 # 301 * 16 bytes of table: two pages
        assert fn.bar0_size == 0x8000
    finally:
        fn.shutdown()


# -- registers ------------------------------------------------------------------------------
def test_cap_vs_and_reserved_registers():
    h = NvmeHost()
    try:
        cap = h.rd(spec.REG_CAP, 8)
        assert cap & 0xFFFF == 0x7FF                       # MQES
        assert cap >> 16 & 1                               # CQR
        assert cap >> 24 & 0xFF == 0xF                     # TO
        assert cap >> 32 & 0xF == 0                        # DSTRD
        assert cap >> 37 & 0xFF == 1                       # CSS: NVM
        assert (cap >> 48 & 0xF, cap >> 52 & 0xF) == (0, 4)
        assert h.rd(spec.REG_CAP + 4) == cap >> 32         # lo_hi_readq reads it in halves
        assert h.rd(spec.REG_VS) == 0x00010400
        assert h.rd(spec.REG_CMBSZ) == 0 and h.rd(spec.REG_CMBLOC) == 0 and h.rd(spec.REG_NSSR) == 0
        assert h.rd(spec.REG_CSTS) == 0
        h.wr(spec.REG_CAP, 0)                              # read-only
        assert h.rd(spec.REG_CAP, 8) == cap
        h.wr(spec.REG_ASQ, 0x1234_5000, 4)
        h.wr(spec.REG_ASQ + 4, 0x9, 4)
        assert h.rd(spec.REG_ASQ, 8) == 0x9_1234_5000
    finally:
        h.close()


def test_enable_then_ready_after_a_delay_and_reset_back():
    h = NvmeHost()
    try:
        h.enable(ready=False)
        assert h.rd(spec.REG_CSTS) == 0                    # RDY follows later (call_later)
        h.fn.complete_pending()
        assert h.rd(spec.REG_CSTS) == spec.CSTS_RDY
        h.wr(spec.REG_CC, 0)
        assert h.rd(spec.REG_CSTS) & spec.CSTS_RDY         # still ready until the reset completes
        h.fn.complete_pending()
        assert h.rd(spec.REG_CSTS) == 0
        assert h.rd(spec.REG_AQA) != 0                     # admin queue registers survive a controller reset
    finally:
        h.close()


@pytest.mark.parametrize("what, aqa, asq, acq, cc", [
    ("ASQS 0", 0x001F0000, 0x200000, 0x201000, 0x00460001),
    ("ACQS 0", 0x0000001F, 0x200000, 0x201000, 0x00460001),
    ("ASQ misaligned", 0x001F001F, 0x200100, 0x201000, 0x00460001),
    ("ACQ misaligned", 0x001F001F, 0x200000, 0x201008, 0x00460001),
    ("MPS above MPSMAX", 0x001F001F, 0x200000, 0x201000, 0x00460001 | (5 << 7)),
    ("CSS not NVM", 0x001F001F, 0x200000, 0x201000, 0x00460001 | (1 << 4)),
    ("AMS not round robin", 0x001F001F, 0x200000, 0x201000, 0x00460001 | (1 << 11)),
    ("IOSQES not 6", 0x001F001F, 0x200000, 0x201000, 0x00470001),
    ("IOCQES not 4", 0x001F001F, 0x200000, 0x201000, 0x00560001),
])
def test_bad_enable_is_controller_fatal(what, aqa, asq, acq, cc):
    h = NvmeHost()
    try:
        h.wr(spec.REG_AQA, aqa)
        h.wr(spec.REG_ASQ, asq, 8)
        h.wr(spec.REG_ACQ, acq, 8)
        h.wr(spec.REG_CC, cc)
        h.fn.complete_pending()
        assert h.rd(spec.REG_CSTS) == spec.CSTS_CFS, what
        h.wr(spec.REG_CC, 0)                               # a controller reset clears it
        h.fn.complete_pending()
        assert h.rd(spec.REG_CSTS) == 0
    finally:
        h.close()


def test_enable_without_io_entry_sizes_is_allowed_until_queues_are_created():
    h = NvmeHost()
    try:
        h.enable(cc=1)                                     # IOSQES/IOCQES still 0: admin queues only
        q = h.alloc(PAGE)
        status, _ = h.admin(spec.ADMIN_CREATE_CQ, prp1=q, cdw10=1 | (15 << 16), cdw11=1)
        assert status == spec.INVALID_QUEUE_SIZE | spec.DNR
    finally:
        h.close()


def test_shutdown_notification_flushes_then_completes():
    h = ready_host()
    try:
        flushed = []
        h.fn.backing.flush = lambda: flushed.append(1)
        h.wr(spec.REG_CC, h.rd(spec.REG_CC) | (1 << 14))
        assert h.rd(spec.REG_CSTS) >> 2 & 3 == spec.SHST_OCCURRING and flushed
        h.fn.complete_pending()
        assert h.rd(spec.REG_CSTS) >> 2 & 3 == spec.SHST_COMPLETE
        h.wr(spec.REG_CC, 0)                               # the next driver's disable clears SHN and EN at once
        h.fn.complete_pending()
        h.queues.clear()
        h.enable()
        h.wr(spec.REG_CC, 0)                               # a reset without a shutdown notification
        h.fn.complete_pending()
        h.enable()
        _, smart = h.get_log(spec.LOG_SMART, 512)
        assert u64(smart, 144) == 1                        # unsafe shutdowns: only the second
    finally:
        h.close()


# -- Identify -------------------------------------------------------------------------------
def test_identify_controller_fields_linux_reads(host):
    status, d = host.identify(spec.CNS_CTRL)
    assert status == 0
    assert (u16(d, 0), u16(d, 2)) == (0x1B36, 0x1AF4)                  # VID, SSVID
    assert d[4:24] == b"CUSEVFIO000000040".ljust(20)                   # SN (from the BDF)
    assert d[24:64] == b"QEMU NVMe Ctrl".ljust(40)                     # MN
    assert d[64:72] == b"1.0".ljust(8)                                 # FR
    assert d[73:76] == b"\x00\x54\x52"                                 # IEEE OUI 52:54:00
    assert d[77] == 7 and u16(d, 78) == 0                              # MDTS, CNTLID
    assert u32(d, 80) == 0x00010400                                    # VER
    assert d[111] == 1                                                 # CNTRLTYPE: I/O
    assert (u16(d, 256), d[258], d[259]) == (0, 3, 3)                  # OACS, ACL, AERL
    assert (d[260], d[261], d[262], d[263]) == (0x03, 0x05, 63, 0)     # FRMW, LPA, ELPE, NPSS
    assert u16(d, 320) == 0                                            # KAS: no Keep Alive
    assert (d[512], d[513]) == (0x66, 0x44)                            # SQES, CQES
    assert u32(d, 516) == 1                                            # NN
    assert u16(d, 520) == 0x4C                                         # ONCS: DSM, Write Zeroes, Timestamp
    assert d[525] == 0x07                                              # VWC present, broadcast flush
    assert u32(d, 536) == 0                                            # SGLS: none
    assert d[768:768 + 39] == b"nqn.2019-08.org.qemu:CUSEVFIO000000040\0"
    assert u16(d, 2048) == 0x9C4                                       # PSD0 max power


def test_identify_namespace_and_lists():
    h = ready_host(namespaces=2, size="2M", lba_size=4096)
    try:
        status, d = h.identify(spec.CNS_NS, nsid=2)
        assert status == 0
        assert u64(d, 0) == u64(d, 8) == u64(d, 16) == 256                 # NSZE NCAP NUSE: 1 MiB of 4 KiB
        assert (d[25], d[26] & 0xF) == (1, 1)                              # NLBAF 2 formats, FLBAS picks 4096
        assert (d[128 + 2], d[132 + 2]) == (9, 12)                          # LBADS of 512 and 4096
        assert d[33] == 0x09                                               # DLFEAT
        _, d1 = h.identify(spec.CNS_NS, nsid=1)
        assert d[104:128] != d1[104:128] and any(d[104:128])                # NGUID/EUI64 distinct per namespace
        status, lst = h.identify(spec.CNS_ACTIVE_NS_LIST)
        assert status == 0 and struct.unpack_from("<3I", lst) == (1, 2, 0)
        assert struct.unpack_from("<2I", h.identify(spec.CNS_ACTIVE_NS_LIST, nsid=1)[1]) == (2, 0)
        assert h.identify(spec.CNS_ACTIVE_NS_LIST, nsid=0xFFFFFFFE)[0] == spec.INVALID_NAMESPACE | spec.DNR
        status, desc = h.identify(spec.CNS_NS_DESCRIPTORS, nsid=2)
        assert status == 0
        assert desc[0:2] == b"\x01\x08" and desc[4:12] == d[120:128]        # EUI-64
        assert desc[12:14] == b"\x02\x10" and desc[16:32] == d[104:120]     # NGUID
        assert desc[32:34] == b"\x03\x10"                                   # UUID
        for nsid in (0, 3, 0xFFFFFFFF):
            assert h.identify(spec.CNS_NS, nsid=nsid)[0] == spec.INVALID_NAMESPACE | spec.DNR
        assert h.identify(spec.CNS_CS_CTRL, cdw11=spec.CSI_NVM << 24)[0] == 0
        assert h.identify(spec.CNS_CS_CTRL, cdw11=2 << 24)[0] == spec.INVALID_FIELD | spec.DNR
        assert h.identify(0x10)[0] == spec.INVALID_FIELD | spec.DNR         # namespace management: unsupported
    finally:
        h.close()


def test_unknown_and_fused_commands(host):
    assert host.admin(0x7C)[0] == spec.INVALID_OPCODE | spec.DNR           # Doorbell Buffer Config
    assert host.admin(spec.ADMIN_KEEP_ALIVE)[0] == spec.INVALID_OPCODE | spec.DNR
    assert host.io(0x05) == spec.INVALID_OPCODE | spec.DNR                    # Compare
    assert host.admin(spec.ADMIN_IDENTIFY, cdw10=1, prp1=host.alloc(PAGE), flags=1)[0] == \
        spec.INVALID_FIELD | spec.DNR
    buf = host.alloc(PAGE)
    assert host.admin(spec.ADMIN_IDENTIFY, cdw10=1, prp1=buf, flags=1 << 6)[0] == spec.INVALID_FIELD | spec.DNR


# -- queue management ------------------------------------------------------------------------
def create_cq(h, qid, size=16, flags=3, vector=None, base=None):
    base = h.alloc(size * 16) if base is None else base
    return h.admin(spec.ADMIN_CREATE_CQ, prp1=base, cdw10=qid | ((size - 1) << 16),
                   cdw11=flags | ((qid if vector is None else vector) << 16))[0]


def create_sq(h, qid, cqid, size=16, flags=1, base=None):
    base = h.alloc(size * 64) if base is None else base
    return h.admin(spec.ADMIN_CREATE_SQ, prp1=base, cdw10=qid | ((size - 1) << 16), cdw11=flags | (cqid << 16))[0]


def test_create_cq_statuses():
    h = ready_host(io_queues=0, max_queues=4)
    try:
        bad = spec.DNR
        assert create_cq(h, 0) == spec.INVALID_QID | bad                      # the admin CQ exists already
        assert create_cq(h, 5) == spec.INVALID_QID | bad                      # beyond the queues allocated
        assert create_cq(h, 1, size=1) == spec.INVALID_QUEUE_SIZE | bad       # QSIZE 0: one entry
        assert create_cq(h, 1, size=0x801) == spec.INVALID_QUEUE_SIZE | bad   # beyond MQES
        assert create_cq(h, 1, base=h.alloc(PAGE) + 0x10) == spec.PRP_OFFSET_INVALID | bad
        assert create_cq(h, 1, vector=5) == spec.INVALID_VECTOR | bad         # MSI-X has 5 vectors: 0..4
        assert create_cq(h, 1, flags=2) == spec.INVALID_FIELD | bad           # not physically contiguous
        assert create_cq(h, 1, flags=1, vector=9) == 0                        # no interrupts: vector unused
        assert create_cq(h, 1) == spec.INVALID_QID | bad                      # exists
        assert create_cq(h, 2, vector=4) == 0
    finally:
        h.close()


def test_create_cq_vector_without_msix():
    h = NvmeHost(msix=False)
    try:
        h.enable()
        assert create_cq(h, 1, vector=1) == spec.INVALID_VECTOR | spec.DNR    # INTx: vector 0 only
        assert create_cq(h, 1, vector=0) == 0
    finally:
        h.close()


def test_create_sq_statuses():
    h = ready_host(io_queues=0, max_queues=4)
    try:
        bad = spec.DNR
        assert create_cq(h, 1) == 0
        assert create_sq(h, 1, cqid=0) == spec.CQ_INVALID | bad               # the admin CQ
        assert create_sq(h, 1, cqid=2) == spec.CQ_INVALID | bad               # no such CQ
        assert create_sq(h, 1, cqid=0xFFFF) == spec.CQ_INVALID | bad
        assert create_sq(h, 0, cqid=1) == spec.INVALID_QID | bad
        assert create_sq(h, 5, cqid=1) == spec.INVALID_QID | bad
        assert create_sq(h, 1, cqid=1, size=1) == spec.INVALID_QUEUE_SIZE | bad
        assert create_sq(h, 1, cqid=1, size=0x801) == spec.INVALID_QUEUE_SIZE | bad
        assert create_sq(h, 1, cqid=1, base=h.alloc(2 * PAGE) + 0x40) == spec.PRP_OFFSET_INVALID | bad
        assert create_sq(h, 1, cqid=1, flags=0) == spec.INVALID_FIELD | bad
        assert create_sq(h, 1, cqid=1) == 0
        assert create_sq(h, 1, cqid=1) == spec.INVALID_QID | bad              # exists
        assert create_sq(h, 2, cqid=1) == 0                                   # two SQs may share a CQ
    finally:
        h.close()


def test_delete_queues():
    h = ready_host(io_queues=1)
    try:
        assert h.admin(spec.ADMIN_DELETE_CQ, cdw10=1)[0] == spec.INVALID_QUEUE_DELETION | spec.DNR
        assert h.admin(spec.ADMIN_DELETE_SQ, cdw10=0)[0] == spec.INVALID_QID | spec.DNR
        assert h.admin(spec.ADMIN_DELETE_SQ, cdw10=2)[0] == spec.INVALID_QID | spec.DNR
        assert h.admin(spec.ADMIN_DELETE_SQ, cdw10=1)[0] == 0
        assert h.admin(spec.ADMIN_DELETE_SQ, cdw10=1)[0] == spec.INVALID_QID | spec.DNR
        assert h.admin(spec.ADMIN_DELETE_CQ, cdw10=0)[0] == spec.INVALID_QID | spec.DNR
        assert h.admin(spec.ADMIN_DELETE_CQ, cdw10=1)[0] == 0
        assert h.admin(spec.ADMIN_DELETE_CQ, cdw10=1)[0] == spec.INVALID_QID | spec.DNR
        h.create_io_queue(1)                                                   # and again
        assert h.io(spec.NVM_FLUSH) == 0
    finally:
        h.close()


def test_number_of_queues_feature():
    h = ready_host(io_queues=0, max_queues=8)
    try:
        status, dw0 = h.admin(spec.ADMIN_SET_FEATURES, cdw10=spec.FEAT_NUM_QUEUES, cdw11=(1 << 16) | 99)
        assert status == 0 and dw0 == (1 << 16) | 7                           # 8 SQs (capped), 2 CQs
        assert h.admin(spec.ADMIN_GET_FEATURES, cdw10=spec.FEAT_NUM_QUEUES) == (0, (1 << 16) | 7)
        assert h.admin(spec.ADMIN_SET_FEATURES, cdw10=spec.FEAT_NUM_QUEUES, cdw11=0xFFFF)[0] == \
            spec.INVALID_FIELD | spec.DNR
        assert create_cq(h, 3) == spec.INVALID_QID | spec.DNR                  # only 2 CQs allocated
        assert create_cq(h, 2) == 0
        assert h.admin(spec.ADMIN_SET_FEATURES, cdw10=spec.FEAT_NUM_QUEUES, cdw11=0)[0] == \
            spec.COMMAND_SEQUENCE_ERROR | spec.DNR                             # queues exist already
    finally:
        h.close()


# -- features --------------------------------------------------------------------------------
def test_features_get_set_and_select(host):
    setf = lambda fid, dw11, **kw: host.admin(spec.ADMIN_SET_FEATURES, cdw10=fid, cdw11=dw11, **kw)
    getf = lambda fid, sel=0, dw11=0: host.admin(spec.ADMIN_GET_FEATURES, cdw10=fid | (sel << 8), cdw11=dw11)
    assert getf(spec.FEAT_ARBITRATION) == (0, 7)
    assert setf(spec.FEAT_ARBITRATION, 0x01020302)[0] == 0
    assert getf(spec.FEAT_ARBITRATION) == (0, 0x01020302)
    assert getf(spec.FEAT_ARBITRATION, sel=spec.SEL_DEFAULT) == (0, 7)
    assert getf(spec.FEAT_ARBITRATION, sel=spec.SEL_SAVED) == (0, 7)
    assert getf(spec.FEAT_ARBITRATION, sel=spec.SEL_CAPABILITIES) == (0, spec.FEAT_CAP_CHANGEABLE)
    assert setf(spec.FEAT_POWER_MGMT, 1)[0] == spec.INVALID_FIELD | spec.DNR   # NPSS 0
    assert getf(spec.FEAT_TEMP_THRESHOLD) == (0, 0x157)
    assert getf(spec.FEAT_TEMP_THRESHOLD, dw11=1 << 20) == (0, 0)              # under threshold
    assert getf(spec.FEAT_TEMP_THRESHOLD, dw11=3 << 16) == (0, 0)              # sensor 3 not implemented
    assert getf(spec.FEAT_TEMP_THRESHOLD, dw11=2 << 20)[0] == spec.INVALID_FIELD | spec.DNR
    assert setf(spec.FEAT_ERROR_RECOVERY, 1 << 16)[0] == spec.INVALID_FIELD | spec.DNR  # DULBE
    assert getf(spec.FEAT_VOLATILE_WC) == (0, 1)
    assert setf(spec.FEAT_VOLATILE_WC, 0)[0] == 0 and getf(spec.FEAT_VOLATILE_WC) == (0, 0)
    assert setf(spec.FEAT_IRQ_COALESCE, 0x0A05)[0] == 0 and getf(spec.FEAT_IRQ_COALESCE) == (0, 0x0A05)
    assert getf(spec.FEAT_IRQ_CONFIG, dw11=0) == (0, 1 << 16)                   # admin vector: no coalescing
    assert setf(spec.FEAT_IRQ_CONFIG, 3 | 1 << 16)[0] == 0 and getf(spec.FEAT_IRQ_CONFIG, dw11=3) == (0, 3 | 1 << 16)
    assert getf(spec.FEAT_IRQ_CONFIG, dw11=65)[0] == spec.INVALID_FIELD | spec.DNR
    assert setf(spec.FEAT_WRITE_ATOMICITY, 1)[0] == 0 and getf(spec.FEAT_WRITE_ATOMICITY) == (0, 1)
    assert setf(spec.FEAT_ASYNC_EVENT, 0x3FF)[0] == 0 and getf(spec.FEAT_ASYNC_EVENT) == (0, 0xFF)
    assert host.admin(spec.ADMIN_SET_FEATURES, cdw10=spec.FEAT_ARBITRATION | 1 << 31)[0] == \
        spec.FEATURE_NOT_SAVEABLE | spec.DNR
    assert setf(spec.FEAT_ARBITRATION, 0, nsid=1)[0] == spec.FEATURE_NOT_NS_SPECIFIC | spec.DNR
    assert setf(0x0C, 0)[0] == spec.INVALID_FIELD | spec.DNR                   # software progress marker
    assert getf(0x80)[0] == spec.INVALID_FIELD | spec.DNR
    host.wr(spec.REG_CC, 0)                                                     # a reset restores defaults
    host.fn.complete_pending()
    host.enable()
    assert getf(spec.FEAT_ARBITRATION) == (0, 7) and getf(spec.FEAT_VOLATILE_WC) == (0, 1)


def test_timestamp_feature(host):
    ts = host.alloc(8)
    host.write(ts, struct.pack("<Q", 1_700_000_000_000))
    assert host.admin(spec.ADMIN_SET_FEATURES, cdw10=spec.FEAT_TIMESTAMP, prp1=ts)[0] == 0
    out = host.alloc(8)
    assert host.admin(spec.ADMIN_GET_FEATURES, cdw10=spec.FEAT_TIMESTAMP, prp1=out)[0] == 0
    value = u64(host.read(out, 8), 0)
    assert 1_700_000_000_000 <= value & ((1 << 48) - 1) < 1_700_000_000_000 + 60_000
    assert value >> 49 & 7 == 1                                                 # origin: set by the host


# -- log pages ---------------------------------------------------------------------------------
def test_log_pages(host):
    buf = host.alloc(PAGE)
    host.write(buf, b"z" * 4096)
    for _ in range(3):
        assert host.io(spec.NVM_WRITE, slba=0, nlb=8, buf=buf) == 0
    assert host.io(spec.NVM_READ, slba=0, nlb=1) == 0
    status, smart = host.get_log(spec.LOG_SMART, 512, nsid=spec.NSID_BROADCAST)
    assert status == 0
    assert u16(smart, 1) == 0x143 and smart[3] == 100                           # temperature, spare
    assert u64(smart, 32) == 1 and u64(smart, 48) == 1                          # data units (1000 x 512 B, rounded up)
    assert u64(smart, 64) == 1 and u64(smart, 80) == 3                          # host read / write commands
    assert u64(smart, 112) == 1                                                 # power cycles
    assert host.get_log(spec.LOG_SMART, 512, nsid=2)[0] == spec.INVALID_NAMESPACE | spec.DNR
    status, fw = host.get_log(spec.LOG_FW_SLOT, 512)
    assert status == 0 and fw[0] == 1 and fw[8:16] == b"1.0     "
    assert host.get_log(0x04, 512)[0] == spec.INVALID_LOG_PAGE | spec.DNR      # changed namespace list
    assert host.get_log(0xC0, 512)[0] == spec.INVALID_LOG_PAGE | spec.DNR
    status, part = host.get_log(spec.LOG_SMART, 16, offset=32)                  # LPO: extended data
    assert status == 0 and part == smart[32:48]
    assert host.get_log(spec.LOG_SMART, 16, offset=2)[0] == spec.INVALID_FIELD | spec.DNR
    assert host.get_log(spec.LOG_SMART, 16, offset=512)[0] == spec.INVALID_FIELD | spec.DNR


def test_error_log_records_failed_commands(host):
    assert host.io(spec.NVM_READ, slba=1 << 40) == spec.LBA_OUT_OF_RANGE | spec.DNR
    cid = host.cid
    status, page = host.get_log(spec.LOG_ERROR, 128)
    assert status == 0
    assert u64(page, 0) == 1 and u16(page, 8) == 1 and u16(page, 10) == cid     # count, SQID, CID
    assert u16(page, 12) >> 1 == spec.LBA_OUT_OF_RANGE | spec.DNR
    assert u64(page, 16) == 1 << 40 and u32(page, 24) == 1                      # LBA, NSID
    assert u64(page, 64) == 0                                                   # the next entry is empty
    status, smart = host.get_log(spec.LOG_SMART, 512)
    assert u64(smart, 176) == 1                                                 # error log entries


# -- asynchronous events ----------------------------------------------------------------------
def test_invalid_doorbells_raise_error_events(host):
    aer_cid = 0x1000
    host.put(0, sqe(spec.ADMIN_ASYNC_EVENT, aer_cid))
    host.ring(0)
    assert host.completions(0) == []                                           # held until an event
    host.wr(spec.REG_DBS + 8 * 5, 1)                                           # SQ 5 does not exist
    (dw0, _, _, cid, status), = host.completions(0)
    assert (cid, status) == (aer_cid, 0)
    assert (dw0 & 7, dw0 >> 8 & 0xFF, dw0 >> 16 & 0xFF) == (0, 0x00, 0x01)     # error, invalid register, log 01h
    host.put(0, sqe(spec.ADMIN_ASYNC_EVENT, aer_cid + 1))
    host.ring(0)
    host.wr(spec.REG_DBS + 8, 16)                                              # tail 16 of a 16-entry SQ
    assert host.completions(0) == []                                           # error events masked until the log is read
    assert host.get_log(spec.LOG_ERROR, 64, rae=True)[0] == 0
    assert host.completions(0) == []                                           # RAE kept the mask
    host.put(0, sqe(spec.ADMIN_GET_LOG_PAGE, 0x2000, prp1=host.alloc(PAGE), cdw10=spec.LOG_ERROR | (15 << 16)))
    host.ring(0)
    (dw0, _, _, cid, _), (_, _, _, log_cid, status) = host.completions(0)
    assert (log_cid, status) == (0x2000, 0)
    assert cid == aer_cid + 1 and dw0 >> 8 & 0xFF == 0x01                      # invalid doorbell write value
    host.wr(spec.REG_DBS + 4 * 3, 40)                                          # CQ 1 head beyond its size
    assert host.io(spec.NVM_FLUSH) == 0                                        # the write was ignored


def test_cq_head_past_the_tail_is_invalid(host):
    host.put(0, sqe(spec.ADMIN_ASYNC_EVENT, 0x1000))
    host.ring(0)
    assert host.io(spec.NVM_FLUSH) == 0
    host.wr(spec.REG_DBS + 12, 5)                                              # consumes entries never posted
    (dw0, _, _, _, _), = host.completions(0)
    assert dw0 >> 8 & 0xFF == spec.AER_ERROR_INVALID_DB_VALUE
    assert host.io(spec.NVM_FLUSH) == 0                                        # the queue kept its state


def test_aer_limit_and_abort(host):
    for i in range(4):                                                         # AERL 3: four may be outstanding
        host.put(0, sqe(spec.ADMIN_ASYNC_EVENT, 0x100 + i))
    host.ring(0)
    assert host.completions(0) == []
    status, _ = host.admin(spec.ADMIN_ASYNC_EVENT)
    assert status == spec.AER_LIMIT_EXCEEDED
    host.put(0, sqe(spec.ADMIN_ABORT, 0x200, cdw10=0 | (0x102 << 16)))
    host.ring(0)
    done = host.completions(0)
    assert [(c[3], c[4]) for c in done] == [(0x102, spec.ABORT_REQUESTED), (0x200, 0)]
    assert done[1][0] & 1 == 0                                                  # DW0 bit 0 clear: aborted
    assert host.admin(spec.ADMIN_ABORT, cdw10=1 | (0x7777 << 16)) == (0, 1)    # nothing to abort
    assert host.admin(spec.ADMIN_ABORT, cdw10=9)[0] == spec.INVALID_FIELD | spec.DNR


def test_temperature_threshold_raises_a_smart_event(host):
    host.put(0, sqe(spec.ADMIN_ASYNC_EVENT, 0x1000))
    host.ring(0)
    assert host.admin(spec.ADMIN_SET_FEATURES, cdw10=spec.FEAT_TEMP_THRESHOLD, cdw11=300)[0] == 0
    assert host.completions(0) == []                                           # AEC does not ask for it
    assert host.admin(spec.ADMIN_SET_FEATURES, cdw10=spec.FEAT_TEMP_THRESHOLD, cdw11=0x157)[0] == 0
    assert host.admin(spec.ADMIN_SET_FEATURES, cdw10=spec.FEAT_ASYNC_EVENT, cdw11=0x02)[0] == 0
    host.put(0, sqe(spec.ADMIN_SET_FEATURES, 0x2000, cdw10=spec.FEAT_TEMP_THRESHOLD, cdw11=300))
    host.ring(0)
    (dw0, _, _, cid, _), (_, _, _, set_cid, status) = host.completions(0)
    assert (set_cid, status) == (0x2000, 0)
    assert cid == 0x1000 and dw0 == spec.AER_TYPE_SMART | (0x01 << 8) | (0x02 << 16)
    _, smart = host.get_log(spec.LOG_SMART, 512)
    assert smart[0] & spec.SMART_WARN_TEMPERATURE


# -- resets ----------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["cc", "flr", "vfio"])
def test_reset_drops_everything_in_flight(how):
    h = ready_host(inject=[{"kind": "delay", "seconds": 5, "opcodes": ["flush"]}])
    try:
        h.put(0, sqe(spec.ADMIN_ASYNC_EVENT, 0x900))
        h.ring(0)
        h.put(1, sqe(spec.NVM_FLUSH, 7, nsid=1))
        h.ring(1)
        assert h.completions(1) == []                                          # held by the delay rule
        if how == "cc":
            h.wr(spec.REG_CC, 0)
        elif how == "flr":
            exp = h.fn.express.offset
            cfg_write(h.vdev, exp + 8, 2, cfg_read(h.vdev, exp + 8, 2) | 0x8000)
        else:
            ioctl(h.vdev, VFIO_DEVICE_RESET, b"")
        h.fn.complete_pending()                                                 # the delay would have ended here
        assert h.completions(1, consume=False) == [] and h.completions(0, consume=False) == []
        assert h.rd(spec.REG_CSTS) == 0
        if how != "cc":
            assert h.rd(spec.REG_CC) == 0 and h.rd(spec.REG_AQA) == 0
        h.queues.clear()
        h.enable()
        h.create_io_queue(1)
        assert h.admin(spec.ADMIN_GET_FEATURES, cdw10=spec.FEAT_NUM_QUEUES)[0] == 0
    finally:
        h.close()


def test_last_close_resets_the_controller():
    h = ready_host()
    try:
        h.vdev.release()                                                       # the last close resets the function
        assert h.fn.cc == 0 and not h.fn.enabled and h.fn.engine.sqs[0] is None
        h.vdev.open()
    finally:
        h.close()


# -- interrupts ------------------------------------------------------------------------------
def test_msix_one_message_per_batch(host):
    for efd in host.msix:
        efd.take()
    for _ in range(8):
        host.put(1, sqe(spec.NVM_FLUSH, host.next_cid(), nsid=1))
    host.ring(1)
    assert len(host.completions(1)) == 8
    assert host.msix[1].take() == 1 and host.msix[0].take() == 0


def test_intx_level_follows_unconsumed_entries_and_intms():
    h = NvmeHost(msix=False)
    try:
        h.enable()
        intx = h.irq_eventfds(0, 1)[0]
        level = lambda: bool(h.fn.config.get(0x06, 2) & 0x08)                   # PCI_STATUS_INTERRUPT
        assert h.admin(spec.ADMIN_GET_FEATURES, cdw10=spec.FEAT_ARBITRATION)[0] == 0  # consumes its entry
        assert not level() and intx.take() == 1
        h.put(0, sqe(spec.ADMIN_GET_FEATURES, 0x55, cdw10=1))
        h.ring(0)
        assert level()
        h.wr(spec.REG_INTMS, 1)
        assert not level()                                                       # masked
        h.wr(spec.REG_INTMC, 1)
        assert level()
        h.completions(0)                                                         # CQ head doorbell: consumed
        assert not level()
    finally:
        h.close()


def test_msi_masked_by_intms_is_sent_on_intmc():
    h = NvmeHost(msix=False)
    try:
        msi = h.irq_eventfds(1, 1)[0]
        h.enable()
        msi.take()
        h.wr(spec.REG_INTMS, 1)
        h.put(0, sqe(spec.ADMIN_GET_FEATURES, 0x56, cdw10=1))
        h.ring(0)
        assert msi.take() == 0
        h.wr(spec.REG_INTMC, 1)
        assert msi.take() == 1
    finally:
        h.close()


# -- the topology ----------------------------------------------------------------------------
TOML = """
[[device]]
bdf = "0000:00:04.0"
model = "nvme"
group = 4
backing = "{path}"
size = "4M"
lba_size = 4096
namespaces = 2
serial = "TOPO0001"
max_queues = 4

[[device.inject]]
kind = "media-error"
opcodes = ["read"]
lba = [10, 19]
"""


def test_machine_builds_nvme_from_toml(tmp_path):
    path = tmp_path / "nvme0.img"
    machine = Machine(topology.parse(TOML.format(path=path), "<test>"))
    try:
        fn = machine.vdevs["0000:00:04.0"].function
        assert (fn.vendor_id, fn.device_id) == (0x1B36, 0x0010)
        assert [ns.nlbas for ns in fn.namespaces] == [512, 512]
        assert fn.identity.serial == "TOPO0001" and fn.vectors == 5
        assert fn.injector.rules[0].lba == (10, 19)
        assert path.stat().st_size == 4 << 20 and path.stat().st_blocks == 0   # sparse
        view = machine.sysfs_view()
        assert view.read("bus/pci/devices/0000:00:04.0/class") == b"0x010802\n"
    finally:
        machine.close()
    assert fn.backing.closed


@pytest.mark.parametrize("line, message", [
    ('size = "4M"\nlba_size = 1024', "lba_size must be 512 or 4096"),
    ('size = "1000"', "not a whole number of 512-byte LBAs"),
    ('size = "lots"', "is not a size"),
    ('namespaces = 0', "namespaces must be"),
    ('serial = "' + "x" * 21 + '"', "serial must be"),
    ('inject = [{kind = "melt"}]', "kind 'melt' is not one of"),
    ('inject = [{kind = "delay"}]', "seconds must be"),
    ('inject = [{kind = "fatal", opcodes = ["frobnicate"]}]', "unknown command 'frobnicate'"),
    ('inject = [{kind = "media-error", lba = [9, 2]}]', "lba must be [first, last]"),
    ('inject = [{kind = "fatal", seconds = 1}]', "unknown key 'seconds'"),
    ('inject = [{kind = "media-error", opcodes = ["identify"]}]', "media errors are for I/O commands"),
    ('inject = [{kind = "delay", seconds = 1, opcodes = ["io:0x100"]}]', "names no opcode"),
    ('inject = [{kind = "delay", seconds = 1, after = -1}]', "after must be a whole number"),
    ('inject = "everything"', "inject must be a list of tables"),
    ('backing = "/nonexistent-dir/x.img"\nsize = "1M"', "cannot be opened"),
    ('colour = "red"', "has no option colour"),
])
def test_bad_topology_options_are_topology_errors(line, message):
    text = f'[[device]]\nbdf = "0000:00:04.0"\nmodel = "nvme"\ngroup = 4\n{line}\n'
    with pytest.raises(TopologyError) as e:
        Machine(topology.parse(text, "<bad>"))
    assert message in str(e.value) and "0000:00:04.0" in str(e.value)


def test_identify_and_read_through_type1_from_a_client(tmp_path):
    """The whole VFIO flow of a user-space driver (libvfn, SPDK): container, group, MAP_DMA, BAR0, queues."""
    path = tmp_path / "nvme0.img"
    with open(path, "wb") as f:
        f.write(b"\xC3" * 4096 + bytes(1 << 20))
    text = f'[[device]]\nbdf = "0000:00:04.0"\nmodel = "nvme"\ngroup = 4\nbacking = "{path}"\nserial = "TOPO0001"\n'
    machine = Machine(topology.parse(text, "<test>"))
    try:
        p = LocalProcess(machine.dispatcher)
        c, g = p.open("/dev/vfio/vfio"), p.open("/dev/vfio/4")
        p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, struct.pack("<i", c))
        p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
        d = p.ioctl(g, uapi.VFIO_GROUP_GET_DEVICE_FD, b"0000:00:04.0\0")
        config = 7 << 40
        cmd = int.from_bytes(p.pread(d, 2, config + 4), "little")
        p.pwrite(d, (cmd | 0x6).to_bytes(2, "little"), config + 4)                # memory + bus master
        mem, iova = p.memory.alloc(8 * PAGE), 0x40000000
        p.ioctl(c, uapi.VFIO_IOMMU_MAP_DMA, uapi.vfio_iommu_type1_dma_map(
            argsz=32, flags=3, vaddr=mem, iova=iova, size=8 * PAGE))
        wr = lambda off, v: p.pwrite(d, v.to_bytes(4, "little"), off)             # BAR0 is region 0
        rd = lambda off: int.from_bytes(p.pread(d, 4, off), "little")

        def wait(check):
            for _ in range(5000):                                                 # the I/O thread runs it
                value = check()
                if value:
                    return value
                time.sleep(0.001)
            raise AssertionError("the controller did not answer")

        def completion(addr):
            return wait(lambda: (lambda e: e if e[5] & 1 else None)(spec.CQE.unpack(p.memory.read(addr, 16))))

        assert rd(spec.REG_VS) == 0x00010400
        for reg, value in ((spec.REG_AQA, 0x00030003), (spec.REG_ASQ, iova), (spec.REG_ASQ + 4, 0),
                           (spec.REG_ACQ, iova + PAGE), (spec.REG_ACQ + 4, 0), (spec.REG_CC, 0x00460001)):
            wr(reg, value)
        wait(lambda: rd(spec.REG_CSTS) & spec.CSTS_RDY)
        p.memory.write(mem, sqe(spec.ADMIN_IDENTIFY, 7, prp1=iova + 2 * PAGE, cdw10=spec.CNS_CTRL))
        wr(spec.REG_DBS, 1)
        assert completion(mem + PAGE)[4:] == (7, 1)                               # CID 7, success, phase 1
        assert p.memory.read(mem + 2 * PAGE + 4, 8) == b"TOPO0001"
        wr(spec.REG_DBS + 4, 1)
        p.memory.write(mem + 64, sqe(spec.ADMIN_CREATE_CQ, 8, prp1=iova + 3 * PAGE, cdw10=1 | (3 << 16), cdw11=1)
                       + sqe(spec.ADMIN_CREATE_SQ, 9, prp1=iova + 4 * PAGE, cdw10=1 | (3 << 16),
                             cdw11=1 | (1 << 16)))
        wr(spec.REG_DBS, 3)
        assert completion(mem + PAGE + 16)[4:] == (8, 1) and completion(mem + PAGE + 32)[4:] == (9, 1)
        p.memory.write(mem + 4 * PAGE, sqe(spec.NVM_READ, 10, nsid=1, prp1=iova + 5 * PAGE + 0x100,
                                           prp2=iova + 6 * PAGE, cdw12=7))
        wr(spec.REG_DBS + 8, 1)
        assert completion(mem + 3 * PAGE)[4:] == (10, 1)
        assert p.memory.read(mem + 5 * PAGE + 0x100, 4096) == b"\xC3" * 4096
        assert machine.fault_log.total == 0
        p.memory.write(mem + 4 * PAGE + 64, sqe(spec.NVM_READ, 11, nsid=1, prp1=iova + 8 * PAGE, cdw12=7))
        wr(spec.REG_DBS + 8, 2)                                                   # a buffer beyond the mapping
        assert completion(mem + 3 * PAGE + 16)[4:] == (11, spec.DATA_TRANSFER_ERROR << 1 | 1)
        fault, = machine.fault_log.faults()
        assert fault.iova == iova + 8 * PAGE and fault.device == "0000:00:04.0"
    finally:
        machine.close()


def test_linux_6_1_bring_up_and_shutdown_sequence_succeeds_step_by_step():
    """What drivers/nvme/host/{pci,core}.c of 6.1 send, in their order: every step must succeed."""
    h = NvmeHost()
    try:
        assert h.rd(spec.REG_CSTS) != 0xFFFFFFFF                                   # nvme_pci_enable
        cap = h.rd(spec.REG_CAP) | h.rd(spec.REG_CAP + 4) << 32                    # lo_hi_readq
        assert h.rd(spec.REG_CMBSZ) == 0                                           # nvme_map_cmb: no CMB
        h.wr(spec.REG_CC, h.rd(spec.REG_CC) & ~1)                                  # nvme_disable_ctrl
        h.fn.complete_pending()
        assert not h.rd(spec.REG_CSTS) & 1
        q = h.enable(entries=32, cc=1 | (6 << 16) | (4 << 20), ready=False)        # nvme_enable_ctrl
        h.fn.complete_pending()
        assert h.rd(spec.REG_CSTS) == spec.CSTS_RDY and cap >> 24 & 0xFF
        assert h.identify(spec.CNS_CTRL)[0] == 0                                   # nvme_init_identify
        ts = h.alloc(8)
        assert h.admin(spec.ADMIN_SET_FEATURES, cdw10=spec.FEAT_TIMESTAMP, prp1=ts + 0x10)[0] == 0
        assert h.get_log(spec.LOG_SMART, 512, nsid=spec.NSID_BROADCAST)[0] == 0  # nvme_hwmon_init
        assert h.identify(spec.CNS_CS_CTRL, cdw11=spec.CSI_NVM << 24)[0] == 0     # nvme_init_non_mdts_limits
        status, dw0 = h.admin(spec.ADMIN_SET_FEATURES, cdw10=spec.FEAT_NUM_QUEUES, cdw11=(1 << 16) | 1)
        assert status == 0 and dw0 == (1 << 16) | 1                                # 2 I/O queues
        for qid in (1, 2):                                                         # vector = qid
            h.create_io_queue(qid, size=64, vector=qid)
        h.put(0, sqe(spec.ADMIN_ASYNC_EVENT, 31))                                  # NVME_AQ_BLK_MQ_DEPTH
        h.ring(0)
        status, lst = h.identify(spec.CNS_ACTIVE_NS_LIST)                          # nvme_scan_ns_list
        assert status == 0 and u32(lst, 0) == 1
        assert h.identify(spec.CNS_NS, nsid=1)[0] == 0
        assert h.identify(spec.CNS_NS_DESCRIPTORS, nsid=1)[0] == 0
        assert h.io(spec.NVM_READ, slba=0, nlb=8, buf=h.alloc(PAGE)) == 0         # the partition table
        assert h.io(spec.NVM_WRITE_ZEROES, slba=64, nlb=64, cdw12=spec.WZ_DEAC, qid=2) == 0
        assert h.io(spec.NVM_FLUSH, qid=2) == 0
        for qid in (2, 1):                                                         # nvme_disable_io_queues
            assert h.admin(spec.ADMIN_DELETE_SQ, cdw10=qid)[0] == 0
        for qid in (2, 1):
            assert h.admin(spec.ADMIN_DELETE_CQ, cdw10=qid)[0] == 0
        h.wr(spec.REG_CC, h.rd(spec.REG_CC) | (1 << 14))                           # nvme_shutdown_ctrl
        h.fn.complete_pending()
        assert h.rd(spec.REG_CSTS) >> 2 & 3 == spec.SHST_COMPLETE
        assert h.fn.error_log.count == 0 and q.tail
    finally:
        h.close()
