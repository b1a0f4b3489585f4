"""The PCI function itself (:class:`PciDevice`): identity, BARs, capabilities, interrupts, reset, deferred work."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, List, Optional

from .bars import Bar, Rom
from .caps import Capability, ExpressCapability, MsiCapability, MsixCapability, PmCapability
from .config import ConfigSpace
from .dma import DmaPort
from .irq import IrqIndex, IrqSink
from .regs import (
    PCI_BASE_ADDRESS_0,
    PCI_CACHE_LINE_SIZE,
    PCI_CAP_LIST_ID,
    PCI_CAP_LIST_NEXT,
    PCI_CAPABILITY_LIST,
    PCI_CFG_SPACE_EXP_SIZE,
    PCI_CFG_SPACE_SIZE,
    PCI_CLASS_PROG,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_IO,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_COMMAND_PARITY,
    PCI_COMMAND_SERR,
    PCI_D0,
    PCI_D3HOT,
    PCI_DEVICE_ID,
    PCI_HEADER_TYPE,
    PCI_HEADER_TYPE_MULTI_FUNCTION,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_LATENCY_TIMER,
    PCI_REVISION_ID,
    PCI_ROM_ADDRESS,
    PCI_ROM_ADDRESS_ENABLE,
    PCI_ROM_ADDRESS_MASK,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_STATUS_INTERRUPT,
    PCI_STATUS_RW1C,
    PCI_STD_HEADER_SIZEOF,
    PCI_STD_NUM_BARS,
    PCI_SUBSYSTEM_ID,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
)

log = logging.getLogger(__name__)


def _flag_byte(reg: int, flag: int):
    """A one-bit flag of a little-endian config register: (the byte holding it, its mask there)."""
    shift = (flag.bit_length() - 1) // 8
    return reg + shift, flag >> 8 * shift


#: the INTx bits of config space, read and set byte-wise on the interrupt path
_INTR_AT, _INTR_BIT = _flag_byte(PCI_STATUS, PCI_STATUS_INTERRUPT)
_INTX_DISABLE_AT, _INTX_DISABLE_BIT = _flag_byte(PCI_COMMAND, PCI_COMMAND_INTX_DISABLE)


# -- deferred work ---------------------------------------------------------------
class DeferredWork:
    """Work a device does later (QEMU's edu computes in a thread and DMAs on a timer).

    With ``manual`` nothing runs until :meth:`run_pending`; otherwise each item
    runs on a timer thread after its delay.  Either way :meth:`run_pending`
    runs what is still waiting, now and in order, so tests are deterministic.
    Every item runs under the device lock.
    """

    def __init__(self, lock, manual: bool = False):
        self._lock = lock
        self.manual = manual
        self._items: List[list] = []  # [callback, timer, done]

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        item: List[Any] = [fn, None, False]  # fn, its timer, whether it ran
        with self._lock:
            self._items.append(item)
        if not self.manual:
            timer = threading.Timer(max(0.0, delay), self._run, (item,))
            timer.daemon = True
            item[1] = timer
            timer.start()

    def pending(self) -> int:
        with self._lock:
            return sum(1 for item in self._items if not item[2])

    def run_pending(self) -> None:
        while True:
            with self._lock:
                item = next((i for i in self._items if not i[2]), None)
                if item is None:
                    return
                self._run(item)

    def cancel_all(self) -> None:
        with self._lock:
            for item in self._items:
                item[2] = True
                if item[1] is not None:
                    item[1].cancel()
            self._items.clear()

    def _run(self, item: list) -> None:
        with self._lock:
            if item[2]:
                return
            item[2] = True
            if item[1] is not None:
                item[1].cancel()
            self._items.remove(item)
            try:
                item[0]()
            except Exception:
                log.exception("deferred work of a device model failed; the device keeps going")


# -- the function ----------------------------------------------------------------
_BAR_BASES = {"io": 0xC000, "mem32": 0xC0000000, "mem64": 0x80_0000_0000}


class PciDevice:
    """One PCI function (type-0 header).  Subclass it to write a device model."""

    #: the name it is registered under (set by ``register_model``)
    model_name: str
    vendor_id = 0xFFFF
    device_id = 0xFFFF
    subsystem_vendor_id = 0
    subsystem_id = 0
    revision = 0
    #: 24-bit class code: base class, sub-class, programming interface
    class_code = 0xFF0000
    #: 1..4 for INTA..INTD, 0 for no INTx
    interrupt_pin = 0
    #: the function can be reset on its own (VFIO_DEVICE_RESET is offered)
    can_reset = False
    #: the function implements the bus-master bit (it does DMA)
    dma_capable = True
    #: vfio-pci offers the BARs' windows (``MmioBar.add_window``) for mmap, as sparse mmap areas;
    #: a topology entry's ``mmap_windows`` overrides it.  Off, the windows are still memory, reached by
    #: pread/pwrite only.
    mmap_windows = True
    #: writable bits of the command register; None: what the function implements
    #: (I/O and memory decode for its BAR types, bus master when ``dma_capable``,
    #: parity, SERR, INTx disable).  QEMU's devices make IO|MEMORY|MASTER|SERR|INTX_DISABLE
    #: writable whatever their BARs (``pci_init_wmask``).
    command_wmask: Optional[int] = None
    #: command bits the platform firmware set at boot (SeaBIOS: IO | MEMORY | SERR)
    firmware_command = 0
    #: the Interrupt Line register as firmware left it (the IRQ INTx is routed to)
    interrupt_line = 0

    def __init__(self, name: Optional[str] = None, *, manual_time: bool = False, **options):
        if options:
            raise TypeError(f"device model {type(self).__name__} has no option {', '.join(sorted(options))}")
        self.name = name or type(self).__name__
        #: serializes register handlers, config accesses and deferred work
        self.lock = threading.RLock()
        self.deferred = DeferredWork(self.lock, manual=manual_time)
        self.dma = DmaPort(self)
        self.bars: List[Optional[Bar]] = [None] * PCI_STD_NUM_BARS
        self.rom: Optional[Rom] = None
        self.capabilities: List[Capability] = []
        self.msi: Optional[MsiCapability] = None
        self.msix: Optional[MsixCapability] = None
        self.pm: Optional[PmCapability] = None
        self.express: Optional[ExpressCapability] = None
        self.power_state = PCI_D0
        self.config = ConfigSpace(PCI_CFG_SPACE_SIZE)
        self._intx_level = False
        self._intx_out = False
        #: where interrupts go (an :class:`IrqSink`; vfio-pci sets it)
        self.irq_sink: Optional[IrqSink] = None
        self._next_addr = dict(_BAR_BASES)
        self._build_header()

    # -- building -------------------------------------------------------------
    def _build_header(self) -> None:
        c = self.config
        c.init(PCI_VENDOR_ID, 2, self.vendor_id)
        c.init(PCI_DEVICE_ID, 2, self.device_id)
        c.on_write(PCI_COMMAND, 2, self._update_intx)
        c.init(PCI_COMMAND, 2, 0, wmask=self._command_wmask())
        c.init(PCI_STATUS, 2, 0, w1c=PCI_STATUS_RW1C)
        c.init(PCI_REVISION_ID, 1, self.revision)
        c.init(PCI_CLASS_PROG, 3, self.class_code)
        c.init(PCI_CACHE_LINE_SIZE, 1, 0, wmask=0xFF)
        c.init(PCI_LATENCY_TIMER, 1, 0, wmask=0xFF)
        c.init(PCI_HEADER_TYPE, 1, 0)
        c.init(PCI_SUBSYSTEM_VENDOR_ID, 2, self.subsystem_vendor_id)
        c.init(PCI_SUBSYSTEM_ID, 2, self.subsystem_id)
        c.init(PCI_INTERRUPT_LINE, 1, 0, wmask=0xFF)
        c.init(PCI_INTERRUPT_PIN, 1, self.interrupt_pin)

    def set_multifunction(self) -> None:
        """Function 0 of a device with more functions: bit 7 of the header type says so
        (QEMU's ``multifunction=on``); the kernel's scan looks for functions 1-7 only then."""
        self.config.init(PCI_HEADER_TYPE, 1, PCI_HEADER_TYPE_MULTI_FUNCTION)

    def _command_wmask(self) -> int:
        if self.command_wmask is not None:
            return self.command_wmask
        mask = PCI_COMMAND_PARITY | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE
        if any(b is not None and b.io for b in self.bars):
            mask |= PCI_COMMAND_IO
        if any(b is not None and not b.io for b in self.bars) or self.rom is not None:
            mask |= PCI_COMMAND_MEMORY
        if self.dma_capable:
            mask |= PCI_COMMAND_MASTER
        return mask

    def _assign(self, size: int, kind: str) -> int:
        # What firmware enumeration would do: naturally aligned, increasing addresses.
        addr = (self._next_addr[kind] + size - 1) & ~(size - 1)
        self._next_addr[kind] = addr + size
        return addr

    def add_bar(self, index: int, bar: Bar, address: Optional[int] = None) -> Bar:
        """Implement BAR ``index``; a 64-bit BAR also takes ``index + 1``.

        ``address`` is where enumeration places it (naturally aligned); by
        default the next free address of its kind.
        """
        if not 0 <= index < PCI_STD_NUM_BARS or self.bars[index] is not None:
            raise ValueError(f"BAR{index} is out of range or already used")
        if bar.bits64 and (index == PCI_STD_NUM_BARS - 1 or self.bars[index + 1] is not None):
            raise ValueError(f"64-bit BAR{index} needs BAR{index + 1} free")
        lower = self.bars[index - 1] if index > 0 else None
        if lower is not None and lower.bits64 and lower is not bar:
            raise ValueError(f"BAR{index} is the upper half of 64-bit BAR{index - 1}")
        self.bars[index] = bar
        if address is not None:
            if address % bar.size or not address or address >> (64 if bar.bits64 else 32):
                raise ValueError(f"BAR{index} address {address:#x} is not a naturally aligned "
                                 f"{'64' if bar.bits64 else '32'}-bit address")
            bar.address = address
        else:
            bar.address = self._assign(bar.size, "io" if bar.io else ("mem64" if bar.bits64 else "mem32"))
        reg = PCI_BASE_ADDRESS_0 + 4 * index
        low_mask = 0x3 if bar.io else 0xF
        mask = ~(bar.size - 1)
        self.config.init(reg, 4, (bar.address & 0xFFFFFFFF & ~low_mask) | bar.type_bits(),
                         wmask=mask & 0xFFFFFFFF & ~low_mask)
        if bar.bits64:
            self.config.init(reg + 4, 4, bar.address >> 32, wmask=(mask >> 32) & 0xFFFFFFFF)
        self.config.init(PCI_COMMAND, 2, self.config.get(PCI_COMMAND, 2), wmask=self._command_wmask())
        return bar

    def set_rom(self, rom: Rom) -> Rom:
        self.rom = rom
        rom.address = self._assign(rom.size, "mem32")
        self.config.init(PCI_ROM_ADDRESS, 4, rom.address,
                         wmask=(~(rom.size - 1) & PCI_ROM_ADDRESS_MASK) | PCI_ROM_ADDRESS_ENABLE)
        self.config.init(PCI_COMMAND, 2, self.config.get(PCI_COMMAND, 2), wmask=self._command_wmask())
        return rom

    def add_capability(self, cap: Capability) -> int:
        """Place ``cap`` after the last one of its kind and link it into the list; returns its offset."""
        if cap.device is not None:
            raise ValueError("a capability belongs to one function")
        if isinstance(cap, ExpressCapability) and self.config.size < PCI_CFG_SPACE_EXP_SIZE:
            self._grow_config()
        length = (cap.length() + 3) & ~3
        same = [c for c in self.capabilities if c.extended == cap.extended]
        if cap.extended:
            if self.config.size < PCI_CFG_SPACE_EXP_SIZE:
                raise ValueError("extended capabilities need a PCI Express function (add ExpressCapability first)")
            offset = (same[-1].offset + ((same[-1].length() + 3) & ~3)) if same else PCI_CFG_SPACE_SIZE
            if offset + length > PCI_CFG_SPACE_EXP_SIZE:
                raise ValueError("extended config space is full")
            header = cap.cap_id | (cap.version << 16)
            self.config.init(offset, 4, header)
            if same:
                prev = same[-1].offset
                self.config.set(prev, 4, self.config.get(prev, 4) | (offset << 20))
        else:
            offset = (same[-1].offset + ((same[-1].length() + 3) & ~3)) if same else PCI_STD_HEADER_SIZEOF
            if offset + length > PCI_CFG_SPACE_SIZE:
                raise ValueError("standard config space is full")
            self.config.init(offset + PCI_CAP_LIST_ID, 1, cap.cap_id)
            self.config.init(offset + PCI_CAP_LIST_NEXT, 1, 0)
            self.config.set(same[-1].offset + PCI_CAP_LIST_NEXT if same else PCI_CAPABILITY_LIST, 1, offset)
            self.config.set(PCI_STATUS, 2, self.config.get(PCI_STATUS, 2) | PCI_STATUS_CAP_LIST)
        cap.device = self
        cap.offset = offset
        cap.build(self.config, offset)
        self.capabilities.append(cap)
        for attr, kind in (("msi", MsiCapability), ("msix", MsixCapability), ("pm", PmCapability),
                           ("express", ExpressCapability)):
            if isinstance(cap, kind) and getattr(self, attr) is None:
                setattr(self, attr, cap)
        return offset

    def _grow_config(self) -> None:
        old = self.config
        new = ConfigSpace(PCI_CFG_SPACE_EXP_SIZE)
        for name in ("data", "wmask", "w1cmask", "default"):
            getattr(new, name)[:old.size] = getattr(old, name)
        new._hooks = old._hooks
        self.config = new
        for cap in self.capabilities:
            cap._config = new
        self.config.init(PCI_LATENCY_TIMER, 1, 0)  # PCIe: latency timer is hardwired to 0

    def firmware_setup(self) -> None:
        """What platform firmware leaves at boot: ``firmware_command`` and ``interrupt_line``.

        Not part of power-on state: a function reset clears them, and the host
        restores them with the rest of config space.
        """
        self.config_write(PCI_COMMAND, 2, self.command() | self.firmware_command)
        if self.interrupt_pin:
            self.config_write(PCI_INTERRUPT_LINE, 1, self.interrupt_line)

    # -- config access (the host's pci_{read,write}_config_*) ----------------
    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.config.write(offset, size, value)

    def command(self) -> int:
        return self.config.get(PCI_COMMAND, 2)

    def bus_master_enabled(self) -> bool:
        # (command() spelled out: every DMA asks)
        return bool(self.config.get(PCI_COMMAND, 2) & PCI_COMMAND_MASTER)

    # -- BAR access (MMIO / port I/O from the host) ---------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        bar = self.bars[index]
        if bar is None or not self._decodes(bar):
            return (1 << (8 * size)) - 1  # master abort: all ones
        handler = self._msix_region(index, offset, size) if self.msix is not None else None
        if handler is not None:
            return handler[0](handler[2], size)
        return bar.read(offset, size) & ((1 << (8 * size)) - 1)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        bar = self.bars[index]
        if bar is None or not self._decodes(bar):
            return
        handler = self._msix_region(index, offset, size) if self.msix is not None else None
        if handler is not None:
            if handler[1] is not None:
                handler[1](handler[2], size, value)
            return
        bar.write(offset, size, value)

    def rom_read(self, offset: int, size: int) -> int:
        if self.rom is None:
            return (1 << (8 * size)) - 1  # nothing decodes it: master abort
        return self.rom.read(offset, size)

    def _decodes(self, bar: Bar) -> bool:
        bit = PCI_COMMAND_IO if bar.io else PCI_COMMAND_MEMORY
        # (config.get spelled out, and only the low byte that holds both bits: every BAR access asks)
        return self.config.data[PCI_COMMAND] & bit != 0 and self.power_state < PCI_D3HOT

    def _msix_region(self, index: int, offset: int, size: int):
        msix = self.msix
        if msix is None:
            return None
        if index == msix.table_bar and msix.table_offset <= offset < msix.table_offset + msix.table_size:
            return msix.table_read, msix.table_write, offset - msix.table_offset
        if index == msix.pba_bar and msix.pba_offset <= offset < msix.pba_offset + msix.pba_size:
            return msix.pba_read, None, offset - msix.pba_offset
        return None

    # -- interrupts: the narrow helper models use ------------------------------
    def msi_enabled(self) -> bool:
        return self.msi is not None and self.msi.enabled()

    def msix_enabled(self) -> bool:
        return self.msix is not None and self.msix.enabled()

    def raise_irq(self, index: int, vector: int = 0) -> None:
        """Assert INTx (a level, until ``lower_irq``), or send MSI / MSI-X ``vector``.

        A message for a disabled mechanism is dropped, as the hardware would;
        the host's masks and automasking are vfio-pci's business.
        """
        # Messages, then INTx, without the enum conversion: they are the hot path.
        if index == IrqIndex.MSI or index == IrqIndex.MSIX:
            cap = self.msi if index == IrqIndex.MSI else self.msix
            if cap is not None:
                cap.notify(vector)
            return
        if index == IrqIndex.INTX:
            if not self.interrupt_pin:
                raise ValueError(f"{self.name} has no INTx pin")
            if not self._intx_level:  # a level: raising it again changes nothing
                self._intx_level = True
                self._update_intx()
        elif IrqIndex(index) is IrqIndex.ERR:
            self.signal_error()
        else:
            raise ValueError("a device cannot raise the REQ interrupt: the host does")

    def lower_irq(self, index: int = IrqIndex.INTX) -> None:
        """Deassert INTx (messages have nothing to lower)."""
        if index == IrqIndex.INTX:
            if self._intx_level:
                self._intx_level = False
                self._update_intx()
        else:
            IrqIndex(index)  # ValueError for what is no interrupt index

    def signal_error(self) -> None:
        """An uncorrectable error the host would learn about through AER (the ERR index)."""
        if self.irq_sink is not None:
            self.irq_sink.error_signal()

    def _update_intx(self, offset: int = PCI_COMMAND, size: int = 2) -> None:
        # The Interrupt Status bit is the level; the line is the level unless INTx is disabled.
        # (Also the hook of a command register write: offset and size say which.)
        data = self.config.data
        if self._intx_level:
            data[_INTR_AT] |= _INTR_BIT
            out = not data[_INTX_DISABLE_AT] & _INTX_DISABLE_BIT
        else:
            data[_INTR_AT] &= ~_INTR_BIT
            out = False
        if out != self._intx_out:
            self._intx_out = out
            if self.irq_sink is not None:
                self.irq_sink.intx_line(out)

    def check_and_set_intx_mask(self, mask: bool) -> bool:
        """The host's pci_check_and_{mask,unmask}_intx: set (``mask``) or clear INTx-disable,
        only when the Interrupt Status bit says an interrupt is (or is not) pending; else False."""
        data = self.config.data
        if mask != bool(data[_INTR_AT] & _INTR_BIT):
            return False
        cmd = data[PCI_COMMAND] | data[PCI_COMMAND + 1] << 8
        new = cmd | PCI_COMMAND_INTX_DISABLE if mask else cmd & ~PCI_COMMAND_INTX_DISABLE
        if new != cmd:
            self.config_write(PCI_COMMAND, 2, new)
        return True

    def intx_asserted(self) -> bool:
        """The INTx line as the interrupt controller sees it."""
        return self._intx_out

    def _send_msi(self, index: IrqIndex, vector: int) -> None:
        if self.irq_sink is not None:
            self.irq_sink.msi_message(index, vector)

    # -- time ------------------------------------------------------------------
    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` under the device lock after ``delay`` seconds (or at ``complete_pending``)."""
        self.deferred.call_later(delay, fn)

    def complete_pending(self) -> None:
        """Finish every piece of deferred work now (deterministic tests)."""
        self.deferred.run_pending()

    # -- reset -----------------------------------------------------------------
    def reset(self) -> None:
        """The model's own state back to power-on; override it (the framework handles config space)."""

    def reset_methods(self) -> List[str]:
        """How this function can be reset on its own, in the PCI core's order of preference.

        ``device_specific`` when the model says ``can_reset``; ``flr`` when its
        PCI Express capability offers Function Level Reset; ``pm`` when its
        power-management capability has No_Soft_Reset clear (D3hot -> D0
        resets it).  Empty: the host cannot reset it alone, and vfio-pci
        offers no VFIO_DEVICE_RESET (a reset of its bus may still be possible,
        vfio-pci adds that).
        """
        methods = []
        if self.can_reset:
            methods.append("device_specific")
        if self.express is not None and self.express.flr:
            methods.append("flr")
        if self.pm is not None and not self.pm.no_soft_reset:
            methods.append("pm")
        return methods

    def reset_function(self) -> None:
        """The function is reset (FLR, PM soft reset, or a reset of its bus).

        Config space returns to its power-on values (the host saves and
        restores it around a reset it initiates: ``pci_try_reset_function``),
        pending deferred work is dropped, interrupts go quiet, and the model's
        own :meth:`reset` runs.
        """
        with self.lock:
            self.deferred.cancel_all()
            self.config.reset()
            self.power_state = PCI_D0
            if self.msi is not None:
                self.msi.reset()
            if self.msix is not None:
                self.msix.reset()
            self._intx_level = False
            self._update_intx()
            self.reset()  # the model's own state, last: a model that fails here leaves the rest reset

    def shutdown(self) -> None:
        """The device goes away: nothing deferred may run any more, shared memory is let go."""
        self.deferred.cancel_all()
        for bar in self.bars:
            if bar is not None:
                bar.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.vendor_id:04x}:{self.device_id:04x}>"
