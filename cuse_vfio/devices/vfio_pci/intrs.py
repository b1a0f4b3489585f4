"""vfio-pci's interrupts, as ``vfio_pci_intrs.c`` (6.1): INTx, MSI/MSI-X, ERR and REQ, and SET_IRQS.

INTx is automasked when it fires, and UNMASK re-signals while the function
still has it pending.  Where it is masked depends on ``vdev->pci_2_3``: in the
function's own INTx-disable bit (a PCI 2.3 function, the default), or, with
``vfio_pci.nointxmask`` or a function whose bit does not work, at the
interrupt controller (``disable_irq``/``enable_irq`` of its line), which a
user sees as an INTx-disable bit that vfio-pci never touches in the sysfs
``config`` (the virtual one of the VFIO config region is the user's either
way, and GET_IRQ_INFO says MASKABLE | AUTOMASKED either way).
MSI/MSI-X vectors map to eventfds, their count fixed when enabled (NORESIZE)
on 6.1, MSI-X growing vector by vector on 6.5+ (rule MSIX_DYNAMIC); ERR
(PCI Express only) and REQ
are single eventfds.  The MSI Enable the user reads is the virtual one it
wrote, as on the kernel; MSI-X's is the function's.

Eventfds come from the caller: ``arg.caller.get_eventfd(fd)`` returns an
object with ``signal()`` (and optionally ``release()``; ``watch(callback)``
returning a cancel function, for the unmask irqfd).

``Interrupts`` is the part of a ``VfioPciDevice`` that owns this state; it is
also the function's ``irq_sink`` (``PciDevice.irq_sink``), where the model's
interrupts arrive.  It runs under the device's lock.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, List, Optional

from ...errors import VfioError
from ...uapi import (
    VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_INFO_MASKABLE,
    VFIO_IRQ_INFO_NORESIZE,
    VFIO_IRQ_SET_ACTION_MASK,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_TYPE_MASK,
    VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_ERR_IRQ_INDEX,
    VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_NUM_IRQS,
    VFIO_PCI_REQ_IRQ_INDEX,
    offsetofend,
    set_irqs_validate_and_prepare,
    vfio_irq_info,
    vfio_irq_set,
)
from ...uapi.abi import Rule
from ..pci import (
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_INTERRUPT_PIN,
    MsiCapability,
    MsixCapability,
    PciDevice,
)

if TYPE_CHECKING:
    from .core import VfioPciDevice

log = logging.getLogger(__name__)
#: the minsz of GET_IRQ_INFO and SET_IRQS (offsetofend(..., count), as the kernel's)
_IRQ_INFO_MINSZ = offsetofend(vfio_irq_info, "count")
_IRQ_SET_MINSZ = offsetofend(vfio_irq_set, "count")


# MSI and MSI-X vectors exist only with the capability: SET_IRQS checked the count against irq_count().
def _msi_of(fn: PciDevice) -> MsiCapability:
    assert fn.msi is not None
    return fn.msi


def _msix_of(fn: PciDevice) -> MsixCapability:
    assert fn.msix is not None
    return fn.msix


def release_eventfd(efd) -> None:
    """Drop the reference a fetched eventfd holds (eventfd_ctx_put), when the transport gave it one."""
    release = getattr(efd, "release", None)
    if release is not None:
        release()


def fd_at(data: bytes, i: int = 0) -> int:
    """The ``i``-th 32-bit fd number in an ioctl's trailing data."""
    return int.from_bytes(data[4 * i:4 * i + 4], "little", signed=True)


