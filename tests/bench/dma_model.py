"""``dma-bench``: a model that only does DMA, so scripts/bench can time a model's copies of client memory.

Loaded with ``--model-file tests/bench/dma_model.py``.  Each copy takes the
path every model's DMA takes: ``self.dma`` (the bus-master check), the
container's type1 IOMMU (translation, permissions), the image of the client's
memory and the C copier.  One GO write runs COUNT copies at once, inside
the write, so a command costs one trapped BAR write plus COUNT copies, and
the copies dominate.

BAR0 (4 KiB of 4-byte registers):
    0x00  IOVA     (RW)  where in the IOVA space the copies go, low 32 bits
    0x04  IOVA     (RW)  high 32 bits
    0x08  SIZE     (RW)  bytes a copy (up to 1 MiB)
    0x0C  COUNT    (RW)  copies a command
    0x10  SEGMENT  (RW)  0: each copy is one transfer (read/write); else a scatter
                         list of SIZE / SEGMENT entries of SEGMENT bytes (readv/writev)
    0x14  GO       (WO)  1: memory -> the model (DMA read); 2: the model -> memory (DMA write)
    0x18  DONE     (RO)  copies completed since reset; a refused copy is not
                         counted (its fault is in the IOMMU's log)
"""

from cuse_vfio.devices import MmioBar, PciDevice, register_model
from cuse_vfio.errors import VfioError

IOVA_LO, IOVA_HI, SIZE, COUNT, SEGMENT, GO, DONE = range(0, 0x1C, 4)
GO_READ, GO_WRITE = 1, 2
MAX_SIZE = 1 << 20


@register_model("dma-bench")
class DmaBench(PciDevice):
    vendor_id, device_id = 0x1B36, 0x00F2
    class_code = 0xFF0000

    def __init__(self, name=None, **options):
        super().__init__(name, **options)
        self.add_bar(0, MmioBar(4096, self.regs_read, self.regs_write))
        self.reset()

    def reset(self):
        self.iova = self.size = self.count = self.segment = self.done = 0
        self.last = b""  # what the last DMA read brought in (a model keeps what it reads)
        self.out = b""   # what DMA writes send (made once a size, not a copy)

    def regs_read(self, offset, size):
        if size != 4:
            return 0
        return {IOVA_LO: self.iova & 0xFFFFFFFF, IOVA_HI: self.iova >> 32, SIZE: self.size, COUNT: self.count,
                SEGMENT: self.segment, DONE: self.done & 0xFFFFFFFF}.get(offset, 0)

    def regs_write(self, offset, size, value):
        if size != 4:
            return
        if offset == IOVA_LO:
            self.iova = (self.iova & ~0xFFFFFFFF) | value
        elif offset == IOVA_HI:
            self.iova = (self.iova & 0xFFFFFFFF) | (value << 32)
        elif offset == SIZE:
            self.size = min(value, MAX_SIZE)
        elif offset == COUNT:
            self.count = value
        elif offset == SEGMENT:
            self.segment = value
        elif offset == GO and value in (GO_READ, GO_WRITE):
            self.run(value == GO_WRITE)

    def run(self, to_memory):
        size, seg = self.size, self.segment
        segments = [(self.iova + pos, min(seg, size - pos)) for pos in range(0, size, seg)] if seg else None
        if to_memory and len(self.out) != size:
            self.out = bytes(size)
        data = self.out if to_memory else None
        dma = self.dma
        for _ in range(self.count):
            try:
                if segments is None:
                    if data is None:
                        self.last = dma.read(self.iova, size)
                    else:
                        dma.write(self.iova, data)
                elif data is None:
                    self.last = dma.readv(segments)
                else:
                    dma.writev(segments, data)
            except VfioError:
                return
            self.done += 1
