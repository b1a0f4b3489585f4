"""vfio-pci's core: a PCI function (:mod:`..pci`) presented to user space as a VFIO device.

``VfioPciDevice`` implements ``cuse_vfio.core.ops.DeviceOps`` the way
``drivers/vfio/pci/vfio_pci_core.c`` (6.1) implements ``vfio_device_ops``:
open and release (enable, reset, restore), the ioctl table, GET_INFO and
GET_REGION_INFO, and mmap.  What it owns lives beside it, as the kernel
splits vfio-pci: the virtual config space (:mod:`.config`), the interrupts
and SET_IRQS (:mod:`.intrs`), region reads and writes and ioeventfds
(:mod:`.rdwr`), resets (:mod:`.reset`) and runtime power management
(:mod:`.power`).

* Resets: VFIO_DEVICE_FLAGS_RESET when the function has a reset method
  (:meth:`VfioPciDevice.reset_methods`); hot reset through a
  :class:`.reset.HotResetBus` with the group-fd rules; the 6.1 low-power
  features are the only DEVICE_FEATUREs.
* Regions and mmap (:mod:`.regions`): a plain-memory BAR's memfd, or the
  windows of a register BAR as sparse mmap areas (:meth:`VfioPciDevice.region_memory`,
  :meth:`VfioPciDevice.mmap`), is what a transport hands to the client.
* DMA: ``set_dma_space(space)`` (the IOMMU driver's ``DmaSpace``, or None) is
  attached to the function's ``DmaPort``; the model never holds it.
* Model code that raises fails one access with EIO (:class:`ModelFailure`).
"""

from __future__ import annotations

import errno
import logging
import uuid
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional

from ...errors import RetryRequest, VfioError
from ...uapi import (
    VFIO_DEVICE_FEATURE,
    VFIO_DEVICE_FLAGS_PCI,
    VFIO_DEVICE_FLAGS_RESET,
    VFIO_DEVICE_GET_INFO,
    VFIO_DEVICE_GET_IRQ_INFO,
    VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
    VFIO_DEVICE_GET_REGION_INFO,
    VFIO_DEVICE_IOEVENTFD,
    VFIO_DEVICE_PCI_HOT_RESET,
    VFIO_DEVICE_RESET,
    VFIO_DEVICE_SET_IRQS,
    VFIO_PCI_NUM_IRQS,
    VFIO_PCI_NUM_REGIONS,
    device_feature_header,
    offsetofend,
    vfio_device_info,
    vfio_iommu_type1_info,
)
from ...uapi.abi import KernelAbi
from ..pci import (
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_IO,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_INTERRUPT_PIN,
    PCI_PM_CTRL,
    PCI_PM_CTRL_STATE_MASK,
    PciDevice,
    SharedMemory,
)
from . import reset as _reset
from .config import VirtualConfig
from .intrs import Interrupts
from .power import RuntimePm
from .rdwr import (
    BAR_IO_WIDTH,
    Ioeventfds,
    region_table,
    vfio_pci_rw,
)
from .regions import Regions
from .reset import HotResetBus

log = logging.getLogger(__name__)


class ModelFailure(VfioError):
    """EIO for one access, because the device model raised (the traceback is in the log)."""


def _default_group_of_fd(caller, fd: int) -> int:
    file_object = caller.resolve_fd(fd)
    iommu_group = getattr(file_object, "iommu_group", None)
    if iommu_group is None:
        raise VfioError(errno.EINVAL, f"fd {fd} is not a VFIO group")
    return iommu_group.id


def intx_mask_broken(fn: PciDevice) -> bool:
    """pci_intx_mask_broken: the INTx-disable bit does not take a toggle (a function before PCI 2.3)."""
    orig = fn.command()
    toggle = orig ^ PCI_COMMAND_INTX_DISABLE
    fn.config_write(PCI_COMMAND, 2, toggle)
    new = fn.command()
    fn.config_write(PCI_COMMAND, 2, orig)
    return new != toggle