def set_ctx_trigger_single(current, start: int, count: int, flags: int, data: bytes, caller):
    """vfio_pci_set_ctx_trigger_single: DATA_NONE/BOOL loop back, EVENTFD (re)assigns; returns the new one."""
    if start != 0 or count > 1:
        raise VfioError(errno.EINVAL, "this index has one vector")
    if flags & VFIO_IRQ_SET_DATA_NONE:
        if current is not None:
            if count:
                current.signal()
                return current
            release_eventfd(current)
            return None
    elif flags & VFIO_IRQ_SET_DATA_BOOL:
        if not count:
            raise VfioError(errno.EINVAL, "DATA_BOOL needs count 1")
        if data[0] and current is not None:
            current.signal()
        return current
    elif flags & VFIO_IRQ_SET_DATA_EVENTFD:
        if not count:
            raise VfioError(errno.EINVAL, "DATA_EVENTFD needs count 1")
        fd = fd_at(data)
        if fd == -1:
            if current is not None:
                release_eventfd(current)
            return None
        if fd >= 0:
            new = caller.get_eventfd(fd)
            if current is not None:
                release_eventfd(current)
            return new
        return current
    raise VfioError(errno.EINVAL, "nothing to trigger: no eventfd is set")


class _IntxCtx:
    def __init__(self, trigger, masked: bool):
        self.trigger = trigger
        self.masked = masked
        self.unmask_watch: Optional[Callable[[], None]] = None


#: MSI-X vectors can be added while MSI-X is enabled (vdev->has_dyn_msix).
MSIX_DYNAMIC = Rule(
    "vfio_pci.msix.dynamic", False, since={"6.5": True},
    why="the dynamic MSI-X series of 6.5 ('vfio/pci: Support dynamic MSI-X', 'vfio/pci: Clear "
        "VFIO_IRQ_INFO_NORESIZE for MSI-X') sets has_dyn_msix where pci_msix_can_alloc_dyn (x86's PCI/MSI "
        "domains can), allocates a vector in vfio_msi_alloc_irq when a trigger is set beyond those "
        "enabled, and drops NORESIZE from MSI-X's GET_IRQ_INFO.")

#: MSI/MSI-X triggers are bounded by the count enabled first (vdev->num_ctx).
MSI_NUM_CTX_BOUND = Rule(
    "vfio_pci.msi.num_ctx_bound", True, since={"6.5": False},
    why="6.1's vfio_msi_set_block and vfio_pci_set_msi_trigger refuse vectors at or past num_ctx with "
        "-EINVAL; 'vfio/pci: Remove interrupt context counter' (6.5) drops num_ctx: a loopback skips "
        "vectors with no context, an eventfd past the enabled MSI vectors fails in pci_irq_vector.")


