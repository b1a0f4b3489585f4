"""QEMU's educational device, ``edu`` (hw/misc/edu.c, docs/specs/edu.rst).

PCI 1234:11e8, revision 0x10, class 0x00ff00 ("other"), subsystem 1af4:1100
(QEMU's default for a device that names none), INTA, one MSI capability
(1 vector, 64-bit address, no per-vector masking) at 0x40, BAR0: 1 MiB of
32-bit non-prefetchable MMIO registers, conventional PCI (256-byte config).

MMIO accesses as QEMU's memory core and ``edu_mmio_read``/``_write`` see them:
1- and 2-byte accesses are refused by the memory core (read 0, writes
dropped); below 0x80 only 4-byte accesses reach a register (8 bytes read as
all ones); from 0x80 on, 4 or 8 bytes.  A register not in the table reads as
all ones.  No page is a register window (``MmioBar.add_window``): page 0
holds registers whose writes act (liveness, factorial, interrupts, DMA
command), and the rest of the BAR answers by access size and drops writes,
which memory cannot.  Options (topology keys): ``dma_mask`` (default 28
bits, as QEMU), ``fact_delay`` and ``dma_delay`` in seconds (QEMU computes the factorial in a
thread, so COMPUTING is seen set for a moment, and runs a DMA from a 100 ms
timer: the defaults), ``reset`` to offer a function reset that clears the
registers (the kernel finds none for QEMU's edu on q35's root bus, so the
default is no; a reset of the bus it sits on leaves them, as QEMU's),
``bar0_address`` (where firmware put BAR0: SeaBIOS puts it at 0xfea00000 for
an edu alone at 00:02.0 of q35; other layouts move it), ``manual_time``
for tests (nothing deferred runs until ``complete_pending()``).

Differences from QEMU, on purpose: an out-of-range DMA buffer access is
logged and skipped (QEMU logs, then overruns its buffer); a DMA with bus
mastering off moves nothing and is recorded as a fault (QEMU reads zeros).
"""

from __future__ import annotations

import logging

from ..errors import VfioError
from .pci import IrqIndex, MmioBar, MsiCapability, PciDevice
from .registry import register_model

log = logging.getLogger(__name__)

EDU_ID = 0x010000ED            # 0xRRrr00ed: version 1.0

# -- the MMIO area ------------------------------------------------------------
REG_ID = 0x00                  # RO  identification
REG_LIVENESS = 0x04            # RW  reads back ~(last write)
REG_FACTORIAL = 0x08           # RW  write n: n! appears here when COMPUTING clears
REG_STATUS = 0x20              # RW  COMPUTING (RO) | IRQFACT
REG_IRQ_STATUS = 0x24          # RO  what raised the interrupt
REG_IRQ_RAISE = 0x60           # WO  ORed into IRQ status, raises the interrupt
REG_IRQ_ACK = 0x64             # WO  cleared from IRQ status, lowers INTx at 0
REG_DMA_SRC = 0x80             # RW  64-bit
REG_DMA_DST = 0x88             # RW  64-bit
REG_DMA_COUNT = 0x90           # RW  64-bit
REG_DMA_CMD = 0x98             # RW  RUN | TO_RAM | IRQ

STATUS_COMPUTING = 0x01
STATUS_IRQFACT = 0x80
FACT_IRQ = 0x00000001
DMA_IRQ = 0x00000100
DMA_RUN = 0x1
DMA_TO_RAM = 0x2               # direction: set = device buffer -> RAM
DMA_IRQ_WHEN_DONE = 0x4

BAR0_ADDRESS = 0xFEA00000      # where SeaBIOS places the 1 MiB BAR of a lone edu at 00:02.0 on q35

DMA_START = 0x40000            # the device buffer, as DMA addresses name it
DMA_SIZE = 4096

U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1


