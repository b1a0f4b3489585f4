"""The NVMe controller as a PCI function: identity, BAR0 registers, the enable/reset state machine, interrupts.

The commands live in :mod:`.admin` and :mod:`.nvm`, the queues and the
round loop in :mod:`.engine`; this class owns the registers and everything a
reset touches.
"""

from __future__ import annotations

import inspect
import logging
from typing import Optional

from ..pci import (
    PCI_MSIX_ENTRY_SIZE,
    ExpressCapability,
    IrqIndex,
    MmioBar,
    MsiCapability,
    MsixCapability,
    PciDevice,
    PmCapability,
)
from ..registry import register_model
from . import identify, spec
from .admin import MQES, AdminCommands
from .engine import IoThread, QueueEngine
from .features import Features
from .nvm import NvmCommands
from .options import LBA_FORMATS, ControllerOptions
from .queues import data_from_host, data_to_host

log = logging.getLogger(__name__)

MPSMIN, MPSMAX = 0, 4                 # memory pages of 4 KiB .. 64 KiB
TEMPERATURE = 0x143                   # 323 K, what QEMU reports
WCTEMP, CCTEMP = 0x157, 0x175         # warning / critical composite temperature (70 C, 100 C)
M32 = 0xFFFFFFFF


_OPTION_KEYS = set(inspect.signature(ControllerOptions).parameters) - {"name"}


