"""Devices behind a PCI Express root port: the topology's [[root_port]], and the hot reset the bus allows.

The layout is scripts/vm's (tests/conformance/vm.toml): an edu on the root
bus (no bus reset possible there) and a two-function edu behind a root port,
both functions in one group, as QEMU and Linux put them.
"""

import errno
import os
import struct

import pytest

from cuse_vfio import uapi
from cuse_vfio.machine import Machine, topology
from cuse_vfio.machine.topology import TopologyError, parse
from cuse_vfio.transport.local import LocalProcess

MODELS = {"edu"}
VM_TOML = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conformance", "vm.toml")
CONFIG = 7 << 40
EDU_LIVENESS = 0x04

BUS = """
[[device]]
bdf = "0000:00:02.0"
model = "edu"
group = 2

[[root_port]]
bdf = "0000:00:04.0"
secondary = 1

[[device]]
bdf = "0000:01:00.0"
model = "edu"
group = 6

[[device]]
bdf = "0000:01:00.1"
model = "edu"
group = 6
"""


# -- the topology --------------------------------------------------------------------------
def test_root_port_puts_devices_on_its_secondary_bus():
    t = parse(BUS, "t.toml", MODELS)
    (rp,) = t.root_ports
    assert (rp.bdf, rp.secondary) == ("0000:00:04.0", 1)
    assert t.root_port_of(1) is rp and t.root_port_of(0) is None
    assert sorted(t.groups) == [2, 6]   # a root port is no vfio-pci device: no group node


def test_vm_toml_parses_as_the_same_layout():
    t = topology.load(VM_TOML, MODELS)
    assert [(d.bdf, d.group) for d in t.devices] == [("0000:00:02.0", 2), ("0000:01:00.0", 6), ("0000:01:00.1", 6)]


ONE = '[[device]]\nbdf = "{bdf}"\nmodel = "edu"\ngroup = 6\n'
RP = '[[root_port]]\nbdf = "{bdf}"\nsecondary = {bus}\n'


@pytest.mark.parametrize("text,needle", [
    (ONE.format(bdf="0000:01:00.0"), "line 2: device 0000:01:00.0 is on bus 01, which no [[root_port]] leads to"),
    (RP.format(bdf="0000:00:04.0", bus=1) + ONE.format(bdf="0000:01:03.0"),
     "line 5: device 0000:01:03.0 is behind root port 0000:00:04.0, whose link leads to one device"),
    (RP.format(bdf="0000:00:04.0", bus=1) + ONE.format(bdf="0000:01:00.1"),
     "line 5: device 0000:01:00.1 is function 1 of a device without function 0"),
    (ONE.format(bdf="0000:00:02.3"), "line 2: device 0000:00:02.3 is function 3 of a device without function 0"),
    (RP.format(bdf="0000:02:00.0", bus=3) + ONE.format(bdf="0000:00:02.0"),
     "line 2: root port 0000:02:00.0 is not on bus 00"),
    (RP.format(bdf="0000:00:02.0", bus=1) + ONE.format(bdf="0000:00:02.0"),
     "line 2: bdf 0000:00:02.0 of root port #1 is already taken"),
    (RP.format(bdf="0000:00:04.0", bus=1) + RP.format(bdf="0000:00:05.0", bus=1) + ONE.format(bdf="0000:00:02.0"),
     "line 6: bus 01 is already the secondary bus of root port 0000:00:04.0"),
    (RP.format(bdf="0000:00:04.0", bus=0) + ONE.format(bdf="0000:00:02.0"),
     "line 3: secondary 0 is not a bus number behind the root bus"),
    (RP.format(bdf="0000:00:04.0", bus=256) + ONE.format(bdf="0000:00:02.0"),
     "line 3: secondary 256 is not a bus number"),
    (RP.format(bdf="0000:00:04.0", bus='"1"') + ONE.format(bdf="0000:00:02.0"),
     "line 3: secondary '1' is not a bus number"),
    ('[[root_port]]\nbdf = "0000:00:04.0"\n' + ONE.format(bdf="0000:00:02.0"),
     "line 1: root port #1 has no 'secondary'"),
    (RP.format(bdf="0000:00:04.0", bus=1).replace("secondary = 1", "secondary = 1\nchassis = 1")
     + ONE.format(bdf="0000:00:02.0"), "line 4: root port #1 has unknown key 'chassis'"),
    (RP.format(bdf="00:04.0", bus=1) + ONE.format(bdf="0000:00:02.0"), "line 2: bdf '00:04.0' is not a PCI address"),
    (RP.format(bdf="0000:00:04.0", bus=1) + ONE.format(bdf="0001:01:00.0"),
     "line 5: device 0001:01:00.0 is in PCI segment 0001, but the root port of bus 01"),
    ('root_port = 1\n' + ONE.format(bdf="0000:00:02.0"), "root_port entries are [[root_port]] tables"),
])
def test_bad_root_ports_name_the_line(text, needle):
    with pytest.raises(TopologyError) as e:
        parse(text, "t.toml", MODELS)
    assert needle in str(e.value)
    assert str(e.value).startswith("t.toml")


# -- the machine -----------------------------------------------------------------------------
@pytest.fixture
def machine():
    m = Machine(parse(BUS, "bus.toml"))
    yield m
    m.close()