@register_model("edu")
class Edu(PciDevice):
    vendor_id = 0x1234
    device_id = 0x11E8
    revision = 0x10
    class_code = 0x00FF00
    subsystem_vendor_id = 0x1AF4   # PCI_SUBVENDOR_ID_REDHAT_QUMRANET
    subsystem_id = 0x1100          # PCI_SUBDEVICE_ID_QEMU
    interrupt_pin = 1
    # What the reference machine (QEMU q35 + SeaBIOS, edu at 00:02.0) shows:
    # QEMU's command wmask, the command bits SeaBIOS sets, the IRQ it routes INTA
    # to, and where it puts BAR0 (BAR0_ADDRESS).
    command_wmask = 0x0001 | 0x0002 | 0x0004 | 0x0100 | 0x0400  # IO MEMORY MASTER SERR INTX_DISABLE
    firmware_command = 0x0001 | 0x0002 | 0x0100                  # IO MEMORY SERR
    interrupt_line = 11

    # offset: (name, reader, writer); None = the access does nothing
    REGISTERS = {
        REG_ID: ("identification", "_read_id", None),
        REG_LIVENESS: ("liveness", "_read_liveness", "_write_liveness"),
        REG_FACTORIAL: ("factorial", "_read_factorial", "_write_factorial"),
        REG_STATUS: ("status", "_read_status", "_write_status"),
        REG_IRQ_STATUS: ("irq status", "_read_irq_status", None),
        REG_IRQ_RAISE: ("irq raise", None, "_write_irq_raise"),
        REG_IRQ_ACK: ("irq acknowledge", None, "_write_irq_ack"),
        REG_DMA_SRC: ("dma source", "_read_dma_src", "_write_dma_src"),
        REG_DMA_DST: ("dma destination", "_read_dma_dst", "_write_dma_dst"),
        REG_DMA_COUNT: ("dma count", "_read_dma_count", "_write_dma_count"),
        REG_DMA_CMD: ("dma command", "_read_dma_cmd", "_write_dma_cmd"),
    }

    def __init__(self, name=None, *, dma_mask: int = (1 << 28) - 1, fact_delay: float = 0.001,
                 dma_delay: float = 0.1, reset: bool = False, bar0_address: int = BAR0_ADDRESS, **options):
        super().__init__(name, **options)
        self.dma_mask = int(dma_mask)
        self.fact_delay = float(fact_delay)
        self.dma_delay = float(dma_delay)
        self.can_reset = bool(reset)
        if not isinstance(bar0_address, int) or isinstance(bar0_address, bool):
            raise ValueError(f"bar0_address {bar0_address!r} is not an address")
        self.add_bar(0, MmioBar(1 << 20, self.mmio_read, self.mmio_write), address=bar0_address)
        self.add_capability(MsiCapability(vectors=1, addr64=True))
        self.dma_buf = bytearray(DMA_SIZE)
        self._power_on()

    def reset(self) -> None:
        """QEMU's edu has no reset handler: a reset of its bus clears what the PCI core owns
        (config space, MSI, INTx; see PciDevice.reset_function) and leaves its registers and
        DMA buffer as they were.  With the ``reset`` option its device-specific function
        reset (which QEMU's edu does not have) clears them, as any reset of it then does."""
        if self.can_reset:
            self._power_on()

    def _power_on(self) -> None:
        self.addr4 = 0
        self.fact = 0
        self.status = 0
        self.irq_status = 0
        self.dma_src = self.dma_dst = self.dma_cnt = self.dma_cmd = 0
        self.dma_buf[:] = bytes(DMA_SIZE)

    # -- access rules -----------------------------------------------------------
    def mmio_read(self, addr: int, size: int) -> int:
        if size not in (4, 8):
            return 0  # refused by QEMU's memory core (valid.min_access_size = 4)
        ones = (1 << (8 * size)) - 1
        if addr < 0x80 and size != 4:
            return ones
        reader = self.REGISTERS.get(addr, (None, None, None))[1]
        return getattr(self, reader)() & ones if reader else ones

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        if size not in (4, 8) or (addr < 0x80 and size != 4):
            return
        writer = self.REGISTERS.get(addr, (None, None, None))[2]
        if writer:
            getattr(self, writer)(value)

    # -- identification, liveness ---------------------------------------------------
    def _read_id(self) -> int:
        return EDU_ID

    def _read_liveness(self) -> int:
        return self.addr4

    def _write_liveness(self, value: int) -> None:
        self.addr4 = ~value & U32

    # -- factorial (QEMU computes it in a thread: the status bit shows the wait) --------
    def _read_factorial(self) -> int:
        return self.fact

    def _write_factorial(self, value: int) -> None:
        if self.status & STATUS_COMPUTING:
            return
        self.fact = value & U32
        self.status |= STATUS_COMPUTING
        self.call_later(self.fact_delay, self._factorial_done)

    def _factorial_done(self) -> None:
        n, result = self.fact, 1
        if n >= 34:
            result = 0  # 34! holds 2**32: the 32-bit product QEMU computes is 0 from here on
        else:
            while n > 0:
                result = (result * n) & U32
                n -= 1
        self.fact = result
        self.status &= ~STATUS_COMPUTING
        if self.status & STATUS_IRQFACT:
            self._raise_irq(FACT_IRQ)

    def _read_status(self) -> int:
        return self.status

    def _write_status(self, value: int) -> None:
        if value & STATUS_IRQFACT:
            self.status |= STATUS_IRQFACT
        else:
            self.status &= ~STATUS_IRQFACT

    # -- interrupts ----------------------------------------------------------------------
    def _read_irq_status(self) -> int:
        return self.irq_status

    def _write_irq_raise(self, value: int) -> None:
        self._raise_irq(value & U32)

    def _write_irq_ack(self, value: int) -> None:
        self._lower_irq(value & U32)

    def _raise_irq(self, bits: int) -> None:
        """edu_raise_irq: MSI when the host enabled it, else the INTx level."""
        self.irq_status |= bits
        if self.irq_status:
            if self.msi_enabled():
                self.raise_irq(IrqIndex.MSI, 0)
            else:
                self.raise_irq(IrqIndex.INTX)

    def _lower_irq(self, bits: int) -> None:
        self.irq_status &= ~bits
        if not self.irq_status and not self.msi_enabled():
            self.lower_irq(IrqIndex.INTX)

    # -- DMA (QEMU runs it from a timer; the registers are frozen while it runs) ---------
    def _read_dma_src(self) -> int:
        return self.dma_src

    def _read_dma_dst(self) -> int:
        return self.dma_dst

    def _read_dma_count(self) -> int:
        return self.dma_cnt

    def _read_dma_cmd(self) -> int:
        return self.dma_cmd

    # A 4-byte write replaces the whole 64-bit field (edu.c's dma_rw stores the access value).
    def _write_dma_src(self, value: int) -> None:
        if not self.dma_cmd & DMA_RUN:
            self.dma_src = value & U64

    def _write_dma_dst(self, value: int) -> None:
        if not self.dma_cmd & DMA_RUN:
            self.dma_dst = value & U64

    def _write_dma_count(self, value: int) -> None:
        if not self.dma_cmd & DMA_RUN:
            self.dma_cnt = value & U64

    def _write_dma_cmd(self, value: int) -> None:
        if not value & DMA_RUN or self.dma_cmd & DMA_RUN:
            return
        self.dma_cmd = value & U64
        self.call_later(self.dma_delay, self._dma_done)

    def _dma_done(self) -> None:
        if not self.dma_cmd & DMA_RUN:
            return
        to_ram = bool(self.dma_cmd & DMA_TO_RAM)
        buf_addr = self.dma_src if to_ram else self.dma_dst
        count = self.dma_cnt
        if not (buf_addr >= DMA_START and buf_addr + count <= DMA_START + DMA_SIZE):
            log.warning("%s: DMA range 0x%x+0x%x is outside the device buffer 0x%x-0x%x: skipped",
                        self.name, buf_addr, count, DMA_START, DMA_START + DMA_SIZE - 1)
        elif count:
            self._dma_transfer(to_ram, buf_addr - DMA_START, count)
        self.dma_cmd &= ~DMA_RUN
        if self.dma_cmd & DMA_IRQ_WHEN_DONE:
            self._raise_irq(DMA_IRQ)

    def _dma_transfer(self, to_ram: bool, buf_off: int, count: int) -> None:
        ram = self.dma_dst if to_ram else self.dma_src
        iova = ram & self.dma_mask
        if iova != ram:
            log.warning("%s: clamping DMA 0x%x to 0x%x (dma_mask 0x%x)", self.name, ram, iova, self.dma_mask)
        try:
            if to_ram:
                self.dma.write(iova, bytes(self.dma_buf[buf_off:buf_off + count]))
            else:
                self.dma_buf[buf_off:buf_off + count] = self.dma.read(iova, count)
        except VfioError as e:
            # The transfer did not happen; like QEMU the command still completes.
            log.warning("%s: DMA failed: %s", self.name, e.strerror)
