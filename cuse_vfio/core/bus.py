"""The bus the core sits on: devices, their drivers, and IOMMU groups.

This is the part of the kernel that VFIO only observes: ``struct device``
with the driver bound to it, ``struct iommu_group`` with its member devices
and its notifier chain.  Tests and topologies build it; the VFIO core reacts
to its events exactly as ``vfio_iommu_group_notifier`` does.
"""

from __future__ import annotations

import enum
import errno
from typing import Callable, List, Optional, Protocol

from ..errors import VfioError


class NotifyAction(enum.Enum):
    """IOMMU_GROUP_NOTIFY_* events, in the order a driver bind/unbind emits them."""

    ADD_DEVICE = "add"
    DEL_DEVICE = "del"
    BIND_DRIVER = "bind"
    BOUND_DRIVER = "bound"
    UNBIND_DRIVER = "unbind"
    UNBOUND_DRIVER = "unbound"


Notifier = Callable[[NotifyAction, "BusDevice"], None]


class BusDriver(Protocol):
    """A driver that can bind to a BusDevice (vfio-pci, pci-stub, a host driver)."""

    name: str
    #: a vfio bus driver hands the device to user space (vfio-pci)
    is_vfio_driver: bool

    def probe(self, dev: "BusDevice") -> None: ...

    def remove(self, dev: "BusDevice") -> None: ...


class BusDevice:
    """A device on the emulated bus (the kernel's ``struct device``)."""

    def __init__(self, name: str):
        self.name = name
        self.driver: Optional[BusDriver] = None
        self.iommu_group: Optional[IommuGroup] = None
        #: what the bound driver keeps for the device (``dev_get_drvdata``)
        self.drvdata: object = None

    @property
    def driver_name(self) -> Optional[str]:
        return self.driver.name if self.driver is not None else None

    def __repr__(self) -> str:
        return f"BusDevice({self.name!r}, driver={self.driver_name!r})"


class IommuGroup:
    """The smallest set of devices the IOMMU can isolate from the rest."""

    def __init__(self, group_id: int, noiommu: bool = False):
        self.id = group_id
        #: a fake group made for a device without an IOMMU (``VFIO_NO_IOMMU``)
        self.noiommu = noiommu
        self.devices: List[BusDevice] = []
        self._notifiers: List[Notifier] = []

    def register_notifier(self, notifier: Notifier) -> None:
        self._notifiers.append(notifier)

    def unregister_notifier(self, notifier: Notifier) -> None:
        if notifier in self._notifiers:
            self._notifiers.remove(notifier)

    def notify(self, action: NotifyAction, dev: BusDevice) -> None:
        # A notifier may raise to veto a bind (see Group._on_notify): stop there.
        for notifier in list(self._notifiers):
            notifier(action, dev)

    def add_device(self, dev: BusDevice) -> None:
        if dev.iommu_group is not None:
            raise VfioError(errno.EBUSY, f"{dev.name} is already in IOMMU group {dev.iommu_group.id}")
        dev.iommu_group = self
        self.devices.append(dev)
        self.notify(NotifyAction.ADD_DEVICE, dev)

    def remove_device(self, dev: BusDevice) -> None:
        if dev.driver is not None:
            device_unbind(dev)
        self.devices.remove(dev)
        dev.iommu_group = None
        self.notify(NotifyAction.DEL_DEVICE, dev)

    def __repr__(self) -> str:
        return f"IommuGroup({self.id}, devices={[d.name for d in self.devices]})"


def device_bind(dev: BusDevice, driver: BusDriver) -> None:
    """Bind ``driver`` to ``dev`` (``device_driver_attach``), with the group told before and after."""
    if dev.driver is not None:
        raise VfioError(errno.EBUSY, f"{dev.name} is already bound to {dev.driver_name}")
    group = dev.iommu_group
    # As in really_probe, dev.driver is set when BIND_DRIVER goes out: a
    # notifier sees which driver is coming and may refuse it.
    dev.driver = driver
    try:
        if group is not None:
            group.notify(NotifyAction.BIND_DRIVER, dev)
        driver.probe(dev)
    except BaseException:
        dev.driver = None
        raise
    if group is not None:
        group.notify(NotifyAction.BOUND_DRIVER, dev)


def device_unbind(dev: BusDevice) -> None:
    """Release the driver of ``dev`` (``device_release_driver``); may block in a vfio driver's remove."""
    driver = dev.driver
    if driver is None:
        return
    group = dev.iommu_group
    if group is not None:
        group.notify(NotifyAction.UNBIND_DRIVER, dev)
    driver.remove(dev)
    dev.driver = None
    if group is not None:
        group.notify(NotifyAction.UNBOUND_DRIVER, dev)


class StubDriver:
    """A driver that never does DMA (pci-stub, pcieport) or a plain host driver that does."""

    is_vfio_driver = False

    def __init__(self, name: str):
        self.name = name

    def probe(self, dev: BusDevice) -> None:
        pass

    def remove(self, dev: BusDevice) -> None:
        pass