class IntxMasking:
    """The INTx half of :class:`Interrupts`: its SET_IRQS actions, the handler, masking and unmasking.

    Uses the state ``Interrupts`` keeps (``irq_type``, ``intx``, ``virq_disabled``, ``pci_2_3``).
    """

    function: PciDevice
    lock: ContextManager[Any]
    irq_type: Optional[int]
    intx: Optional[_IntxCtx]
    virq_disabled: bool
    pci_2_3: bool

    @staticmethod
    def _eventfd(caller, fd: int):
        return caller.get_eventfd(fd)

    def _intx_ctx(self) -> _IntxCtx:
        """The INTx context, where INTx is known to be enabled (irq_type checked by the caller)."""
        assert self.intx is not None, "INTx is enabled"
        return self.intx

    # INTx -----------------------------------------------------------------------
    # pci_2_3 (a function whose INTx-disable bit works, pci_intx_mask_supported,
    # and no nointxmask): vfio-pci masks INTx in that bit: the handler sets it
    # when the function says the interrupt is its own (pci_check_and_mask_intx),
    # unmasking clears it unless another interrupt is already pending
    # (pci_check_and_unmask_intx), and while INTx is not in use the bit follows
    # the user's virtual INTx-disable.
    # Otherwise the line is masked at the interrupt controller and the bit is
    # left alone: the handler disables the line at once (disable_irq_nosync,
    # the line is the device's alone) and unmasking enables it again
    # (enable_irq), which runs the handler again right away when the
    # level-triggered line is still asserted.  ``ctx.masked`` is then the
    # line's disabled state.
    def _set_intx_unmask(self, index, start, count, flags, data, caller) -> None:
        if self.irq_type != VFIO_PCI_INTX_IRQ_INDEX or start != 0 or count != 1:
            raise VfioError(errno.EINVAL, "INTx UNMASK needs INTx enabled, start 0 and count 1")
        if flags & VFIO_IRQ_SET_DATA_NONE or (flags & VFIO_IRQ_SET_DATA_BOOL and data[0]):
            self.intx_unmask()
        elif flags & VFIO_IRQ_SET_DATA_EVENTFD:
            fd = fd_at(data)
            ctx = self._intx_ctx()
            if fd >= 0:
                if ctx.unmask_watch is not None:
                    raise VfioError(errno.EBUSY, "an unmask eventfd is already set: de-assign it (-1) first")
                efd = self._eventfd(caller, fd)
                watch = getattr(efd, "watch", None)
                if watch is None:
                    raise VfioError(errno.EOPNOTSUPP, "this transport cannot watch an eventfd (unmask irqfd)")
                ctx.unmask_watch = watch(self._unmask_from_eventfd)
            elif ctx.unmask_watch is not None:
                ctx.unmask_watch()
                ctx.unmask_watch = None

    def _unmask_from_eventfd(self) -> None:
        with self.lock:
            self.intx_unmask()

    def _set_intx_mask(self, index, start, count, flags, data, caller) -> None:
        if self.irq_type != VFIO_PCI_INTX_IRQ_INDEX or start != 0 or count != 1:
            raise VfioError(errno.EINVAL, "INTx MASK needs INTx enabled, start 0 and count 1")
        if flags & VFIO_IRQ_SET_DATA_NONE or (flags & VFIO_IRQ_SET_DATA_BOOL and data[0]):
            self.intx_mask()
        elif flags & VFIO_IRQ_SET_DATA_EVENTFD:
            raise VfioError(errno.ENOTTY, "masking INTx from an eventfd is not implemented (nor in the kernel)")

    def _set_intx_trigger(self, index, start, count, flags, data, caller) -> None:
        if self.irq_type == VFIO_PCI_INTX_IRQ_INDEX and not count and flags & VFIO_IRQ_SET_DATA_NONE:
            self._intx_disable()
            return
        if self.irq_type not in (None, VFIO_PCI_INTX_IRQ_INDEX) or start != 0 or count != 1:
            raise VfioError(errno.EINVAL, "INTx TRIGGER needs no other interrupt type, start 0 and count 1")
        if flags & VFIO_IRQ_SET_DATA_EVENTFD:
            fd = fd_at(data)
            if self.irq_type == VFIO_PCI_INTX_IRQ_INDEX:
                self._intx_set_signal(fd, caller)
                return
            self._intx_enable()
            try:
                self._intx_set_signal(fd, caller)
            except VfioError:
                self._intx_disable()
                raise
            return
        if self.irq_type != VFIO_PCI_INTX_IRQ_INDEX:
            raise VfioError(errno.EINVAL, "INTx loopback needs INTx enabled")
        if flags & VFIO_IRQ_SET_DATA_NONE or (flags & VFIO_IRQ_SET_DATA_BOOL and data[0]):
            self._send_intx_eventfd()

    def _intx_enable(self) -> None:
        """vfio_intx_enable: the context, masked as the user's INTx-disable says."""
        self.intx = _IntxCtx(None, masked=self.virq_disabled)
        if self.pci_2_3:
            self._pci_intx(not self._intx_ctx().masked)
        self.irq_type = VFIO_PCI_INTX_IRQ_INDEX

    def _intx_set_signal(self, fd: int, caller) -> None:
        """vfio_intx_set_signal: drop the old eventfd (and handler), then install the new one."""
        ctx = self._intx_ctx()
        if ctx.trigger is not None:
            old, ctx.trigger = ctx.trigger, None
            release_eventfd(old)
        if fd < 0:
            return  # de-assigned: no handler, so nothing masks or signals until a new one
        ctx.trigger = self._eventfd(caller, fd)
        # request_irq on a level-triggered line already asserted runs the handler at once.
        if self.function.intx_asserted():
            self.intx_fire()

    def _intx_disable(self) -> None:
        ctx = self.intx
        if ctx is not None:
            if ctx.unmask_watch is not None:
                ctx.unmask_watch()
                ctx.unmask_watch = None
            if ctx.trigger is not None:
                release_eventfd(ctx.trigger)
                ctx.trigger = None
        self.intx = None
        self.irq_type = None

    def _send_intx_eventfd(self) -> None:
        ctx = self.intx
        if self.irq_type == VFIO_PCI_INTX_IRQ_INDEX and not self.virq_disabled and ctx is not None \
                and ctx.trigger is not None:
            ctx.trigger.signal()

    def intx_fire(self) -> None:
        """The line went up (vfio_intx_handler): mask it, then tell the user once.

        pci_2_3: only when the function says the interrupt is its own
        (pci_check_and_mask_intx sets its INTx-disable bit); otherwise the line
        is disabled at once (disable_irq_nosync).  The handler runs only while
        the line is unmasked.
        """
        ctx = self.intx
        if ctx is None or ctx.trigger is None or ctx.masked:
            return  # no handler registered, or the line is masked
        if self.pci_2_3 and not self.function.check_and_set_intx_mask(True):
            return  # not its interrupt after all
        ctx.masked = True
        if not self.virq_disabled:  # vfio_send_intx_eventfd
            ctx.trigger.signal()

    def intx_mask(self) -> bool:
        """vfio_pci_intx_mask: True when this masked INTx (it was not masked before)."""
        if self.irq_type != VFIO_PCI_INTX_IRQ_INDEX:
            if self.pci_2_3:
                self._pci_intx(False)  # not in use: the function's bit follows the virtual one
            return False
        ctx = self._intx_ctx()
        if ctx.masked:
            return False
        if self.pci_2_3:
            self._pci_intx(False)
        ctx.masked = True  # else disable_irq_nosync: the line is off
        return True

    def intx_unmask(self) -> None:
        """vfio_pci_intx_unmask: unmask, or re-send when the function still has an interrupt pending."""
        ctx = self.intx
        if ctx is None:  # INTx not in use
            if self.pci_2_3:
                self._pci_intx(True)
            return
        if not ctx.masked or self.virq_disabled:
            return
        if not self.pci_2_3:
            ctx.masked = False  # enable_irq: a line still asserted runs the handler again at once
            if self.function.intx_asserted():
                self.intx_fire()
        elif self.function.check_and_set_intx_mask(False):
            ctx.masked = False
        else:
            self._send_intx_eventfd()  # stays masked

    def _pci_intx(self, enable: bool) -> None:
        """pci_intx: set or clear the function's INTx-disable bit."""
        fn = self.function
        cmd = fn.command()
        new = (cmd & ~PCI_COMMAND_INTX_DISABLE) | (0 if enable else PCI_COMMAND_INTX_DISABLE)
        if new != cmd:
            fn.config_write(PCI_COMMAND, 2, new)


