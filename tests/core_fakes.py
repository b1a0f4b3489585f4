"""Small stand-ins for the core's pluggable parts, so core rules are tested alone."""

import errno

from cuse_vfio.core import BusDevice, IommuGroup, StubDriver, Vfio, VfioBusDriver, device_bind
from cuse_vfio.dispatch import Dispatcher
from cuse_vfio.errors import VfioError
from cuse_vfio.transport.local import LocalProcess


class FakeIommu:
    """Per-container state of FakeIommuDriver; records what the core did to it."""

    def __init__(self, driver, arg):
        self.driver = driver
        self.arg = arg
        self.groups = []
        self.released = False
        self.ioctls = []

    def release(self):
        self.released = True
        self.driver.released.append(self)

    def attach_group(self, group):
        if group.id in self.driver.refuse_groups:
            raise VfioError(errno.EIO, f"fake driver refuses group {group.id}")
        self.groups.append(group)

    def detach_group(self, group):
        self.groups.remove(group)

    def ioctl(self, cmd, arg):
        from cuse_vfio.uapi import VFIO_CHECK_EXTENSION

        if cmd == VFIO_CHECK_EXTENSION:
            return self.driver.extensions.get(arg.value, 0)
        self.ioctls.append(cmd)
        raise VfioError(errno.ENOTTY, "fake driver knows no ioctl")

    def read(self, size, offset):
        return b"r" * size


class FakeIommuDriver:
    def __init__(self, name, extensions, refuse_groups=()):
        self.name = name
        self.extensions = dict(extensions)
        self.refuse_groups = set(refuse_groups)
        self.opened = []
        self.released = []

    def check_extension(self, ext):
        return self.extensions.get(ext, 0)

    def open(self, arg):
        iommu = FakeIommu(self, arg)
        self.opened.append(iommu)
        return iommu


class FakeDeviceOps:
    def __init__(self, name):
        self.name = name
        self.opens = 0
        self.releases = 0
        self.requests = []
        self.on_request = None

    def open(self):
        self.opens += 1

    def release(self):
        self.releases += 1

    def ioctl(self, cmd, arg):
        raise VfioError(errno.ENOTTY, "no device ioctls")

    def read(self, size, offset):
        return bytes(size)

    def write(self, data, offset):
        return len(data)

    def request(self, count):
        self.requests.append(count)
        if self.on_request:
            self.on_request(count)


class Topology:
    """IOMMU group 2 with 0000:00:02.0 bound to vfio-pci (as QEMU's edu on q35), plus helpers."""

    def __init__(self, drivers=None, request_interval=0.05):
        self.vfio = Vfio(request_interval=request_interval)
        self.drivers = drivers if drivers is not None else [FakeIommuDriver("fake-type1", {1: 1, 3: 1})]
        for d in self.drivers:
            self.vfio.register_iommu_driver(d)
        self.ops = {}
        self.vfio_pci = VfioBusDriver(self.vfio, "vfio-pci", self._ops_for)
        self.groups = {}
        self.devs = {}
        self.dispatcher = Dispatcher(self.vfio)

    def _ops_for(self, dev):
        ops = FakeDeviceOps(dev.name)
        self.ops[dev.name] = ops
        return ops

    def add(self, name, group_id, driver="vfio-pci"):
        group = self.groups.get(group_id)
        if group is None:
            group = self.groups[group_id] = IommuGroup(group_id)
        dev = self.devs[name] = BusDevice(name)
        group.add_device(dev)
        if driver == "vfio-pci":
            device_bind(dev, self.vfio_pci)
        elif driver is not None:
            device_bind(dev, StubDriver(driver))
        return dev

    def process(self):
        return LocalProcess(self.dispatcher)