def pci_enable_device(fn: PciDevice) -> None:
    """pci_enable_device: decode on for the resource types the function has, and
    INTx enabled in a function with an interrupt pin (do_pci_enable_device)."""
    cmd = fn.command()
    if any(b is not None and b.io for b in fn.bars):
        cmd |= PCI_COMMAND_IO
    if any(b is not None and not b.io for b in fn.bars) or fn.rom is not None:
        cmd |= PCI_COMMAND_MEMORY
    if fn.config_read(PCI_INTERRUPT_PIN, 1):
        cmd &= ~PCI_COMMAND_INTX_DISABLE
    fn.config_write(PCI_COMMAND, 2, cmd)


class VfioPciDevice:
    """A PCI function bound to vfio-pci: the DeviceOps the core calls."""

    def __init__(self, function: PciDevice, name: Optional[str] = None, *, dma_space=None,
                 reset_bus: Optional[HotResetBus] = None, io_width: Optional[int] = None,
                 group_of_fd: Callable[[object, int], int] = _default_group_of_fd,
                 abi: Optional[KernelAbi] = None, nointxmask: bool = False, disable_idle_d3: bool = False,
                 mmap_windows: Optional[bool] = None):
        #: the kernel release whose vfio-pci this device is (uapi/abi.py)
        self.abi = abi or KernelAbi()
        if io_width is None:
            io_width = BAR_IO_WIDTH.of(self.abi)
        if io_width not in (1, 2, 4, 8):
            raise ValueError("io_width is 1, 2, 4 or 8")
        self.function = function
        self.name = name or function.name
        self.reset_bus = reset_bus
        self.io_width = io_width
        self.group_of_fd = group_of_fd
        self.lock = function.lock
        self.vconfig: Optional[VirtualConfig] = None
        self.irqs = Interrupts(self)
        self.ioeventfds = Ioeventfds(self)
        #: GET_REGION_INFO and mmap; the BARs' windows are offered as the function says unless told
        self.regions = Regions(self, function.mmap_windows if mmap_windows is None else bool(mmap_windows))
        self.runtime_pm = RuntimePm(self, disable_idle_d3)
        #: vfio_pci.nointxmask when the device was probed (the module hands it to vfio-pci-core at load)
        self.nointxmask = nointxmask
        self.reset_works = False
        self._saved_state: Optional[Dict[int, tuple]] = None
        function.irq_sink = self.irqs
        function.dma._attach(dma_space)
        self._ioctls = {
            VFIO_DEVICE_GET_INFO: self._get_info,
            VFIO_DEVICE_GET_REGION_INFO: self.regions.get_region_info,
            VFIO_DEVICE_GET_IRQ_INFO: self.irqs.get_irq_info,
            VFIO_DEVICE_SET_IRQS: self.irqs.set_irqs,
            VFIO_DEVICE_RESET: self._reset,
            VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: lambda arg: _reset.get_pci_hot_reset_info(self, arg),
            VFIO_DEVICE_PCI_HOT_RESET: lambda arg: _reset.pci_hot_reset(self, arg),
            VFIO_DEVICE_IOEVENTFD: self.ioeventfds.ioctl,
            VFIO_DEVICE_FEATURE: self._feature,
        }
        function.firmware_setup()  # the function was enumerated at boot...
        #: pci_setup_device: whether the function's INTx-disable bit works (!broken_intx_masking)
        self.intx_mask_supported = not intx_mask_broken(function)
        self.irqs.pci_2_3 = not nointxmask and self.intx_mask_supported
        pci_enable_device(self.function)  # ...and vfio-pci's probe enabled it
        self.vconfig = VirtualConfig(self)
        #: region index -> its access (.rdwr.region_table), made anew with each virtual config
        self.region_rw = region_table(self)
        self.runtime_pm.probe()

    def __repr__(self) -> str:
        return f"VfioPciDevice({self.name!r}, {self.function!r})"

    def set_dma_space(self, dma_space) -> None:
        """Attach (or detach, with None) the IOMMU the function's DMA goes through."""
        self.function.dma._attach(dma_space)

    # -- the state of the parts, under the names vfio-pci gives it (vdev->irq_type, ...) --
    irq_type = property(lambda self: self.irqs.irq_type)
    intx = property(lambda self: self.irqs.intx)
    msi_ctx = property(lambda self: self.irqs.msi_ctx)
    num_ctx = property(lambda self: self.irqs.num_ctx)
    virq_disabled = property(lambda self: self.irqs.virq_disabled)
    err_trigger = property(lambda self: self.irqs.err_trigger)
    req_trigger = property(lambda self: self.irqs.req_trigger)
    pm_runtime_engaged = property(lambda self: self.runtime_pm.engaged)

    # -- DeviceOps: lifecycle ------------------------------------------------------
    def open(self) -> None:
        """First open of a device fd (vfio_pci_core_enable)."""
        with self.lock:
            self.runtime_pm.enable()
            self.power_up()
            self._clear_master()  # the saved state must not include bus mastering
            pci_enable_device(self.function)
            # pci_try_reset_function at enable: whether it works decides VFIO_DEVICE_FLAGS_RESET
            self.reset_works = bool(self.reset_methods())
            self.guarded(self.try_reset_function)
            self._saved_state = self.save_state()
            # PCI 2.3 INTx masking (the function's INTx-disable bit), unless the module says not to:
            # then INTx is masked at the interrupt controller (disable_irq), see .intrs
            self.irqs.pci_2_3 = not self.nointxmask and self.intx_mask_supported
            if self.irqs.pci_2_3 and self.function.command() & PCI_COMMAND_INTX_DISABLE:
                self.function.config_write(PCI_COMMAND, 2, self.function.command() & ~PCI_COMMAND_INTX_DISABLE)
            self.vconfig = VirtualConfig(self)
            self.region_rw = region_table(self)

    def release(self) -> None:
        """Last close (vfio_pci_core_disable + close_device): quiet the device, restore it."""
        with self.lock:
            # out of low-power mode and into D0 first: the reset below needs it
            self.runtime_pm.disable()
            self.power_up()
            self._clear_master()  # stop the device from further DMA
            self.irqs.disable()
            self.ioeventfds.release_all()
            # INTx and MSI off (and decoding) around the reset, as pci_reset_function does;
            # a function that cannot be reset keeps its own state, only config is restored.
            self.function.config_write(PCI_COMMAND, 2, PCI_COMMAND_INTX_DISABLE)
            if self.reset_works:
                try:
                    self.guarded(self.function.reset_function)
                except VfioError:
                    pass  # logged; closing goes on
            if self._saved_state is not None:
                self.restore_state(self._saved_state)
                self._saved_state = None
            self._clear_master()  # pci_disable_device
            self.irqs.release_err_req()
            self._revoke_mappings()
            self.runtime_pm.disabled()

    def _revoke_mappings(self) -> None:
        """Cut off every client mapping of the BARs' memory (taken before this last close).

        In Linux a mapping holds the device file, so the device cannot be
        closed (nor its group opened by anyone else) while it exists.  Here a
        client's mapping is of a memfd, which outlives the device fd: each
        plain-memory BAR moves to a fresh memfd with the same bytes, and the
        earlier mappings keep only orphaned pages no model or later client sees.
        """
        for bar in self.function.bars:
            renew = getattr(bar, "renew_memory", None)
            if renew is None:
                continue
            try:
                renew()
            except OSError as e:
                # no memfd for the copy: the old memory stays, and so does the stale alias
                log.error("%s: cannot move a BAR to fresh memory at close (%s); earlier mappings still see it",
                          self.name, e)

    def request(self, count: int) -> None:
        """Hot removal is waiting for the user: ask through the REQ eventfd (vfio_pci_core_request)."""
        with self.lock:
            self.irqs.request(count)

    def match(self, name: str) -> bool:
        """vfio_pci_core_match: "<bdf>", then optionally spaces and one "vf_token=<uuid>".

        No SR-IOV is emulated, so a well-formed token is still refused
        (vfio_pci_validate_vf_token: "not a PF or VF"), as 6.1 refuses it.
        """
        if not name.startswith(self.name):
            return False
        rest = name[len(self.name):]
        if rest and rest[0] != " ":
            return False
        vf_token = False
        rest = rest.lstrip(" ")
        while rest:
            if vf_token or not rest.startswith("vf_token="):
                raise VfioError(errno.EINVAL, f"{self.name}: unknown or repeated option in device name {name!r}")
            token = rest[len("vf_token="):][:36]
            try:
                uuid.UUID(token)
            except ValueError:
                raise VfioError(errno.EINVAL, f"{self.name}: {token!r} is not a vf_token UUID") from None
            if len(token) != 36:
                raise VfioError(errno.EINVAL, f"{self.name}: {token!r} is not a vf_token UUID")
            vf_token = True
            rest = rest[len("vf_token=") + 36:].lstrip(" ")
        if vf_token:
            raise VfioError(errno.EINVAL, f"{self.name}: a VF token was given, but the device is neither a PF "
                                          "nor a VF")
        return True

    # -- the PCI core, as vfio-pci calls it --------------------------------------------
    def _clear_master(self) -> None:
        fn = self.function
        fn.config_write(PCI_COMMAND, 2, fn.command() & ~PCI_COMMAND_MASTER)

    def save_state(self) -> Dict[int, tuple]:
        return _reset.save_state(self.function)

    def restore_state(self, saved: Dict[int, tuple]) -> None:
        _reset.restore_state(self.function, saved)

    def reset_methods(self) -> List[str]:
        """The function's own reset methods, then ``bus`` when it is alone on a bus that can be reset.

        ``pci_parent_bus_reset`` refuses a root bus and a bus shared with
        other functions; QEMU's edu on q35 sits on the root bus, so the kernel
        finds no way to reset it.
        """
        methods = self.function.reset_methods()
        bus = self.reset_bus
        if bus is not None and bus.resettable and [m[2] for m in bus.members] == [self]:
            methods.append("bus")
        return methods

    def try_reset_function(self) -> None:
        """pci_try_reset_function: config saved and restored around the function's reset."""
        if not self.reset_methods():
            return
        saved = self.save_state()
        try:
            self.function.reset_function()
        finally:
            self.restore_state(saved)

    def power_up(self) -> None:
        """vfio_pci_set_power_state(vdev, PCI_D0) (pci_power_up on resume)."""
        if self.function.pm is not None and self.function.power_state:
            self.set_power_state(self.function.pm.offset, 0)

    def set_power_state(self, pm_offset: int, state: int) -> None:
        fn = self.function
        ctrl = fn.config_read(pm_offset + PCI_PM_CTRL, 2)
        fn.config_write(pm_offset + PCI_PM_CTRL, 2, (ctrl & ~PCI_PM_CTRL_STATE_MASK) | state)

    @contextmanager
    def awake(self):
        """The device awake and its lock held for one access (vfio_device_pm_runtime_get/put)."""
        with self.lock:
            self.runtime_pm.get()
            try:
                yield
            finally:
                self.runtime_pm.put()

    # -- DeviceOps: ioctl ----------------------------------------------------------
    def ioctl(self, cmd: int, arg) -> int:
        handler = self._ioctls.get(cmd)
        # vfio_device_fops_unl_ioctl wakes the device around every ioctl (runtime PM): awake(),
        # spelled out as vfio_pci_rw does (SET_IRQS's INTx unmask is on the interrupt path)
        pm = self.runtime_pm
        with self.lock:
            pm.get()
            try:
                if handler is None:
                    raise VfioError(errno.ENOTTY, f"{self.name}: vfio-pci has no ioctl 0x{cmd:x}")
                return handler(arg)
            except (VfioError, RetryRequest):
                raise  # vfio-pci's own rules (model code inside is run through guarded)
            except Exception:
                log.exception("%s: ioctl 0x%x failed unexpectedly", self.name, cmd)
                raise VfioError(errno.EIO, f"{self.name}: ioctl failed (see the server log)") from None
            finally:
                pm.put()

    def _feature(self, arg) -> int:
        # Through a device fd the core routes VFIO_DEVICE_FEATURE itself (DeviceFile.ioctl);
        # a caller holding the driver directly gets the same header checks here.
        flags, argsz = device_feature_header(arg)
        return self.device_feature(flags, arg, argsz)

    def device_feature(self, flags: int, arg, argsz: int) -> int:
        """DeviceOps.device_feature: the header is checked; the core holds awake() around it."""
        return self.runtime_pm.device_feature(flags, arg, argsz)

    def _get_info(self, arg) -> int:
        """vfio_pci_ioctl_get_info: 16 bytes, or 20 (cap_offset 0) when argsz leaves room for it."""
        minsz = offsetofend(vfio_device_info, "num_irqs")
        info = arg.fetch_struct(vfio_device_info, minsz)
        # For backward compatibility the kernel cannot require cap_offset; it measures
        # "room for it" with vfio_iommu_type1_info's, which ends at the same 20 bytes.
        capsz = offsetofend(vfio_iommu_type1_info, "cap_offset")
        if info.argsz >= capsz:
            minsz = capsz
            info.cap_offset = 0  # no device capabilities (zPCI has some; nothing here)
        info.flags = VFIO_DEVICE_FLAGS_PCI | (VFIO_DEVICE_FLAGS_RESET if self.reset_works else 0)
        info.num_regions = VFIO_PCI_NUM_REGIONS
        info.num_irqs = VFIO_PCI_NUM_IRQS
        arg.write(0, bytes(info)[:minsz])
        return 0

    def _reset(self, arg) -> int:
        if not self.reset_works:
            raise VfioError(errno.EINVAL, f"{self.name} cannot be reset on its own")
        self.power_up()
        self.guarded(self.try_reset_function)
        return 0

    # -- DeviceOps: read / write / mmap -----------------------------------------------------
    def read(self, size: int, offset: int) -> bytes:
        return vfio_pci_rw(self, offset, size, None) if size > 0 else b""

    def write(self, data: bytes, offset: int) -> int:
        return vfio_pci_rw(self, offset, len(data), bytes(data)) if data else 0

    def guarded(self, fn, *args):
        """Run device-model code (handlers, config hooks, reset) for one access.

        Whatever the model raises -- a bug, or a VfioError such as a DMA fault
        it did not handle -- fails this access with EIO, logged with its
        traceback; the device, its lock and the server carry on.  (The region
        accesses spell this out around their model call: ``model_failure``.)
        """
        try:
            return fn(*args)
        except Exception as e:
            raise self.model_failure(e) from None

    def model_failure(self, e: Exception) -> Exception:
        """What ``guarded`` fails an access with when model code raised ``e`` (call it in the except
        clause): ``e`` itself when it is a ModelFailure or a RetryRequest, else EIO, logged."""
        if isinstance(e, (ModelFailure, RetryRequest)):
            return e
        log.exception("%s: the device model failed an access; it keeps running", self.name)
        return ModelFailure(errno.EIO, f"{self.name}: the device model failed (see the server log)")

    def region_memory(self, index: int) -> SharedMemory:
        """The shared memory behind a mappable region (a plain-memory BAR, or one with windows), for a transport.

        A transport sends ``region_memory(i).fileno()`` (a memfd) to the client,
        which maps a page-aligned part of the BAR at the same offset into the
        memfd as into the BAR.  EINVAL for a region that cannot be mapped
        (registers, I/O, config, ROM, VGA).
        """
        return self.regions.region_memory(index)

    def mmap(self, offset: int, length: int):
        """vfio_pci_core_mmap: ``(memory, start)`` for a client mapping ``length`` bytes at file ``offset``
        (:meth:`.regions.Regions.mmap` says what may be mapped)."""
        return self.regions.mmap(offset, length)
