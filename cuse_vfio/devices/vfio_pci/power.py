"""vfio-pci's runtime power management and the 6.1 low-power DEVICE_FEATUREs (vfio_pci_core.c).

The device's runtime-PM usage count decides, as the kernel's does, when it
is suspended: the count drops to 0 -> the device suspends; an access with
the count at 0 resumes it.  Who holds a count (Linux 6.1):

* ``local_pci_probe`` holds one while vfio-pci probes; vfio-pci's probe
  (``vfio_pci_core_register_device``) puts the device in D0 and drops it,
  unless ``vfio_pci.disable_idle_d3`` is set: by default a device no one has
  open is suspended ("idle D3").
* The first open (``vfio_pci_core_enable``) takes one and the last close
  (``vfio_pci_core_disable``) drops it again, both only without
  ``disable_idle_d3``.
* Every ioctl, read, write or mmap holds one for its duration
  (``vfio_device_pm_runtime_get``), so nested wakes are one.
* Low-power entry (VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY*) drops one without
  suspending (``pm_runtime_put_noidle``); the ioctl's own put then suspends
  the device.  Leaving low power takes it back (``pm_runtime_get_noresume``),
  as does the first wake when a wake-up eventfd was given, which is signalled
  then (``vfio_pci_core_runtime_resume``).  With ``disable_idle_d3`` the
  probe's count is the one low-power entry lets go of, so entry still works.

Suspending (``vfio_pci_core_runtime_suspend`` then ``pci_pm_runtime_suspend``)
puts the function in D0, masks INTx if it is in use, saves the config state
and moves a function with a PM capability to D3hot (one without stays in
D0: ``pci_target_state``).  Resuming powers it up, restores the state and
unmasks INTx if suspending masked it.  A user sees it in the sysfs view: the
PM control register of ``config`` and ``power_state``.
"""

from __future__ import annotations

import ctypes
import errno
from typing import TYPE_CHECKING, Optional

from ...errors import VfioError
from ...uapi import (
    DEVICE_FEATURE_MINSZ,
    VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY,
    VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP,
    VFIO_DEVICE_FEATURE_LOW_POWER_EXIT,
    VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
    VFIO_DEVICE_FEATURE_MIGRATION,
    VFIO_DEVICE_FEATURE_SET,
    VFIO_PCI_INTX_IRQ_INDEX,
    check_feature,
    vfio_device_low_power_entry_with_wakeup,
)
from ..pci import PCI_D3HOT
from .intrs import release_eventfd

if TYPE_CHECKING:
    from .core import VfioPciDevice


