"""A second device model, written against the documented API (cuse_vfio.devices.pci).

BAR0: 64 KiB of plain memory, offered for mmap (the client and the model share it).
BAR2: 4 KiB of registers, 4-byte accesses only:
    0x00  DOORBELL  (WO)  writing v raises MSI vector v (INTx when MSI is off)
    0x04  RINGS     (RO)  doorbells rung since reset
    0x08  ACK       (WO)  lowers INTx
    0x0C  DMA_LEN   (RW)  bytes to copy
    0x10  DMA_ADDR  (RW)  IOVA, low 32 bits
    0x14  DMA_ADDR  (RW)  IOVA, high 32 bits
    0x18  DMA_GO    (WO)  1: BAR0[0:DMA_LEN] -> memory at DMA_ADDR; 2: the other way
    0x1C  DMA_STAT  (RO)  0 ok, 1 the IOMMU refused the transfer
Load it with ``--model-file examples/devices/scratchpad.py`` (``load_model_file``);
in a topology: ``model = "scratchpad"``.
"""

from cuse_vfio.devices import IrqIndex, MmioBar, MsiCapability, PciDevice, RamBar, register_model
from cuse_vfio.errors import VfioError

DOORBELL, RINGS, ACK, DMA_LEN, DMA_ADDR_LO, DMA_ADDR_HI, DMA_GO, DMA_STAT = range(0, 0x20, 4)
RAM_SIZE = 64 * 1024


@register_model("scratchpad")
class Scratchpad(PciDevice):
    vendor_id, device_id = 0x1B36, 0x00F0
    class_code = 0xFF0000
    interrupt_pin = 1
    can_reset = True

    def __init__(self, name=None, **options):
        super().__init__(name, **options)
        self.ram = self.add_bar(0, RamBar(RAM_SIZE))
        self.add_bar(2, MmioBar(4096, self.regs_read, self.regs_write))
        self.add_capability(MsiCapability(vectors=4, addr64=True))
        self.reset()

    def reset(self):
        self.rings = 0
        self.dma_len = self.dma_addr = self.dma_stat = 0
        self.ram.backing[:] = bytes(RAM_SIZE)

    # -- registers ----------------------------------------------------------------
    def regs_read(self, offset, size):
        if size != 4:
            return 0
        return {RINGS: self.rings, DMA_LEN: self.dma_len, DMA_ADDR_LO: self.dma_addr & 0xFFFFFFFF,
                DMA_ADDR_HI: self.dma_addr >> 32, DMA_STAT: self.dma_stat}.get(offset, 0)

    def regs_write(self, offset, size, value):
        if size != 4:
            return
        if offset == DOORBELL:
            self.rings += 1
            if self.msi_enabled():
                self.raise_irq(IrqIndex.MSI, value)
            else:
                self.raise_irq(IrqIndex.INTX)
        elif offset == ACK:
            self.lower_irq(IrqIndex.INTX)
        elif offset == DMA_LEN:
            self.dma_len = min(value, RAM_SIZE)
        elif offset == DMA_ADDR_LO:
            self.dma_addr = (self.dma_addr & ~0xFFFFFFFF) | value
        elif offset == DMA_ADDR_HI:
            self.dma_addr = (self.dma_addr & 0xFFFFFFFF) | (value << 32)
        elif offset == DMA_GO and value in (1, 2):
            self.run_dma(value == 1)

    # -- DMA: through the IOMMU, never straight into memory ------------------------------
    def run_dma(self, to_memory):
        try:
            if to_memory:
                self.dma.write(self.dma_addr, bytes(self.ram.backing[:self.dma_len]))
            else:
                self.ram.backing[:self.dma_len] = self.dma.read(self.dma_addr, self.dma_len)
            self.dma_stat = 0
        except VfioError:
            self.dma_stat = 1  # nothing moved; the fault is in the IOMMU's log
