"""A small NVMe host driver for the in-process tests: queues in a FakeDmaSpace, commands through vfio-pci.

It does what a driver does, step by step, so each test can stop where it
wants to look: place queues in host memory, enable the controller, ring
doorbells, read completions by their phase tag.
"""

import struct
import time

from cuse_vfio.devices import VfioPciDevice, create_model
from cuse_vfio.devices.nvme import spec
from cuse_vfio.uapi import VFIO_DEVICE_SET_IRQS, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD
from devices_fakes import FakeCaller, FakeDmaSpace, bar_read, bar_write, enable_master, fds, ioctl, irq_set

BDF = "0000:00:04.0"
MEM = 0x100000          # the host's DMA-mapped memory, one window
MEM_SIZE = 16 << 20
PAGE = 4096
TRIGGER_EFD = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER


def sqe(opcode, cid=0, nsid=0, prp1=0, prp2=0, cdw10=0, cdw11=0, cdw12=0, cdw13=0, cdw14=0, cdw15=0, flags=0):
    return spec.SQE.pack(opcode, flags, cid, nsid, 0, 0, prp1, prp2, cdw10, cdw11, cdw12, cdw13, cdw14, cdw15)


class CountingDmaSpace(FakeDmaSpace):
    """A FakeDmaSpace that counts transfers, to check batching and coalescing."""

    def __init__(self):
        super().__init__()
        self.reads = []
        self.writes = []

    def dma_read(self, iova, size, device=None):
        self.reads.append((iova, size))
        return super().dma_read(iova, size, device)

    def dma_write(self, iova, data, device=None):
        self.writes.append((iova, len(data)))
        return super().dma_write(iova, data, device)


class Queue:
    def __init__(self, qid, sq_base, cq_base, size, cq_size=None):
        self.qid = qid
        self.sq_base, self.cq_base = sq_base, cq_base
        self.size = size
        self.cq_size = cq_size or size
        self.tail = 0
        self.cq_head = 0
        self.phase = 1