class RuntimePm:
    """The runtime-PM state of one vfio-pci device; runs under the device's lock."""

    def __init__(self, vdev: "VfioPciDevice", disable_idle_d3: bool = False):
        self.vdev = vdev
        #: ``vfio_pci.disable_idle_d3`` as the module had it when the device was probed
        self.disable_idle_d3 = disable_idle_d3
        #: low-power mode the user asked for (VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY*)
        self.engaged = False
        self.wake_eventfd = None
        #: (the saved config state, whether suspending masked INTx) while suspended, else None
        self.suspend_state: Optional[tuple] = None
        #: the usage count; local_pci_probe holds one while the driver probes
        self.usage = 1

    @property
    def suspended(self) -> bool:
        return self.suspend_state is not None

    # -- the driver's lifecycle --------------------------------------------------------
    def probe(self) -> None:
        """vfio_pci_core_register_device: D0, then, unless disable_idle_d3, idle (pm_runtime_put)."""
        self.vdev.power_up()
        if not self.disable_idle_d3:
            self.put()

    def enable(self) -> None:
        """vfio_pci_core_enable: the first open holds the device awake."""
        if not self.disable_idle_d3:
            self.get()

    def disable(self) -> None:
        """The start of vfio_pci_core_disable: out of low-power mode (vfio_pci_runtime_pm_exit), awake."""
        self.exit()
        self.resume()

    def disabled(self) -> None:
        """The end of vfio_pci_core_disable: the open's count goes (the device idles again)."""
        if not self.disable_idle_d3:
            self.put()

    # -- the usage count -----------------------------------------------------------------
    def get(self) -> None:
        """pm_runtime_resume_and_get: awake until the matching put()."""
        self.usage += 1
        if self.suspend_state is not None:
            self.resume()

    def put(self) -> None:
        """pm_runtime_put: the count reaching 0 suspends the device."""
        self.usage -= 1
        if self.usage <= 0:
            self.usage = 0
            self.suspend()

    def suspend(self) -> None:
        """vfio_pci_core_runtime_suspend, then the PCI core: D0, INTx masked, state saved, D3hot."""
        vdev = self.vdev
        if self.suspend_state is not None:
            return
        vdev.power_up()  # the user may have put it in D3hot through config space
        irqs = vdev.irqs
        intx_masked = irqs.irq_type == VFIO_PCI_INTX_IRQ_INDEX and irqs.intx_mask()
        saved = vdev.save_state()
        if vdev.function.pm is not None:
            vdev.set_power_state(vdev.function.pm.offset, PCI_D3HOT)
        self.suspend_state = (saved, intx_masked)

    def resume(self) -> None:
        """pci_pm_runtime_resume, then vfio_pci_core_runtime_resume."""
        if self.suspend_state is None:
            return
        vdev = self.vdev
        saved, intx_masked = self.suspend_state
        self.suspend_state = None
        vdev.power_up()
        vdev.restore_state(saved)
        if self.wake_eventfd is not None:
            self.wake_eventfd.signal()
            self.exit()
        if intx_masked:
            vdev.irqs.intx_unmask()

    # -- low-power mode ------------------------------------------------------------------
    def entry(self, wake_eventfd) -> None:
        """vfio_pci_runtime_pm_entry: the ioctl's own put() then suspends the device."""
        if self.engaged:
            if wake_eventfd is not None:
                release_eventfd(wake_eventfd)
            raise VfioError(errno.EINVAL, f"{self.vdev.name} is already in low-power mode")
        self.engaged = True
        self.wake_eventfd = wake_eventfd
        self.usage -= 1  # pm_runtime_put_noidle

    def exit(self) -> None:
        """__vfio_pci_runtime_pm_exit."""
        if not self.engaged:
            return
        self.engaged = False
        self.usage += 1  # pm_runtime_get_noresume
        if self.wake_eventfd is not None:
            release_eventfd(self.wake_eventfd)
            self.wake_eventfd = None

    # -- the features ------------------------------------------------------------------
    def device_feature(self, flags: int, arg, argsz: int) -> int:
        """vfio_pci_core_ioctl_feature (6.1), after the core checked the header.

        No migration (no mig_ops) and no SR-IOV VF token: those are ENOTTY,
        as is every feature number 6.1 does not know.  What vfio-pci itself
        implements for every device is low-power entry/exit (runtime PM).
        """
        number = flags & VFIO_DEVICE_FEATURE_MASK
        if number == VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY:
            if check_feature(flags, argsz, VFIO_DEVICE_FEATURE_SET, 0):
                self.entry(None)
            return 0
        if number == VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP:
            size = ctypes.sizeof(vfio_device_low_power_entry_with_wakeup)
            if check_feature(flags, argsz, VFIO_DEVICE_FEATURE_SET, size):
                entry = vfio_device_low_power_entry_with_wakeup.from_buffer_copy(arg.read(DEVICE_FEATURE_MINSZ, size))
                if entry.wakeup_eventfd < 0:
                    raise VfioError(errno.EINVAL, "LOW_POWER_ENTRY_WITH_WAKEUP: wakeup_eventfd must be an fd")
                self.entry(arg.caller.get_eventfd(entry.wakeup_eventfd))
            return 0
        if number == VFIO_DEVICE_FEATURE_LOW_POWER_EXIT:
            if check_feature(flags, argsz, VFIO_DEVICE_FEATURE_SET, 0):
                self.exit()
            return 0
        what = "migration" if number in (VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE) \
            else f"feature {number}"
        raise VfioError(errno.ENOTTY, f"{self.vdev.name}: {what} is not supported")