class Interrupts(IntxMasking):
    """The interrupt state of one vfio-pci device (``vdev->irq_type``, ``ctx``, ``err_trigger``...)."""

    def __init__(self, vdev: "VfioPciDevice"):
        self.vdev = vdev
        self.function = vdev.function
        self.name = vdev.name
        self.lock = vdev.lock
        self.irq_type: Optional[int] = None
        self.intx: Optional[_IntxCtx] = None
        self.msi_ctx: Dict[int, Any] = {}  # vector -> the eventfd the caller gave (with signal())
        self.msi_qmax = 0
        #: vectors enabled with the current MSI / MSI-X type (vdev->num_ctx)
        self.num_ctx = 0
        #: the user's virtual INTx-disable bit (vdev->virq_disabled)
        self.virq_disabled = False
        #: INTx is masked in the function's INTx-disable bit (vdev->pci_2_3); False: at the line
        self.pci_2_3 = True
        self.err_trigger = None
        self.req_trigger = None
        #: (index, action) -> what SET_IRQS does (MSI and MSI-X cannot be masked; ERR is PCIe's)
        self._actions: Dict[tuple, Callable[..., None]] = {
            (VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_MASK): self._set_intx_mask,
            (VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_UNMASK): self._set_intx_unmask,
            (VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER): self._set_intx_trigger,
            (VFIO_PCI_MSI_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER): self._set_msi_trigger,
            (VFIO_PCI_MSIX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER): self._set_msi_trigger,
            (VFIO_PCI_ERR_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER): self._set_err_trigger,
            (VFIO_PCI_REQ_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER): self._set_req_trigger,
        }

    # -- what the rest of vfio-pci asks -------------------------------------------
    def set_virq_disabled(self, disabled: bool) -> None:
        """The user wrote the virtual INTx-disable bit (vfio_basic_config_write)."""
        if disabled and not self.virq_disabled:
            self.virq_disabled = True
            self.intx_mask()
        elif not disabled and self.virq_disabled:
            self.virq_disabled = False
            self.intx_unmask()

    def disable(self) -> None:
        """vfio_pci_core_disable: the enabled interrupt type off, as SET_IRQS(DATA_NONE|TRIGGER, count 0) does."""
        if self.irq_type is not None:
            self._set_irqs_ioctl(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, self.irq_type, 0, 0, b"", None)
        self.virq_disabled = False

    def release_err_req(self) -> None:
        """The last close lets go of the ERR and REQ eventfds."""
        for attr in ("err_trigger", "req_trigger"):
            if getattr(self, attr) is not None:
                release_eventfd(getattr(self, attr))
                setattr(self, attr, None)

    def request(self, count: int) -> None:
        """Ask the user, through the REQ eventfd, to let the device go (vfio_pci_core_request)."""
        if self.req_trigger is not None:
            if count % 10 == 0:
                log.info("%s: relaying device request to user (#%d)", self.name, count)
            self.req_trigger.signal()
        elif count == 0:
            log.warning("%s: no device request channel registered, blocked until released by user",
                                  self.name)

    # -- GET_IRQ_INFO ---------------------------------------------------------------
    def irq_count(self, index: int) -> int:
        """vfio_pci_get_irq_count."""
        fn = self.function
        if index == VFIO_PCI_INTX_IRQ_INDEX:
            vconfig = self.vdev.vconfig
            return 1 if vconfig is not None and vconfig.vconfig[PCI_INTERRUPT_PIN] else 0
        if index == VFIO_PCI_MSI_IRQ_INDEX:
            return fn.msi.vectors if fn.msi is not None else 0
        if index == VFIO_PCI_MSIX_IRQ_INDEX:
            return fn.msix.vectors if fn.msix is not None else 0
        if index == VFIO_PCI_ERR_IRQ_INDEX:
            return 1 if fn.express is not None else 0
        if index == VFIO_PCI_REQ_IRQ_INDEX:
            return 1
        return 0

    def get_irq_info(self, arg) -> int:
        minsz = _IRQ_INFO_MINSZ
        info = arg.fetch_struct(vfio_irq_info, minsz)
        if info.index >= VFIO_PCI_NUM_IRQS:
            raise VfioError(errno.EINVAL, f"{self.name}: no irq index {info.index}")
        if info.index == VFIO_PCI_ERR_IRQ_INDEX and self.function.express is None:
            raise VfioError(errno.EINVAL, f"{self.name}: the ERR index exists only for PCI Express devices")
        info.flags = VFIO_IRQ_INFO_EVENTFD
        info.count = self.irq_count(info.index)
        if info.index == VFIO_PCI_INTX_IRQ_INDEX:
            info.flags |= VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED
        elif info.index != VFIO_PCI_MSIX_IRQ_INDEX or not self._msix_dynamic():
            info.flags |= VFIO_IRQ_INFO_NORESIZE
        arg.write(0, bytes(info)[:minsz])
        return 0

    # -- SET_IRQS ------------------------------------------------------------------
    def set_irqs(self, arg) -> int:
        minsz = _IRQ_SET_MINSZ
        hdr = arg.fetch_struct(vfio_irq_set, minsz)
        size = set_irqs_validate_and_prepare(hdr, self.irq_count(hdr.index), VFIO_PCI_NUM_IRQS, minsz)
        data = arg.read(minsz, hdr.count * size) if size else b""
        return self._set_irqs_ioctl(hdr.flags, hdr.index, hdr.start, hdr.count, data, arg.caller)

    def _set_irqs_ioctl(self, flags: int, index: int, start: int, count: int, data: bytes, caller) -> int:
        """vfio_pci_set_irqs_ioctl: the action for this index, or ENOTTY."""
        action = flags & VFIO_IRQ_SET_ACTION_TYPE_MASK
        func = self._actions.get((index, action))
        if func is None or (index == VFIO_PCI_ERR_IRQ_INDEX and self.function.express is None):
            raise VfioError(errno.ENOTTY, f"{self.name}: action 0x{action:x} is not supported on irq index {index}")
        func(index, start, count, flags, data, caller)
        return 0

    # MSI / MSI-X ----------------------------------------------------------------
    def _set_msi_trigger(self, index, start, count, flags, data, caller) -> None:
        msix = index == VFIO_PCI_MSIX_IRQ_INDEX
        if self.irq_type == index and not count and flags & VFIO_IRQ_SET_DATA_NONE:
            self._msi_disable(msix)
            return
        if self.irq_type not in (None, index):
            raise VfioError(errno.EINVAL, f"{self.name}: another interrupt type is enabled")
        if flags & VFIO_IRQ_SET_DATA_EVENTFD:
            fds = [fd_at(data, i) for i in range(count)]
            if self.irq_type == index:
                self._msi_set_block(start, fds, msix, caller)
                return
            self._msi_enable(start + count, msix)
            try:
                self._msi_set_block(start, fds, msix, caller)
            except VfioError:
                self._msi_disable(msix)
                raise
            return
        if self.irq_type != index or (start + count > self.num_ctx and MSI_NUM_CTX_BOUND.of(self.vdev.abi)):
            raise VfioError(errno.EINVAL, f"{self.name}: loopback on vectors {start}+{count} of irq index "
                                          f"{index}, which has {self.num_ctx} enabled")
        for i in range(start, start + count):
            trigger = self.msi_ctx.get(i)
            if trigger is None:
                continue
            if flags & VFIO_IRQ_SET_DATA_NONE or (flags & VFIO_IRQ_SET_DATA_BOOL and data[i - start]):
                trigger.signal()

    def _msi_enable(self, nvec: int, msix: bool) -> None:
        """vfio_msi_enable: the vector count is fixed here (NORESIZE) until disabled."""
        if nvec < 1:
            # pci_alloc_irq_vectors(pdev, 1, nvec): fewer than the one it needs
            raise VfioError(errno.ERANGE, f"{self.name}: enabling MSI needs at least one vector")
        fn = self.function
        # pci_intx_for_msi: INTx is off in the function while messages are on
        fn.config_write(PCI_COMMAND, 2, fn.command() | PCI_COMMAND_INTX_DISABLE)
        if msix:
            _msix_of(fn).host_enable()
            self.irq_type = VFIO_PCI_MSIX_IRQ_INDEX
        else:
            _msi_of(fn).host_enable(nvec)
            self.irq_type = VFIO_PCI_MSI_IRQ_INDEX
            # the virtual Multiple Message Enable may not exceed what was enabled
            self.msi_qmax = (nvec * 2 - 1).bit_length() - 1
        self.num_ctx = nvec

    def _msix_dynamic(self) -> bool:
        return MSIX_DYNAMIC.of(self.vdev.abi) and self.function.msix is not None

    def _msi_set_block(self, start: int, fds: List[int], msix: bool, caller) -> None:
        if not MSI_NUM_CTX_BOUND.of(self.vdev.abi):
            self._msi_set_block_dynamic(start, fds, msix, caller)
            return
        if start >= self.num_ctx or start + len(fds) > self.num_ctx:
            raise VfioError(errno.EINVAL, f"{self.name}: vectors {start}+{len(fds)} beyond the {self.num_ctx} "
                                          "enabled (disable with count 0 to change the count)")
        done = start
        try:
            for i, fd in enumerate(fds):
                done = start + i + 1
                self._msi_set_vector_signal(start + i, fd, msix, caller)
        except VfioError:
            for vector in range(start, done):
                self._msi_set_vector_signal(vector, -1, msix, caller)
            raise

    def _msi_set_block_dynamic(self, start: int, fds: List[int], msix: bool, caller) -> None:
        """6.5+'s vfio_msi_set_block: vector by vector; a vector past those enabled
        exists only for dynamic MSI-X (vfio_msi_alloc_irq), else pci_irq_vector's -EINVAL."""
        done = start
        try:
            for i, fd in enumerate(fds):
                vector = start + i
                if fd >= 0 and vector >= self.num_ctx and not (msix and self._msix_dynamic()):
                    raise VfioError(errno.EINVAL, f"{self.name}: vector {vector} is past the {self.num_ctx} "
                                                  f"{'MSI-X' if msix else 'MSI'} vectors enabled")
                done = vector + 1
                self._msi_set_vector_signal(vector, fd, msix, caller)
        except VfioError:
            for vector in range(start, done):
                self._msi_set_vector_signal(vector, -1, msix, caller)
            raise

    def _msi_set_vector_signal(self, vector: int, fd: int, msix: bool, caller) -> None:
        msix_cap = _msix_of(self.function) if msix else None
        old = self.msi_ctx.pop(vector, None)
        if old is not None:
            if msix_cap is not None:
                msix_cap.host_mask(vector, True)  # free_irq masks the entry
            release_eventfd(old)
        if fd < 0:
            return
        self.msi_ctx[vector] = self._eventfd(caller, fd)
        if msix_cap is not None:
            msix_cap.host_mask(vector, False)  # request_irq: a pending message is delivered now

    def _msi_disable(self, msix: bool) -> None:
        for vector in list(self.msi_ctx):
            self._msi_set_vector_signal(vector, -1, msix, None)
        fn = self.function
        if msix:
            _msix_of(fn).host_disable()
        else:
            _msi_of(fn).host_disable()
        fn.config_write(PCI_COMMAND, 2, fn.command() & ~PCI_COMMAND_INTX_DISABLE)
        self.irq_type = None
        self.num_ctx = 0

    # ERR / REQ --------------------------------------------------------------------
    def _set_err_trigger(self, index, start, count, flags, data, caller) -> None:
        self.err_trigger = set_ctx_trigger_single(self.err_trigger, start, count, flags, data, caller)

    def _set_req_trigger(self, index, start, count, flags, data, caller) -> None:
        self.req_trigger = set_ctx_trigger_single(self.req_trigger, start, count, flags, data, caller)


    # -- the function's interrupts arrive here (PciDevice.irq_sink) -----------------
    def intx_line(self, asserted: bool) -> None:
        if asserted:
            self.intx_fire()

    def msi_message(self, index: int, vector: int) -> None:
        if self.irq_type == index:
            trigger = self.msi_ctx.get(vector)
            if trigger is not None:
                trigger.signal()

    def error_signal(self) -> None:
        if self.err_trigger is not None:
            self.err_trigger.signal()