class NvmeHost:
    def __init__(self, msix=True, **options):
        options.setdefault("manual_time", True)
        self.fn = create_model("nvme", name=BDF, **options)
        self.space = CountingDmaSpace()
        self.mem = self.space.map(MEM, MEM_SIZE)
        self.vdev = VfioPciDevice(self.fn, dma_space=self.space)
        self.vdev.open()
        enable_master(self.vdev)
        self._next = MEM
        self.queues = {}
        self.cid = 0
        self.msix = None
        if msix:
            self.msix = self.irq_eventfds(2, self.fn.vectors)

    def close(self):
        self.vdev.release()
        self.fn.shutdown()

    # -- memory -------------------------------------------------------------------------
    def alloc(self, size, align=PAGE):
        addr = -(-self._next // align) * align
        self._next = addr + size
        assert self._next <= MEM + MEM_SIZE, "test host memory exhausted"
        return addr

    def read(self, iova, size):
        return bytes(self.mem[iova - MEM:iova - MEM + size])

    def write(self, iova, data):
        self.mem[iova - MEM:iova - MEM + len(data)] = data

    # -- registers ----------------------------------------------------------------------
    def rd(self, off, size=4):
        return bar_read(self.vdev, 0, off, size)

    def wr(self, off, value, size=4):
        bar_write(self.vdev, 0, off, size, value)

    def irq_eventfds(self, index, count):
        caller = FakeCaller()
        efds = [caller.eventfd() for _ in range(count)]
        ioctl(self.vdev, VFIO_DEVICE_SET_IRQS,
              irq_set(flags=TRIGGER_EFD, index=index, count=count, data=fds(*[fd for fd, _ in efds])), caller)
        return [efd for _, efd in efds]

    # -- bring-up -----------------------------------------------------------------------
    def enable(self, entries=32, cc=None, ready=True):
        sq, cq = self.alloc(entries * 64), self.alloc(entries * 16)
        self.wr(spec.REG_AQA, (entries - 1) | ((entries - 1) << 16))
        self.wr(spec.REG_ASQ, sq, 8)
        self.wr(spec.REG_ACQ, cq, 8)
        self.wr(spec.REG_CC, cc if cc is not None else (1 | (6 << 16) | (4 << 20)))
        if ready:
            self.fn.complete_pending()
            assert self.rd(spec.REG_CSTS) & spec.CSTS_RDY
        self.queues[0] = Queue(0, sq, cq, entries)
        return self.queues[0]

    def create_io_queue(self, qid, size=16, cq_size=None, vector=None, ien=True):
        cq_size = cq_size or size
        cq_base, sq_base = self.alloc(cq_size * 16), self.alloc(size * 64)
        vector = qid if vector is None else vector
        flags = spec.QUEUE_PHYS_CONTIG | (spec.CQ_IRQ_ENABLED if ien else 0)
        assert self.admin(spec.ADMIN_CREATE_CQ, prp1=cq_base, cdw10=qid | ((cq_size - 1) << 16),
                          cdw11=flags | (vector << 16))[0] == 0
        assert self.admin(spec.ADMIN_CREATE_SQ, prp1=sq_base, cdw10=qid | ((size - 1) << 16),
                          cdw11=spec.QUEUE_PHYS_CONTIG | (qid << 16))[0] == 0
        self.queues[qid] = Queue(qid, sq_base, cq_base, size, cq_size)
        return self.queues[qid]

    # -- commands -----------------------------------------------------------------------
    def next_cid(self):
        self.cid = (self.cid + 1) & 0xFFFF
        return self.cid

    def put(self, qid, entry):
        """Place one SQE at the tail (no doorbell)."""
        q = self.queues[qid]
        self.write(q.sq_base + q.tail * 64, entry)
        q.tail = (q.tail + 1) % q.size

    def ring(self, qid):
        self.wr(spec.REG_DBS + 8 * qid, self.queues[qid].tail)

    def completions(self, qid, consume=True):
        """New CQEs (by phase tag) as (dw0, sq head, sq id, cid, status without phase); rings the CQ head doorbell."""
        q = self.queues[qid]
        out = []
        head, phase = q.cq_head, q.phase
        while True:
            dw0, dw1, sqhd, sqid, cid, sf = spec.CQE.unpack(self.read(q.cq_base + head * 16, 16))
            if sf & 1 != phase:
                break
            out.append((dw0, sqhd, sqid, cid, sf >> 1))
            head += 1
            if head == q.cq_size:
                head, phase = 0, phase ^ 1
        if consume and out:
            q.cq_head, q.phase = head, phase
            self.wr(spec.REG_DBS + 8 * qid + 4, head)
        return out

    def submit(self, qid, opcode, **fields):
        """One command, doorbell, and its completion: (status, dw0, cqe)."""
        cid = fields.pop("cid", None)
        cid = self.next_cid() if cid is None else cid
        self.put(qid, sqe(opcode, cid, **fields))
        self.ring(qid)
        done = self.completions(qid)
        deadline = time.monotonic() + 10
        while not done and self.fn._io is not None and time.monotonic() < deadline:
            time.sleep(0.002)                # the I/O thread runs it: wait as a polling driver would
            done = self.completions(qid)
        assert len(done) == 1, f"expected one completion, got {done}"
        assert done[0][3] == cid
        return done[0][4], done[0][0], done[0]

    def admin(self, opcode, **fields):
        status, dw0, _ = self.submit(0, opcode, **fields)
        return status, dw0

    def identify(self, cns, nsid=0, cdw11=0):
        buf = self.alloc(PAGE)
        status, _ = self.admin(spec.ADMIN_IDENTIFY, nsid=nsid, prp1=buf, cdw10=cns, cdw11=cdw11)
        return status, self.read(buf, PAGE)

    def io(self, opcode, slba=0, nlb=1, nsid=1, buf=None, qid=1, prp2=0, cdw12=0, **fields):
        prp1 = buf if buf is not None else self.alloc(nlb * 512)
        return self.submit(qid, opcode, nsid=nsid, prp1=prp1, prp2=prp2, cdw10=slba & 0xFFFFFFFF,
                           cdw11=slba >> 32, cdw12=(nlb - 1) | cdw12, **fields)[0]

    def get_log(self, lid, length, nsid=0, offset=0, rae=False):
        buf = self.alloc(length)
        numd = length // 4 - 1
        status, _ = self.admin(spec.ADMIN_GET_LOG_PAGE, nsid=nsid, prp1=buf,
                               prp2=(buf + PAGE) if length > PAGE else 0,
                               cdw10=lid | (rae << 15) | ((numd & 0xFFFF) << 16), cdw11=numd >> 16,
                               cdw12=offset & 0xFFFFFFFF, cdw13=offset >> 32)
        return status, self.read(buf, length)


def ready_host(io_queues=1, queue_size=16, **options):
    """A host with the controller enabled and ``io_queues`` I/O queue pairs of ``queue_size`` entries."""
    host = NvmeHost(**options)
    host.enable()
    for qid in range(1, io_queues + 1):
        host.create_io_queue(qid, queue_size)
    return host


def u16(data, off):
    return struct.unpack_from("<H", data, off)[0]


def u32(data, off):
    return struct.unpack_from("<I", data, off)[0]


def u64(data, off):
    return struct.unpack_from("<Q", data, off)[0]
