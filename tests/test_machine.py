"""The emulated host built from a topology: core, type1, vfio-pci and edu working together in-process."""

import mmap
import struct
import time

import pytest

from cuse_vfio import uapi
from cuse_vfio.machine import topology
from cuse_vfio.machine import Machine
from cuse_vfio.machine.topology import TopologyError
from cuse_vfio.transport.local import LocalProcess

EDU = "0000:00:02.0"
BAR0 = 0
CONFIG = 7 << 40


@pytest.fixture
def machine():
    m = Machine(topology.load())
    yield m
    m.close()


def _open_device(p):
    c = p.open("/dev/vfio/vfio")
    g = p.open("/dev/vfio/2")
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, struct.pack("<i", c))
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
    d = p.ioctl(g, uapi.VFIO_GROUP_GET_DEVICE_FD, EDU.encode() + b"\0")
    return c, g, d


def _rd(p, d, off, size=4):
    return int.from_bytes(p.pread(d, size, BAR0 + off), "little")


def _wr(p, d, off, value, size=4):
    p.pwrite(d, value.to_bytes(size, "little"), BAR0 + off)


def test_default_topology_serves_edu_in_group_2(machine):
    assert machine.group_ids == [2]
    p = LocalProcess(machine.dispatcher)
    c, g, d = _open_device(p)
    assert int.from_bytes(p.pread(d, 4, CONFIG), "little") == 0x11E81234
    assert _rd(p, d, 0x00) == 0x010000ED
    info = uapi.vfio_device_info(argsz=20)
    p.ioctl(d, uapi.VFIO_DEVICE_GET_INFO, info)
    assert (info.num_regions, info.num_irqs) == (9, 5)
    assert info.flags & uapi.VFIO_DEVICE_FLAGS_PCI


def test_edu_dma_goes_through_type1_and_faults_are_logged(machine):
    p = LocalProcess(machine.dispatcher)
    c, g, d = _open_device(p)
    cmd = int.from_bytes(p.pread(d, 2, CONFIG + 4), "little")
    p.pwrite(d, (cmd | 0x6).to_bytes(2, "little"), CONFIG + 4)  # memory + bus master
    buf = p.memory.alloc(2 * mmap.PAGESIZE)
    p.memory.write(buf, b"cuse-vfio dma!!!")
    dma = uapi.vfio_iommu_type1_dma_map(argsz=32, flags=3, vaddr=buf, iova=0x100000, size=2 * mmap.PAGESIZE)
    p.ioctl(c, uapi.VFIO_IOMMU_MAP_DMA, dma)

    def run_dma(src, dst, count, cmd):
        _wr(p, d, 0x80, src, 8)
        _wr(p, d, 0x88, dst, 8)
        _wr(p, d, 0x90, count, 8)
        _wr(p, d, 0x98, cmd, 8)
        for _ in range(500):  # edu moves the bytes on a timer, as QEMU does
            if not _rd(p, d, 0x98, 8) & 1:
                return
            time.sleep(0.01)
        raise AssertionError("edu DMA did not finish")

    run_dma(0x100000, 0x40000, 16, 0x1)              # RAM -> device buffer
    run_dma(0x40000, 0x100000 + 4096, 16, 0x1 | 0x2)  # device buffer -> RAM, next page
    assert p.memory.read(buf + 4096, 16) == b"cuse-vfio dma!!!"
    assert machine.fault_log.total == 0
    run_dma(0x40000, 0x900000, 16, 0x1 | 0x2)        # to an IOVA nobody mapped
    faults = machine.fault_log.faults()
    assert len(faults) == 1 and faults[0].iova == 0x900000 and faults[0].device == EDU
    assert p.memory.read(buf + 4096, 16) == b"cuse-vfio dma!!!"


def test_a_dma_after_the_container_is_gone_is_in_the_fault_log(machine):
    """The device's timer may fire after its user left: that DMA is a fault like any other (--fault-log)."""
    from cuse_vfio.devices import DmaFault

    p = LocalProcess(machine.dispatcher)
    c, g, d = _open_device(p)
    cmd = int.from_bytes(p.pread(d, 2, CONFIG + 4), "little")
    p.pwrite(d, (cmd | 0x6).to_bytes(2, "little"), CONFIG + 4)
    for fd in (d, g, c):
        p.close(fd)
    with pytest.raises(DmaFault):
        machine.vdevs[EDU].function.dma.write(0x100000, b"late")
    (fault,) = machine.fault_log.faults()
    assert fault.device == EDU and fault.iova == 0x100000 and fault.direction == "write"


def test_sysfs_view_reports_the_model(machine):
    view = machine.sysfs_view()
    assert view.read(f"bus/pci/devices/{EDU}/vendor") == b"0x1234\n"
    assert view.read(f"bus/pci/devices/{EDU}/device") == b"0x11e8\n"
    assert view.readlink(f"bus/pci/devices/{EDU}/iommu_group").endswith("kernel/iommu_groups/2")
    first = view.read(f"bus/pci/devices/{EDU}/resource").splitlines()[0].split()
    assert int(first[1], 16) - int(first[0], 16) + 1 == 1 << 20


def test_unknown_model_is_a_topology_error():
    text = '[[device]]\nbdf = "0000:00:03.0"\nmodel = "edu"\ngroup = 3\n'
    Machine(topology.parse(text, "<ok>")).close()
    with pytest.raises((TopologyError, KeyError)):
        Machine(topology.parse(text.replace('"edu"', '"no-such-model"'), "<bad>"))


@pytest.mark.parametrize("width", ["4.0", "true", '"4"'])
def test_io_width_must_be_an_integer(width):
    text = f'[[device]]\nbdf = "0000:00:03.0"\nmodel = "edu"\ngroup = 3\nio_width = {width}\n'
    with pytest.raises(TopologyError, match="io_width is 1, 2, 4 or 8"):
        Machine(topology.parse(text, "<bad>"))


@pytest.mark.parametrize("name, result", [
    (EDU, "ok"), (EDU + "  ", "ok"), (EDU + "x", "ENODEV"), ("0000:00:02", "ENODEV"),
    (EDU + " foo", "EINVAL"), (EDU + " vf_token=01234567-89ab-cdef-0123-456789abcdef", "EINVAL"),
    (EDU + " vf_token=zz", "EINVAL"),
])
def test_device_names_follow_vfio_pci_match(machine, name, result):
    import errno

    p = LocalProcess(machine.dispatcher)
    c = p.open("/dev/vfio/vfio")
    g = p.open("/dev/vfio/2")
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, struct.pack("<i", c))
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
    try:
        p.ioctl(g, uapi.VFIO_GROUP_GET_DEVICE_FD, name.encode() + b"\0")
        got = "ok"
    except OSError as e:
        got = errno.errorcode[e.errno]
    assert got == result
