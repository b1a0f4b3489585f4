"""Runs inside a scripts/guest guest: drives the passed-through edu device from
guest user space through the stock uio_pci_generic driver, and prints one
``name=value`` line per observation for tests/test_guest.py.

    python3 tests/guest/edu_uio.py 0000:00:02.0

BAR0 through sysfs resource0 (every access is a trapped BAR access in QEMU,
a pread/pwrite on cuse-vfio's device file), the factorial's INTx through
/dev/uioN (uio_pci_generic), and one DMA each way between edu's buffer and a locked page of
guest RAM (its physical address from /proc/self/pagemap: the guest has no
IOMMU, so that is the bus address QEMU mapped for DMA).
"""

import ctypes
import mmap
import os
import select
import struct
import sys
import time

REG_ID, REG_LIVENESS, REG_FACTORIAL, REG_STATUS = 0x00, 0x04, 0x08, 0x20
REG_IRQ_STATUS, REG_IRQ_ACK = 0x24, 0x64
REG_DMA_SRC, REG_DMA_DST, REG_DMA_COUNT, REG_DMA_CMD = 0x80, 0x88, 0x90, 0x98
STATUS_COMPUTING, STATUS_IRQFACT = 0x01, 0x80
DMA_RUN, DMA_TO_RAM, DMA_IRQ = 0x1, 0x2, 0x4
EDU_BUFFER = 0x40000
DMA_MASK = (1 << 28) - 1     # edu's default: the page must sit below 256 MiB
PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_INTX_DISABLE = 0x04, 0x04, 0x400
WAIT = 30.0                  # a bound for a lost interrupt, never a measurement
PAGE = mmap.PAGESIZE


def say(name, value):
    print("%s=%s" % (name, value), flush=True)


class Edu:
    def __init__(self, bdf):
        self.sysfs = "/sys/bus/pci/devices/" + bdf
        fd = os.open(self.sysfs + "/resource0", os.O_RDWR | os.O_SYNC)
        self.bar = mmap.mmap(fd, 1 << 20)
        os.close(fd)
        # One 4-byte load or store an access (struct.pack_into zeroes its
        # target first: a second store, which would start the factorial on 0).
        self.regs = memoryview(self.bar).cast("I")
        names = os.listdir(self.sysfs + "/uio")
        self.uio = os.open("/dev/" + names[0], os.O_RDWR)

    def read(self, off):
        return self.regs[off // 4]

    def write(self, off, value):
        self.regs[off // 4] = value

    def write64(self, off, value):
        self.write(off, value & 0xFFFFFFFF)
        self.write(off + 4, value >> 32)

    def wait_irq(self):
        """uio_pci_generic masks INTx with the command register's INTx disable
        bit when it fires; clearing the bit unmasks it; a read returns the count."""
        self.command(clear=PCI_COMMAND_INTX_DISABLE)
        ready, _, _ = select.select([self.uio], [], [], WAIT)
        if not ready:
            return -1
        return struct.unpack("<I", os.read(self.uio, 4))[0]

    def command(self, set_=0, clear=0):
        with open(self.sysfs + "/config", "r+b", buffering=0) as f:
            f.seek(PCI_COMMAND)
            cmd = struct.unpack("<H", f.read(2))[0]
            f.seek(PCI_COMMAND)
            f.write(struct.pack("<H", (cmd | set_) & ~clear))


def low_pages(count):
    """``count`` locked pages of this process below edu's DMA mask: [(view, physical address)]."""
    libc = ctypes.CDLL(None, use_errno=True)
    found = []
    area = mmap.mmap(-1, 256 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(area))
    if libc.mlock(ctypes.c_void_p(base), ctypes.c_size_t(len(area))) != 0:
        raise OSError(ctypes.get_errno(), "mlock")
    with open("/proc/self/pagemap", "rb") as pm:
        for i in range(256):
            pm.seek((base // PAGE + i) * 8)
            entry = struct.unpack("<Q", pm.read(8))[0]
            if entry >> 63:
                phys = (entry & ((1 << 55) - 1)) * PAGE
                if phys + PAGE - 1 <= DMA_MASK:
                    found.append((memoryview(area)[i * PAGE:(i + 1) * PAGE], phys))
            if len(found) == count:
                return area, found
    raise RuntimeError("no %d pages below 256 MiB" % count)


def dma(edu, src, dst, count, to_ram):
    edu.write64(REG_DMA_SRC, src)
    edu.write64(REG_DMA_DST, dst)
    edu.write64(REG_DMA_COUNT, count)
    edu.write(REG_DMA_CMD, DMA_RUN | DMA_IRQ | (DMA_TO_RAM if to_ram else 0))
    irqs = edu.wait_irq()
    status = edu.read(REG_IRQ_STATUS)
    edu.write(REG_IRQ_ACK, status)
    return irqs, status


def main(bdf):
    edu = Edu(bdf)
    say("id", "0x%08x" % edu.read(REG_ID))
    edu.write(REG_LIVENESS, 0x12345678)
    say("liveness", "0x%08x" % edu.read(REG_LIVENESS))

    edu.write(REG_STATUS, STATUS_IRQFACT)
    edu.write(REG_FACTORIAL, 10)
    say("fact_irqs", edu.wait_irq())
    deadline = time.monotonic() + WAIT
    while edu.read(REG_STATUS) & STATUS_COMPUTING and time.monotonic() < deadline:
        time.sleep(0.01)
    say("factorial", edu.read(REG_FACTORIAL))
    status = edu.read(REG_IRQ_STATUS)
    say("fact_irq_status", "0x%x" % status)
    edu.write(REG_IRQ_ACK, status)
    edu.write(REG_STATUS, 0)

    edu.command(set_=PCI_COMMAND_MASTER)
    area, [(src, src_phys), (dst, dst_phys)] = low_pages(2)
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(PAGE))
    src[:] = pattern
    dst[:] = bytes(PAGE)
    irqs, status = dma(edu, src_phys, EDU_BUFFER, PAGE, to_ram=False)
    say("dma_in_irq_status", "0x%x" % status)
    irqs, status = dma(edu, EDU_BUFFER, dst_phys, PAGE, to_ram=True)
    say("dma_out_irq_status", "0x%x" % status)
    say("dma_roundtrip", "same" if bytes(dst) == pattern else "different")
    say("irqs", irqs)


if __name__ == "__main__":
    main(sys.argv[1])
