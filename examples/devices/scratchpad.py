"""A second device model, written against the documented API (cuse_vfio.devices.pci).

BAR0: 64 KiB of plain memory, offered for mmap.
BAR2: 4 KiB of registers:
    0x00  DOORBELL (WO)  writing v raises MSI vector v (INTx when MSI is off)
    0x04  RINGS    (RO)  doorbells rung since reset
    0x08  ACK      (WO)  lowers INTx
Load it with ``load_model_file("examples/devices/scratchpad.py")``; topology: ``model = "scratchpad"``.
"""

from cuse_vfio.devices import IrqIndex, MmioBar, MsiCapability, PciDevice, RamBar, register_model

DOORBELL, RINGS, ACK = 0x00, 0x04, 0x08


@register_model("scratchpad")
class Scratchpad(PciDevice):
    vendor_id, device_id = 0x1B36, 0x00F0
    class_code = 0xFF0000
    interrupt_pin = 1
    can_reset = True
    dma_capable = False

    def __init__(self, name=None, **options):
        super().__init__(name, **options)
        self.ram = self.add_bar(0, RamBar(64 * 1024))
        self.add_bar(2, MmioBar(4096, self.regs_read, self.regs_write))
        self.add_capability(MsiCapability(vectors=4, addr64=True))
        self.reset()

    def reset(self):
        self.rings = 0
        self.ram.backing[:] = bytes(self.ram.size)

    def regs_read(self, offset, size):
        return self.rings if offset == RINGS and size == 4 else 0

    def regs_write(self, offset, size, value):
        if offset == DOORBELL and size == 4:
            self.rings += 1
            if self.msi_enabled():
                self.raise_irq(IrqIndex.MSI, value)
            else:
                self.raise_irq(IrqIndex.INTX)
        elif offset == ACK and size == 4:
            self.lower_irq(IrqIndex.INTX)
