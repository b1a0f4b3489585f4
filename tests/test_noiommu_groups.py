"""Devices without an IOMMU (``iommu = false``): noiommu groups, their CAP_SYS_RAWIO rules, and DMA by PFN.

The DMA test is a real one: this test process locks a buffer, reads its page
frame number from /proc/self/pagemap (as a noiommu driver does), and has the
edu device copy into it by physical address; the server side resolves the
frame through this process's page map.
"""

import ctypes
import errno
import mmap
import os
import struct
import time

import pytest

from cuse_vfio import uapi
from cuse_vfio.machine import Machine
from cuse_vfio.machine.topology import TopologyError, parse
from cuse_vfio.memory import process_image
from cuse_vfio.transport.local import LocalProcess

EDU = "0000:00:05.0"
# io_width 8: a physical address needs all 64 bits of edu's DMA registers in one access
NOIOMMU_EDU = f'[[device]]\nbdf = "{EDU}"\nmodel = "edu"\ngroup = 5\niommu = false\ndma_mask = 0xffffffffffff\nio_width = 8\n'
CONFIG = 7 << 40


class Unprivileged(LocalProcess):
    """A client without CAP_SYS_RAWIO."""

    def capable(self, cap):
        return False


@pytest.fixture
def machine():
    m = Machine(parse(NOIOMMU_EDU, "t.toml"), noiommu=True)
    yield m
    m.close()


def test_a_device_without_an_iommu_needs_noiommu_mode():
    with pytest.raises(TopologyError, match="enable_unsafe_noiommu_mode"):
        Machine(parse(NOIOMMU_EDU, "t.toml"))
    m = Machine(parse(NOIOMMU_EDU + "[module.vfio]\nenable_unsafe_noiommu_mode = true\n", "t.toml"))
    m.close()


def test_a_noiommu_device_is_alone_in_its_group():
    text = NOIOMMU_EDU + '[[device]]\nbdf = "0000:00:06.0"\nmodel = "edu"\ngroup = 5\n'
    with pytest.raises(TopologyError, match="alone in its noiommu group"):
        parse(text, "t.toml")


def test_the_group_node_is_noiommu_n_and_the_kernel_is_tainted(caplog):
    m = Machine(parse(NOIOMMU_EDU, "t.toml"), noiommu=True)
    try:
        assert m.topology.groups[5].name == "noiommu-5" and m.iommu_groups[5].noiommu
        assert f"vfio-pci {EDU}: Adding kernel taint for vfio-noiommu group on device" in caplog.text
        assert m.sysfs_view().readlink(f"bus/pci/devices/{EDU}/iommu_group") .endswith("/kernel/iommu_groups/5")
    finally:
        m.close()


def test_opening_the_group_and_setting_noiommu_need_cap_sys_rawio(machine):
    weak = Unprivileged(machine.dispatcher)
    with pytest.raises(OSError) as e:
        weak.open("/dev/vfio/noiommu-5")
    assert e.value.errno == errno.EPERM
    p = LocalProcess(machine.dispatcher)
    c, g = p.open("/dev/vfio/vfio"), p.open("/dev/vfio/noiommu-5")
    with pytest.raises(OSError) as e:
        weak.open("/dev/vfio/noiommu-5")  # EPERM comes before EBUSY, as in vfio_group_fops_open
    assert e.value.errno == errno.EPERM
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, struct.pack("<i", c))
    assert p.ioctl(c, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_TYPE1v2_IOMMU) == 0
    with pytest.raises(OSError) as e:
        p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)  # type1 refuses a noiommu group
    assert e.value.errno == errno.ENODEV
    # the container's SET_IOMMU wants the capability too (vfio_noiommu_open)
    weak.fds[100] = p.fds[c]
    with pytest.raises(OSError) as e:
        weak.ioctl(100, uapi.VFIO_SET_IOMMU, uapi.VFIO_NOIOMMU_IOMMU)
    assert e.value.errno == errno.EPERM
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_NOIOMMU_IOMMU)
    assert p.ioctl(g, uapi.VFIO_GROUP_GET_DEVICE_FD, EDU.encode() + b"\0") >= 0


def pfn_of(vaddr: int) -> int:
    with open("/proc/self/pagemap", "rb") as f:
        entry, = struct.unpack("<Q", os.pread(f.fileno(), 8, (vaddr // mmap.PAGESIZE) * 8))
    assert entry >> 63, "page not present"
    return entry & ((1 << 55) - 1)


@pytest.mark.skipif(os.geteuid() != 0, reason="PFNs in /proc/self/pagemap need CAP_SYS_ADMIN")
def test_the_device_dmas_by_physical_address_into_the_openers_pages_only(machine):
    p = LocalProcess(machine.dispatcher, pid=os.getpid())
    buf = mmap.mmap(-1, 2 * mmap.PAGESIZE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert ctypes.CDLL(None, use_errno=True).mlock(ctypes.c_void_p(addr), 2 * mmap.PAGESIZE) == 0
    buf[:16] = b"to the device..."
    c, g = p.open("/dev/vfio/vfio"), p.open("/dev/vfio/noiommu-5")
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, struct.pack("<i", c))
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_NOIOMMU_IOMMU)
    d = p.ioctl(g, uapi.VFIO_GROUP_GET_DEVICE_FD, EDU.encode() + b"\0")
    p.pwrite(d, struct.pack("<H", 0x6), CONFIG + 4)  # memory + bus master
    p.memory = process_image(os.getpid())  # from here the DMA reaches this very process

    def run_dma(src, dst, cmd):
        for reg, value in ((0x80, src), (0x88, dst), (0x90, 16), (0x98, cmd)):
            p.pwrite(d, value.to_bytes(8, "little"), reg)
        for _ in range(500):  # edu moves the bytes on a timer, as QEMU does
            if not int.from_bytes(p.pread(d, 8, 0x98), "little") & 1:
                return
            time.sleep(0.01)
        raise AssertionError("edu DMA did not finish")

    phys0 = pfn_of(addr) * mmap.PAGESIZE
    phys1 = pfn_of(addr + mmap.PAGESIZE) * mmap.PAGESIZE
    run_dma(phys0, 0x40000, 0x1)               # RAM -> device buffer, by physical address
    run_dma(0x40000, phys1 + 32, 0x1 | 0x2)    # device buffer -> the second page
    assert buf[mmap.PAGESIZE + 32:mmap.PAGESIZE + 48] == b"to the device..."
    assert machine.fault_log.total == 0
    run_dma(0x40000, 0x1000, 0x1 | 0x2)        # a frame of no page of this process
    fault, = machine.fault_log.faults()
    assert fault.iova == 0x1000 and fault.device == EDU and "no page of pid" in fault.detail