def test_machine_wires_the_secondary_bus(machine):
    root, fn0, fn1 = (machine.vdevs[b] for b in ("0000:00:02.0", "0000:01:00.0", "0000:01:00.1"))
    assert root.reset_bus is None                      # the root bus cannot be reset
    bus = fn0.reset_bus
    assert bus is fn1.reset_bus and (bus.segment, bus.bus) == (0, 1)
    assert [(devfn, group) for devfn, group, _ in bus.members] == [(0, 6), (1, 6)]
    # function 0 of a slot with more functions says so, as QEMU's multifunction=on does
    assert [v.function.config_read(0x0E, 1) for v in (root, fn0, fn1)] == [0, 0x80, 0]


def _device(p, group, bdf, container=None):
    c = p.open("/dev/vfio/vfio") if container is None else container
    g = p.open(f"/dev/vfio/{group}")
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, struct.pack("<i", c))
    if container is None:
        p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
    return c, g, p.ioctl(g, uapi.VFIO_GROUP_GET_DEVICE_FD, bdf.encode() + b"\0")


def _errno(call, *args, **kwargs):
    with pytest.raises(OSError) as e:
        call(*args, **kwargs)
    return e.value.errno


def _hot_reset(p, d, *fds, flags=0):
    return p.ioctl(d, uapi.VFIO_DEVICE_PCI_HOT_RESET,
                   struct.pack("<III", 12 + 4 * len(fds), flags, len(fds)) + struct.pack(f"<{len(fds)}i", *fds))


def test_hot_reset_info_lists_both_functions(machine):
    p = LocalProcess(machine.dispatcher)
    c, g6, d = _device(p, 6, "0000:01:00.0")
    small = bytearray(struct.pack("<III", 12 + 8, 0, 0x77) + bytes(8))      # room for one of the two
    assert _errno(p.ioctl, d, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, small) == errno.ENOSPC
    assert struct.unpack_from("<III", small) == (20, 0, 2)    # the count the user needs
    full = bytearray(struct.pack("<III", 12 + 32, 0, 0) + bytes(32))
    assert p.ioctl(d, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, full) == 0
    assert struct.unpack_from("<III", full)[2] == 2
    assert [struct.unpack_from("<IHBB", full, 12 + 8 * i) for i in range(2)] == [(6, 0, 1, 0), (6, 0, 1, 1)]
    _, _, d2 = _device(p, 2, "0000:00:02.0", c)
    assert _errno(p.ioctl, d2, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, full) == errno.ENODEV


def test_hot_reset_needs_the_bus_group_and_resets_both_functions(machine):
    p = LocalProcess(machine.dispatcher)
    c, g6, d = _device(p, 6, "0000:01:00.0")
    _, g2, _ = _device(p, 2, "0000:00:02.0", c)
    sibling = machine.vdevs["0000:01:00.1"].function     # never opened by the client
    assert _errno(_hot_reset, p, d, g2) == errno.EINVAL      # a group, but not the bus's
    assert _errno(_hot_reset, p, d, 999) == errno.EBADF
    assert _errno(_hot_reset, p, d, c) == errno.EINVAL       # a container is no group
    assert _errno(_hot_reset, p, d, d) == errno.EINVAL       # neither is a device
    assert _errno(_hot_reset, p, d, g6, 999) == errno.EBADF
    assert _errno(_hot_reset, p, d, g6, g6, g6) == errno.EINVAL   # more fds than functions on the bus
    assert _errno(_hot_reset, p, d, g6, flags=1) == errno.EINVAL
    assert _errno(_hot_reset, p, d) == errno.EINVAL          # count 0 from a group-opened device
    cmd = int.from_bytes(p.pread(d, 2, CONFIG + 4), "little")
    p.pwrite(d, (0x12345678).to_bytes(4, "little"), EDU_LIVENESS)
    sibling.mmio_write(EDU_LIVENESS, 4, 0x0F0F0F0F)
    resets = []
    reset_function = sibling.reset_function
    sibling.reset_function = lambda: (resets.append(sibling.name), reset_function())
    assert _hot_reset(p, d, g6) == 0
    assert resets == ["0000:01:00.1"]                        # the unopened sibling was reset too...
    assert sibling.mmio_read(EDU_LIVENESS, 4) == 0xF0F0F0F0  # ...and, as QEMU's edu, kept its registers
    assert int.from_bytes(p.pread(d, 4, EDU_LIVENESS), "little") == 0xEDCBA987
    assert int.from_bytes(p.pread(d, 2, CONFIG + 4), "little") == cmd   # vfio-pci restored its config
    assert _hot_reset(p, d, g2, g6) == 0                      # a group the bus does not need is accepted
    assert _hot_reset(p, d, g6, g6) == 0


def test_count_zero_is_einval_on_6_12_before_the_bus_is_probed():
    m = Machine(parse(BUS, "bus.toml"), kernel_abi="6.12")
    try:
        p = LocalProcess(m.dispatcher)
        c, g2, d2 = _device(p, 2, "0000:00:02.0")
        assert _errno(_hot_reset, p, d2) == errno.EINVAL        # 6.1 probes first: ENODEV
        assert _errno(_hot_reset, p, d2, g2) == errno.ENODEV
    finally:
        m.close()


def test_sysfs_shows_the_functions_behind_the_root_port(machine):
    view = machine.sysfs_view()
    assert sorted(view.devices) == ["0000:00:02.0", "0000:01:00.0", "0000:01:00.1"]
    assert view.devices["0000:01:00.1"].group_id == 6
