"""Helpers shared by the test_iommu_* files (no tests here): a client with a type1 container."""

import ctypes
import errno

import pytest

from core_fakes import Topology
from cuse_vfio.core import BusDevice, IommuGroup, VfioBusDriver, device_bind
from cuse_vfio.devices import VfioPciDevice, create_model
from cuse_vfio.iommu import Type1Driver, register_default_drivers
from cuse_vfio.uapi import (
    VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_WRITE,
    VFIO_GROUP_SET_CONTAINER,
    VFIO_IOMMU_MAP_DMA,
    VFIO_IOMMU_UNMAP_DMA,
    VFIO_SET_IOMMU,
    VFIO_TYPE1v2_IOMMU,
    vfio_iommu_type1_dma_map,
    vfio_iommu_type1_dma_unmap,
)

PAGE = 4096
RW = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE
DEV = "0000:00:02.0"


def errname(excinfo):
    return errno.errorcode[excinfo.value.errno]


def fails(errname_expected, fn, *args, **kwargs):
    """Run fn, which must raise OSError with that errno name; returns the exception."""
    with pytest.raises(OSError) as e:
        fn(*args, **kwargs)
    assert errname(e) == errname_expected, e.value
    return e.value


class Client:
    """A process with a container, group 2 in it, and a type1 IOMMU set."""

    def __init__(self, iommu_type=VFIO_TYPE1v2_IOMMU, driver=None, topo=None, groups=(2,), set_iommu=True):
        self.driver = driver if driver is not None else Type1Driver()
        if topo is None:
            topo = Topology(drivers=[self.driver])
            for g in groups:
                topo.add(f"0000:00:{g:02x}.0", g)
        self.topo = topo
        self.p = topo.process()
        self.cfd = self.p.open("/dev/vfio/vfio")
        self.gfds = {}
        for g in groups:
            self.gfds[g] = self.p.open(f"/dev/vfio/{g}")
            self.p.ioctl(self.gfds[g], VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(self.cfd))
        if set_iommu:
            self.p.ioctl(self.cfd, VFIO_SET_IOMMU, iommu_type)

    @property
    def container(self):
        return self.p.fds[self.cfd]

    @property
    def iommu(self):
        return self.container.iommu_data

    @property
    def memory(self):
        return self.p.memory

    def buffer(self, size, writable=True):
        return self.p.memory.alloc(size, writable=writable)

    def map(self, iova, size, vaddr=None, flags=RW, argsz=None):
        if vaddr is None:
            vaddr = self.buffer(size)
        m = vfio_iommu_type1_dma_map(argsz=argsz if argsz is not None else ctypes.sizeof(vfio_iommu_type1_dma_map),
                                     flags=flags, vaddr=vaddr, iova=iova, size=size)
        self.p.ioctl(self.cfd, VFIO_IOMMU_MAP_DMA, m)
        return vaddr

    def unmap(self, iova, size, flags=0, trailing=b""):
        """UNMAP_DMA; returns the size the kernel wrote back."""
        u = vfio_iommu_type1_dma_unmap(argsz=ctypes.sizeof(vfio_iommu_type1_dma_unmap) + len(trailing),
                                       flags=flags, iova=iova, size=size)
        buf = bytearray(bytes(u) + trailing)
        self.p.ioctl(self.cfd, VFIO_IOMMU_UNMAP_DMA, buf)
        return vfio_iommu_type1_dma_unmap.from_buffer_copy(buf[:24]).size


class EduTopology(Topology):
    """Like core_fakes.Topology, but vfio-pci gets real VfioPciDevice(edu) ops, with set_dma_space."""

    def __init__(self, **driver_options):
        super().__init__(drivers=[])
        self.type1, self.noiommu = register_default_drivers(self.vfio, **driver_options)
        self.functions = {}
        self.vfio_pci = VfioBusDriver(self.vfio, "vfio-pci", self._edu_ops)

    def _edu_ops(self, dev):
        fn = create_model("edu", name=dev.name, manual_time=True)
        self.functions[dev.name] = fn
        ops = VfioPciDevice(fn)
        self.ops[dev.name] = ops
        return ops


__all__ = ["BusDevice", "Client", "DEV", "EduTopology", "IommuGroup", "PAGE", "RW", "device_bind", "errname",
           "fails"]
