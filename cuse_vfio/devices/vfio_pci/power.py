"""vfio-pci's runtime power management and the 6.1 low-power DEVICE_FEATUREs (vfio_pci_core.c).

Once the user asked for low power (VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY*), the
device is runtime-suspended whenever no access is in progress: every ioctl,
read, write or mmap wakes it for its duration (pm_runtime_resume_and_get,
counted, so nested wakes are one), and a wake-up eventfd, if one was given,
is signalled on that first wake and ends low-power mode
(vfio_pci_core_runtime_resume).  Suspending masks INTx, saves the config
state and puts the function in D3hot, as the PCI core does.
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

    def __init__(self, vdev: "VfioPciDevice"):
        self.vdev = vdev
        #: low-power mode the user asked for (VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY*)
        self.engaged = False
        self.wake_eventfd = None
        self._suspended: Optional[tuple] = None
        self._usage = 0

    # -- around every access -------------------------------------------------------
    def get(self) -> None:
        """pm_runtime_resume_and_get: awake until the matching put()."""
        self._usage += 1
        self.resume()

    def put(self) -> None:
        """pm_runtime_put: the last put suspends again, when low power was asked for."""
        self._usage -= 1
        if not self._usage:
            self.suspend()

    def suspend(self) -> None:
        """vfio_pci_core_runtime_suspend, then the PCI core: INTx masked, state saved, D3hot."""
        vdev = self.vdev
        if not self.engaged or self._suspended is not None:
            return
        irqs = vdev.irqs
        intx_masked = irqs.irq_type == VFIO_PCI_INTX_IRQ_INDEX and irqs.intx is not None and not irqs.intx.masked
        if intx_masked:
            irqs.intx_mask()
        saved = vdev.save_state()
        if vdev.function.pm is not None:
            vdev.set_power_state(vdev.function.pm.offset, PCI_D3HOT)
        self._suspended = (saved, intx_masked)

    def resume(self) -> None:
        """Wake a runtime-suspended device for an access (vfio_pci_core_runtime_resume)."""
        if self._suspended is None:
            return
        vdev = self.vdev
        saved, intx_masked = self._suspended
        self._suspended = None
        if vdev.function.pm is not None:
            vdev.set_power_state(vdev.function.pm.offset, 0)
        vdev.restore_state(saved)
        if self.wake_eventfd is not None:
            self.wake_eventfd.signal()
            self.exit()
        if intx_masked:
            vdev.irqs.intx_unmask()

    # -- the features ------------------------------------------------------------------
    def entry(self, wake_eventfd) -> None:
        if self.engaged:
            if wake_eventfd is not None:
                release_eventfd(wake_eventfd)
            raise VfioError(errno.EINVAL, f"{self.vdev.name} is already in low-power mode")
        self.engaged = True
        self.wake_eventfd = wake_eventfd

    def exit(self) -> None:
        """__vfio_pci_runtime_pm_exit."""
        self.engaged = False
        if self.wake_eventfd is not None:
            release_eventfd(self.wake_eventfd)
            self.wake_eventfd = None

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