@register_model("nvme")
class NvmeController(PciDevice):
    vendor_id, device_id = 0x1B36, 0x0010          # PCI_VENDOR_ID_REDHAT, PCI_DEVICE_ID_REDHAT_NVME
    subsystem_vendor_id, subsystem_id = 0x1AF4, 0x1100
    revision = 0x02
    class_code = 0x010802                          # mass storage, non-volatile memory, NVM Express
    interrupt_pin = 1
    command_wmask = 0x0001 | 0x0002 | 0x0004 | 0x0100 | 0x0400  # QEMU's: IO MEMORY MASTER SERR INTX_DISABLE
    firmware_command = 0x0001 | 0x0002 | 0x0100

    def __init__(self, name=None, *, manual_time: bool = False, **options):
        keys = {k: options.pop(k) for k in list(options) if k in _OPTION_KEYS}
        super().__init__(name, manual_time=manual_time, **options)
        opts = ControllerOptions(self.name, **keys)
        self.max_queues, self.mdts, self.ready_delay = opts.max_queues, opts.mdts, opts.ready_delay
        self.injector = opts.injector
        self.backing, self.namespaces = opts.open_storage()
        self.lba_formats = LBA_FORMATS
        self.vectors = self.max_queues + 1
        self.identity = identify.ControllerIdentity(
            vid=self.vendor_id, ssvid=self.subsystem_vendor_id, serial=opts.serial, model=opts.model_name,
            firmware="1.0", mdts=self.mdts, namespaces=opts.namespaces, aerl=3, elpe=63,
            oui=bytes([0x00, 0x54, 0x52]), wctemp=WCTEMP, cctemp=CCTEMP)
        self.cap = (MQES | spec.CAP_CQR | (0xF << spec.CAP_TO_SHIFT) | spec.CAP_CSS_NVM
                    | (MPSMIN << spec.CAP_MPSMIN_SHIFT) | (MPSMAX << spec.CAP_MPSMAX_SHIFT))
        self._build_pci()
        self.health = identify.Health(TEMPERATURE)
        self.error_log = identify.ErrorLog(self.identity.elpe + 1)
        self.engine = QueueEngine(self, self.max_queues)
        self.features = Features(self, max_queues=self.max_queues, vectors=self.vectors, wctemp=WCTEMP)
        self.admin = AdminCommands(self)
        self.nvm = NvmCommands(self)
        self.engine.admin_handlers.update(self.admin.handlers)
        self.engine.io_handlers.update(self.nvm.handlers)
        self._io = IoThread(self) if (not manual_time if opts.io_thread is None else opts.io_thread) else None
        self.generation = 0
        self.cc = self.csts = self.aqa = self.asq = self.acq = 0
        self.enabled = False
        self.reset()

    def _build_pci(self) -> None:
        """BAR0 as QEMU lays it out: registers and doorbells, then the MSI-X table, then the PBA (4 KiB aligned).

        No page of it is a register window (``MmioBar.add_window``): page 0
        holds CC, INTMS/INTMC and AQA/ASQ/ACQ, whose writes act, the doorbell
        pages are writes that act, and the table and PBA are vfio-pci's.
        """
        self.doorbells_end = spec.REG_DBS + 8 * (self.max_queues + 1)
        table = (self.doorbells_end + 0xFFF) & ~0xFFF
        pba = (table + self.vectors * PCI_MSIX_ENTRY_SIZE + 0xFFF) & ~0xFFF
        end = pba + ((self.vectors + 63) // 64) * 8
        self.bar0_size = 1 << (end - 1).bit_length()
        self.add_bar(0, MmioBar(self.bar0_size, self.mmio_read, self.mmio_write, bits64=True))
        self.add_capability(MsixCapability(self.vectors, table_bar=0, table_offset=table, pba_offset=pba))
        self.add_capability(MsiCapability(vectors=32, addr64=True, per_vector_mask=True))
        self.add_capability(PmCapability(no_soft_reset=True))
        self.add_capability(ExpressCapability(flr=True))

    # -- resets ------------------------------------------------------------------------------
    def reset(self) -> None:
        """A function reset (FLR, VFIO_DEVICE_RESET, power on): every register to its power-on value."""
        if self.enabled and self._shst() != spec.SHST_COMPLETE:
            self.health.unsafe_shutdowns += 1
        self.generation += 1
        self._controller_reset()
        self.cc = self.csts = self.aqa = self.asq = self.acq = 0

    def _controller_reset(self) -> None:
        """What CC.EN 1 -> 0 does at once: queues and commands in flight gone (nothing completes), features reset."""
        self.engine.clear()
        self.admin.events.reset()
        self.features.defaults()
        self.enabled = False
        self.failed = False
        #: enabled and not failed: doorbells are taken and rounds run
        self.running = False
        self.io_queues_created = False
        self.intms = 0
        self.msi_pending = 0
        self.page_size = 4096
        self.max_transfer = (4096 << self.mdts) if self.mdts else 0
        self._temp_warned = False
        self._intx = False
        self.lower_irq(IrqIndex.INTX)

    def shutdown(self) -> None:
        if self._io is not None:
            self._io.stop()
        super().shutdown()
        self.backing.close()

    # -- what the engine and the commands ask of the controller -----------------------------
    def namespace(self, nsid: int):
        return self.namespaces[nsid - 1] if 0 < nsid <= len(self.namespaces) else None

    def cc_field(self, shift: int, mask: int) -> int:
        return (self.cc >> shift) & mask

    def usable_vectors(self) -> int:
        msix, msi = self.msix, self.msi
        if msix is not None and self.msix_enabled():
            return msix.vectors
        if msi is not None and self.msi_enabled():
            return msi.enabled_vectors()
        return 1

    def later(self, delay: float, fn) -> None:
        """``fn`` after ``delay`` seconds, unless a reset came in between."""
        generation = self.generation

        def run():
            if self.generation == generation:
                fn()
        self.call_later(delay, run)

    def kick(self) -> None:
        """There is work for a round: run it now (inline) or wake the I/O thread."""
        if self._io is not None:
            self._io.kick()
            return
        while self.run_round():
            pass

    def run_round(self) -> bool:
        try:
            return self.engine.round()
        except Exception:
            log.exception("%s: the NVMe model failed while running commands", self.name)
            self.fail("internal error of the model (see the traceback above)")
            return False

    def fail(self, reason: str) -> None:
        """Controller Fatal Status: the controller stops until a reset (CC.EN 1 -> 0 or a function reset)."""
        if not self.failed:
            log.warning("%s: controller fatal status (CSTS.CFS): %s", self.name, reason)
        self.failed = True
        self.running = False
        self.csts |= spec.CSTS_CFS

    def to_host(self, cmd, data: bytes) -> int:
        """The data of an admin command (Identify, a log page) to its PRPs."""
        return data_to_host(self.dma, cmd, data, self.page_size)

    def from_host(self, cmd, length: int):
        return data_from_host(self.dma, cmd, length, self.page_size)

    def flush_all(self) -> None:
        self.backing.flush()

    def command_failed(self, sq, cmd, status: int, lba: Optional[int]) -> None:
        io = sq.qid != 0
        if lba is None:
            lba = (cmd[8] | (cmd[9] << 32)) if io and cmd[0] in (spec.NVM_READ, spec.NVM_WRITE,
                                                                  spec.NVM_WRITE_ZEROES) else 0
        self.error_log.record(sq.qid, cmd[2], status, cmd[3] if io else 0, lba)
        log.debug("%s: SQ %d CID %d opcode 0x%02x: %s", self.name, sq.qid, cmd[2], cmd[0], spec.status_name(status))

    def doorbell_error(self, qid: int, is_cq: bool, info: int, text: str) -> None:
        log.warning("%s: invalid doorbell write: %s", self.name, text)
        self.error_log.record(qid & 0xFFFF, 0xFFFF, 0)
        if self.admin.events.outstanding:
            self.admin.events.post(spec.AER_TYPE_ERROR, info, spec.LOG_ERROR)

    def critical_warning(self) -> int:
        t = self.health.temperature
        hot = t >= self.features.temp_over or t <= self.features.temp_under
        return spec.SMART_WARN_TEMPERATURE if hot else 0

    def check_temperature(self) -> None:
        warned = bool(self.critical_warning())
        if warned and not self._temp_warned and self.features.async_config & spec.SMART_WARN_TEMPERATURE:
            self.admin.events.post(spec.AER_TYPE_SMART, spec.AER_SMART_TEMPERATURE, spec.LOG_SMART)
        self._temp_warned = warned

    # -- interrupts ----------------------------------------------------------------------
    def interrupt(self, cq) -> None:
        """New entries were posted to ``cq``: one message (MSI-X, MSI) or the INTx level."""
        if not cq.ien:
            return
        if self.msix_enabled():
            self.raise_irq(IrqIndex.MSIX, cq.vector)
        elif self.msi_enabled():
            self._msi(cq.vector)
        else:
            self.update_intx()

    def _msi(self, vector: int) -> None:
        if vector < 32 and self.intms >> vector & 1:
            self.msi_pending |= 1 << vector     # INTMS masks MSI vectors (NVMe 1.4, 7.5.1.1)
            return
        assert self.msi is not None  # called only while MSI is enabled
        self.raise_irq(IrqIndex.MSI, vector & (self.msi.enabled_vectors() - 1))

    def update_intx(self) -> None:
        """INTx is a level: asserted while an interrupt-enabled CQ holds entries the host has not consumed."""
        level = False
        if not self.msix_enabled() and not self.msi_enabled():
            intms = self.intms
            for cq in self.engine.live_cqs:
                if cq.ien and cq.head != cq.tail and not (cq.vector < 32 and intms >> cq.vector & 1):
                    level = True
                    break
        if level != self._intx:
            self._intx = level
            if level:
                self.raise_irq(IrqIndex.INTX)
            else:
                self.lower_irq(IrqIndex.INTX)

    # -- BAR0 ----------------------------------------------------------------------------
    def _reg32(self, offset: int) -> int:
        if offset == spec.REG_CAP:
            return self.cap & M32
        if offset == spec.REG_CAP + 4:
            return self.cap >> 32
        if offset == spec.REG_VS:
            return spec.NVME_VS_1_4
        if offset in (spec.REG_INTMS, spec.REG_INTMC):
            return self.intms
        if offset == spec.REG_CC:
            return self.cc
        if offset == spec.REG_CSTS:
            return self.csts
        if offset == spec.REG_AQA:
            return self.aqa
        if spec.REG_ASQ <= offset < spec.REG_ACQ + 8:
            value = self.asq if offset < spec.REG_ACQ else self.acq
            return value >> 32 if offset & 4 else value & M32
        return 0                                  # NSSR, CMBLOC, CMBSZ and reserved: 0

    def mmio_read(self, offset: int, size: int) -> int:
        if offset >= spec.REG_DBS:
            return 0                              # doorbells are write-only
        base = offset & ~3
        value = self._reg32(base) | (self._reg32(base + 4) << 32 if offset + size > base + 4 else 0)
        return (value >> (8 * (offset - base))) & ((1 << (8 * size)) - 1)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if size == 8:
            self.mmio_write(offset, 4, value & M32)
            self.mmio_write(offset + 4, 4, value >> 32)
            return
        if size != 4 or offset & 3:
            log.info("%s: %d-byte write at BAR0 0x%x ignored: NVMe registers take 4-byte writes", self.name, size,
                     offset)
            return
        if offset >= spec.REG_DBS:
            if not self.running:
                log.info("%s: doorbell write at 0x%x while the controller is %s: ignored", self.name, offset,
                         "failed" if self.failed else "disabled")
            elif self.engine.doorbell(offset, value):
                self.kick()
            return
        writer = self._WRITERS.get(offset)
        if writer is not None:
            writer(self, value)
        else:
            log.debug("%s: write of 0x%x to read-only or reserved register 0x%x ignored", self.name, value, offset)

    def _write_intms(self, value: int) -> None:
        if self.msix_enabled():
            log.info("%s: INTMS written while MSI-X is enabled: ignored", self.name)
            return
        self.intms |= value
        self.update_intx()

    def _write_intmc(self, value: int) -> None:
        if self.msix_enabled():
            log.info("%s: INTMC written while MSI-X is enabled: ignored", self.name)
            return
        self.intms &= ~value
        self.update_intx()
        if self.msi_enabled():
            for cq in self.engine.live_cqs:
                if cq.ien and cq.vector < 32 and value >> cq.vector & 1 and (
                        cq.head != cq.tail or self.msi_pending >> cq.vector & 1):
                    self.msi_pending &= ~(1 << cq.vector)
                    self._msi(cq.vector)

    def _write_aqa(self, value: int) -> None:
        self.aqa = value & 0x0FFF0FFF

    # ASQ and ACQ keep what was written, so a misaligned queue is seen (and refused) at CC.EN 0 -> 1.
    def _write_asq(self, value: int, high: bool) -> None:
        self.asq = (self.asq & M32) | (value << 32) if high else (self.asq & ~M32) | value

    def _write_acq(self, value: int, high: bool) -> None:
        self.acq = (self.acq & M32) | (value << 32) if high else (self.acq & ~M32) | value

    # -- CC, the enable / shutdown state machine (NVMe 1.4, 7.6) ---------------------------
    def _shst(self) -> int:
        return (self.csts >> spec.CSTS_SHST_SHIFT) & 0x3

    def _set_shst(self, value: int) -> None:
        self.csts = (self.csts & ~(0x3 << spec.CSTS_SHST_SHIFT)) | (value << spec.CSTS_SHST_SHIFT)

    def _write_cc(self, value: int) -> None:
        old, new = self.cc, value & spec.CC_WRITABLE
        self.cc = new
        clean = self._shst() == spec.SHST_COMPLETE   # before SHN's change can clear it
        shn_old = (old >> spec.CC_SHN_SHIFT) & spec.CC_SHN_MASK
        shn_new = (new >> spec.CC_SHN_SHIFT) & spec.CC_SHN_MASK
        if shn_new and not shn_old:
            self._shutdown_notification()
        elif shn_old and not shn_new:
            self._set_shst(spec.SHST_NORMAL)
        if new & spec.CC_EN and not old & spec.CC_EN:
            self._enable()
        elif old & spec.CC_EN and not new & spec.CC_EN:
            self._disable(clean)

    def _enable_problem(self) -> Optional[str]:
        mps = self.cc_field(spec.CC_MPS_SHIFT, spec.CC_MPS_MASK)
        page = 4096 << mps
        iosqes = self.cc_field(spec.CC_IOSQES_SHIFT, spec.CC_IOSQES_MASK)
        iocqes = self.cc_field(spec.CC_IOCQES_SHIFT, spec.CC_IOCQES_MASK)
        checks = [
            (not MPSMIN <= mps <= MPSMAX, f"CC.MPS {mps} is outside CAP.MPSMIN..MPSMAX ({MPSMIN}..{MPSMAX})"),
            (self.cc_field(spec.CC_CSS_SHIFT, spec.CC_CSS_MASK) != 0, "CC.CSS selects a command set other than NVM"),
            (self.cc_field(spec.CC_AMS_SHIFT, spec.CC_AMS_MASK) != 0, "CC.AMS is not round robin"),
            (iosqes not in (0, spec.SQES), f"CC.IOSQES {iosqes} is not {spec.SQES} (64-byte entries)"),
            (iocqes not in (0, spec.CQES), f"CC.IOCQES {iocqes} is not {spec.CQES} (16-byte entries)"),
            (not self.aqa & 0xFFF, "AQA.ASQS gives an admin SQ of one entry"),
            (not (self.aqa >> 16) & 0xFFF, "AQA.ACQS gives an admin CQ of one entry"),
            (self.asq & (page - 1), f"ASQ 0x{self.asq:x} is not aligned to the {page}-byte memory page"),
            (self.acq & (page - 1), f"ACQ 0x{self.acq:x} is not aligned to the {page}-byte memory page"),
        ]
        return next((text for bad, text in checks if bad), None)

    def _enable(self) -> None:
        self.generation += 1
        problem = self._enable_problem()
        if problem is not None:
            self.fail(f"cannot enable: {problem}")
            return
        self.page_size = 4096 << self.cc_field(spec.CC_MPS_SHIFT, spec.CC_MPS_MASK)
        self.engine.add_cq(0, self.acq, ((self.aqa >> 16) & 0xFFF) + 1, True, 0)
        self.engine.add_sq(0, self.asq, (self.aqa & 0xFFF) + 1, 0)
        self.enabled = self.running = True
        self._set_shst(spec.SHST_NORMAL)
        self.later(self.ready_delay, self._became_ready)

    def _became_ready(self) -> None:
        if self.enabled:
            self.csts |= spec.CSTS_RDY

    def _disable(self, clean: bool) -> None:
        if self.enabled and not clean:
            self.health.unsafe_shutdowns += 1        # a reset with no completed shutdown notification before it
        self.generation += 1
        self._controller_reset()
        self.csts &= ~(spec.CSTS_CFS | (0x3 << spec.CSTS_SHST_SHIFT))
        self.later(self.ready_delay, self._became_not_ready)

    def _became_not_ready(self) -> None:
        if not self.cc & spec.CC_EN:
            self.csts &= ~spec.CSTS_RDY

    def _shutdown_notification(self) -> None:
        self._set_shst(spec.SHST_OCCURRING)
        try:
            self.flush_all()
        except OSError as e:
            log.warning("%s: flushing the backing file at shutdown failed: %s", self.name, e.strerror)
        self.later(self.ready_delay, lambda: self._set_shst(spec.SHST_COMPLETE))

    _WRITERS = {
        spec.REG_INTMS: _write_intms,
        spec.REG_INTMC: _write_intmc,
        spec.REG_CC: _write_cc,
        spec.REG_AQA: _write_aqa,
        spec.REG_ASQ: lambda self, v: self._write_asq(v, False),
        spec.REG_ASQ + 4: lambda self, v: self._write_asq(v, True),
        spec.REG_ACQ: lambda self, v: self._write_acq(v, False),
        spec.REG_ACQ + 4: lambda self, v: self._write_acq(v, True),
    }
