"""virtio-net from a topology file: Machine builds it, a client drives it through type1 as DPDK and Linux do."""

import struct

import pytest

from cuse_vfio import uapi
from cuse_vfio.machine import topology
from cuse_vfio.machine import Machine
from cuse_vfio.machine.topology import TopologyError
from cuse_vfio.transport.local import LocalProcess
from test_devices_virtio_net import read_pcap
from virtio_driver import F_MRG_RXBUF, Memory, Regs, VirtioNetDriver, ether

BDF = "0000:00:03.0"
IOVA = 0x100000
DMA_SIZE = 1 << 20

TOPOLOGY = """\
[[device]]
bdf = "0000:00:03.0"
model = "virtio-net"
group = 3
mac = "52:54:00:12:34:56"
pcap = "{pcap}"
"""


@pytest.fixture
def machine(tmp_path):
    m = Machine(topology.parse(TOPOLOGY.format(pcap=tmp_path / "dev.pcap"), "<virtio-net test>"))
    yield m
    m.close()


def client(machine):
    """A process that opens the device, enables it and maps 1 MiB for DMA, as DPDK's EAL does."""
    p = LocalProcess(machine.dispatcher)
    c = p.open("/dev/vfio/vfio")
    g = p.open("/dev/vfio/3")
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, struct.pack("<i", c))
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
    d = p.ioctl(g, uapi.VFIO_GROUP_GET_DEVICE_FD, BDF.encode() + b"\0")
    regs = Regs(lambda size, off: p.pread(d, size, off), lambda data, off: p.pwrite(d, data, off))
    regs.cfg_write(4, 2, regs.cfg_read(4, 2) | 0x7)          # I/O, memory, bus master
    buf = p.memory.alloc(DMA_SIZE)
    p.ioctl(c, uapi.VFIO_IOMMU_MAP_DMA, uapi.vfio_iommu_type1_dma_map(
        argsz=32, flags=3, vaddr=buf, iova=IOVA, size=DMA_SIZE))
    mem = Memory(IOVA, DMA_SIZE, lambda iova, n: p.memory.read(buf + iova - IOVA, n),
                 lambda iova, data: p.memory.write(buf + iova - IOVA, data))
    return p, d, regs, mem


def test_topology_builds_the_device_and_the_sysfs_view_shows_it(machine):
    view = machine.sysfs_view()
    assert view.read(f"bus/pci/devices/{BDF}/vendor") == b"0x1af4\n"
    assert view.read(f"bus/pci/devices/{BDF}/device") == b"0x1000\n"
    assert view.read(f"bus/pci/devices/{BDF}/subsystem_device") == b"0x0001\n"
    assert view.read(f"bus/pci/devices/{BDF}/class") == b"0x020000\n"
    lines = view.read(f"bus/pci/devices/{BDF}/resource").splitlines()
    start, end, flags = (int(x, 16) for x in lines[0].split())
    assert end - start + 1 == 32 and flags & 0x100            # BAR0: 32 bytes of I/O (IORESOURCE_IO)


@pytest.mark.parametrize("legacy", [True, False])
def test_a_client_brings_it_up_over_type1_and_loops_frames_back(machine, tmp_path, legacy):
    p, d, regs, mem = client(machine)
    info = uapi.vfio_region_info(argsz=32, index=0)
    p.ioctl(d, uapi.VFIO_DEVICE_GET_REGION_INFO, info)
    assert info.size == 32 and not info.flags & uapi.VFIO_REGION_INFO_FLAG_MMAP
    info4 = uapi.vfio_region_info(argsz=32, index=4)
    p.ioctl(d, uapi.VFIO_DEVICE_GET_REGION_INFO, info4)
    assert info4.size == 0x4000 and not info4.flags & uapi.VFIO_REGION_INFO_FLAG_MMAP  # DPDK: legacy it is
    drv = VirtioNetDriver(regs, mem, legacy=legacy).bring_up(extra=[F_MRG_RXBUF])
    assert drv.mac() == bytes.fromhex("525400123456")
    frames = [ether(b"\xff" * 6, drv.mac(), bytes([i]) * 100) for i in range(3)]
    for f in frames:
        drv.send(f, indirect=True)
    assert [payload for _, payload in drv.received()] == frames
    assert read_pcap(tmp_path / "dev.pcap") == [f for f in frames for _ in range(2)]
    assert machine.fault_log.total == 0


def test_iommu_fault_through_type1_is_logged_with_the_device(machine):
    p, d, regs, mem = client(machine)
    drv = VirtioNetDriver(regs, mem, legacy=False).bring_up()
    head = drv.send(ether(b"\xff" * 6, drv.mac()), notify=False)
    table = drv.queues[1].desc + 16 * head
    mem.write(table, struct.pack("<Q", 0x4000_0000))          # the frame's buffer: an unmapped IOVA
    drv.notify(1)
    faults = machine.fault_log.faults()
    assert len(faults) == 1 and faults[0].iova == 0x4000_0000 and faults[0].device == BDF
    assert drv.status() & 0x40 and drv.queues[1].used_idx() == 0


def test_bad_options_are_topology_errors(tmp_path):
    for key, text in (('mac = "01:02:03:04:05:06"', "multicast"), ('backend = "tap"', "needs tap"),
                      ('backend = "tap"\ntap = "cvfio-missing0"', "does not exist"),
                      ('colour = "blue"', "colour")):
        src = f'[[device]]\nbdf = "{BDF}"\nmodel = "virtio-net"\ngroup = 3\n{key}\n'
        with pytest.raises(TopologyError, match=text):
            Machine(topology.parse(src, "<bad>"))


def test_machine_close_lets_the_device_go(tmp_path):
    m = Machine(topology.parse(TOPOLOGY.format(pcap=tmp_path / "x.pcap"), "<t>"))
    fn = m.vdevs[BDF].function
    m.close()
    assert fn.pcap._file.closed
