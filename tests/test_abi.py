"""Kernel personalities (uapi/abi.py): every rule, on 6.1 and on 6.12, in-process.

Each rule's two values were seen on the real kernels (scripts/conformance
runs the same client on Debian's 6.1 and 6.12) or read in their sources.
"""

import ctypes
import errno
import struct

import pytest

from core_fakes import Topology
from cuse_vfio.core import KernelAbi
from cuse_vfio.iommu import Type1Driver
from cuse_vfio.machine import Machine
from cuse_vfio.machine.topology import TopologyError, parse
from cuse_vfio.uapi import (
    VFIO_DEVICE_PCI_HOT_RESET,
    VFIO_GROUP_SET_CONTAINER,
    VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_INFO_NORESIZE,
    VFIO_PCI_MSI_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
)
from cuse_vfio.uapi.abi import KERNEL_ABIS, RULES, Rule, table
from cuse_vfio.uapi.caps import CapChain
from devices_fakes import FakeCaller, bar_read, errno_of, fds, ioctl
from test_devices_vfio_pci import TRIGGER_EFD, TRIGGER_NONE, Recorder, irq_info, make, set_irqs
from test_iommu_common import Client
from test_iommu_type1 import get_info

V61, V612 = KernelAbi("6.1"), KernelAbi("6.12")


# -- the table itself ----------------------------------------------------------------------
def test_a_rule_takes_the_value_of_the_newest_change_at_or_before_the_release():
    rule = Rule("test.example", "old", since={"6.5": "mid", "6.9": "new"}, why="a test rule.")
    try:
        assert rule.of(V61) == "old" and rule.of(V612) == "new"
        assert rule.of(KernelAbi()) == "old"  # 6.1 is the default
    finally:
        del RULES["test.example"]


def test_a_rule_needs_a_reason_and_a_unique_name():
    with pytest.raises(ValueError, match="why"):
        Rule("test.nowhy", 1, since={"6.2": 2}, why=" ")
    with pytest.raises(ValueError, match="twice"):
        Rule("caps.align", 1, since={"6.6": 8}, why="again.")


def test_only_the_checked_releases_can_be_chosen():
    assert KERNEL_ABIS == ("6.1", "6.12")
    with pytest.raises(ValueError, match="6.1 or 6.12"):
        KernelAbi("6.6")


def test_every_rule_differs_between_the_two_releases_and_says_why():
    rows = table()
    assert {"group.set_container.not_a_container", "caps.align", "vfio_pci.bar_io_width",
            "vfio_pci.hot_reset.zero_count_first", "vfio_pci.hot_reset_info.header_on_fill_error",
            "vfio_pci.msix.dynamic", "vfio_pci.msi.num_ctx_bound"} <= set(rows)
    for name, values in rows.items():
        assert values["6.1"] != values["6.12"], name
        assert RULES[name].why.rstrip().endswith("."), name


# -- core: SET_CONTAINER ---------------------------------------------------------------------
@pytest.mark.parametrize("abi, expected", [(V61, errno.EINVAL), (V612, errno.EBADFD)])
def test_set_container_with_a_non_container_fd(abi, expected):
    topo = Topology()
    topo.vfio.abi = abi
    topo.add("0000:00:02.0", 2)
    p = topo.process()
    gfd = p.open("/dev/vfio/2")
    for fd in (gfd, p.eventfd()):
        with pytest.raises(OSError) as e:
            p.ioctl(gfd, VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(fd))
        assert e.value.errno == expected
    with pytest.raises(OSError) as e:  # no file at all stays EBADF on both
        p.ioctl(gfd, VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(77))
    assert e.value.errno == errno.EBADF


# -- type1: capability packing ----------------------------------------------------------------
@pytest.mark.parametrize("abi, argsz, iova_cap", [(V61, 0x74, 0x44), (V612, 0x78, 0x48)])
def test_type1_get_info_caps_are_packed_as_the_kernel_packs_them(abi, argsz, iova_cap):
    c = Client(driver=Type1Driver(abi=abi))
    info, _ = get_info(c, 16)
    assert info.argsz == argsz
    info, raw = get_info(c, argsz)
    # migration at 0x18 (32 bytes), DMA avail at 0x38 (12, padded to 16 on 6.12), then the IOVA ranges
    # (cap ids: IOVA_RANGE 1, MIGRATION 2, DMA_AVAIL 3)
    assert struct.unpack_from("<HHI", raw, 0x18) == (2, 1, 0x38)
    assert struct.unpack_from("<HHI", raw, 0x38) == (3, 1, iova_cap)
    assert struct.unpack_from("<HHI", raw, iova_cap) == (1, 1, 0)


def test_a_chain_for_an_abi_aligns_as_its_kernel():
    assert CapChain.for_abi(V61).align == 1 and CapChain.for_abi(V612).align == 8


# -- vfio-pci ----------------------------------------------------------------------------------
@pytest.mark.parametrize("abi, accesses", [(V61, [(0, 4), (4, 4)]), (V612, [(0, 8)])])
def test_bar_accesses_are_as_wide_as_the_kernel_allows(abi, accesses):
    fn = Recorder()
    vdev = make(fn, abi=abi)
    bar_read(vdev, 0, 0, 8)
    assert [a[1:] for a in fn.accesses] == accesses


def hot_reset(vdev, count):
    return ioctl(vdev, VFIO_DEVICE_PCI_HOT_RESET, struct.pack("<III", 12 + 4 * count, 0, count) + b"\3\0\0\0" * count)


@pytest.mark.parametrize("abi, zero", [(V61, errno.ENODEV), (V612, errno.EINVAL)])
def test_hot_reset_with_count_zero(abi, zero):
    vdev = make(abi=abi)  # on no resettable bus
    assert errno_of(hot_reset, vdev, 0) == zero
    assert errno_of(hot_reset, vdev, 1) == errno.ENODEV


@pytest.mark.parametrize("abi, msix_flags", [(V61, VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE),
                                             (V612, VFIO_IRQ_INFO_EVENTFD)])
def test_msix_irq_info_says_whether_vectors_can_be_added(abi, msix_flags):
    vdev = make(Recorder(msix=True), abi=abi)
    assert irq_info(vdev, VFIO_PCI_MSIX_IRQ_INDEX).flags == msix_flags
    assert irq_info(vdev, VFIO_PCI_MSI_IRQ_INDEX).flags == VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE
    # no MSI-X capability: nothing to allocate dynamically (pci_msix_can_alloc_dyn)
    plain = make(Recorder(msix=False), abi=abi)
    assert irq_info(plain, VFIO_PCI_MSIX_IRQ_INDEX).flags == VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE


def test_msix_vectors_are_added_while_enabled_on_6_12():
    fn = Recorder(msix=True)
    vdev = make(fn, abi=V612)
    caller = FakeCaller()
    fd0, efd0 = caller.eventfd()
    fd2, efd2 = caller.eventfd()
    set_irqs(vdev, caller, flags=TRIGGER_EFD, index=2, count=1, data=fds(fd0))
    set_irqs(vdev, caller, flags=TRIGGER_EFD, index=2, start=2, count=1, data=fds(fd2))  # past the one enabled
    fn.raise_irq(2, 2)
    assert efd2.take() == 1 and efd0.take() == 0
    set_irqs(vdev, caller, flags=TRIGGER_NONE, index=2, start=1, count=2)  # loopback skips vector 1
    assert efd2.take() == 1
    # the same on 6.1 is refused: the count is fixed when MSI-X is enabled
    old = make(Recorder(msix=True), abi=V61)
    set_irqs(old, caller, flags=TRIGGER_EFD, index=2, count=1, data=fds(fd0))
    assert errno_of(set_irqs, old, caller, flags=TRIGGER_EFD, index=2, start=2, count=1, data=fds(fd2)) == errno.EINVAL
    assert errno_of(set_irqs, old, caller, flags=TRIGGER_NONE, index=2, start=1, count=2) == errno.EINVAL


def test_msi_vectors_stay_fixed_on_6_12():
    vdev = make(Recorder(msix=False), abi=V612)
    caller = FakeCaller()
    fd0, _ = caller.eventfd()
    set_irqs(vdev, caller, flags=TRIGGER_EFD, index=VFIO_PCI_MSI_IRQ_INDEX, count=1, data=fds(fd0))
    assert errno_of(set_irqs, vdev, caller, flags=TRIGGER_EFD, index=VFIO_PCI_MSI_IRQ_INDEX, start=1, count=1,
                    data=fds(fd0)) == errno.EINVAL
    # the failed vector left the enabled one alone
    assert set(vdev.irqs.msi_ctx) == {0}


# -- where the choice is made ------------------------------------------------------------------
def test_the_topology_and_the_command_line_choose_the_personality():
    text = 'kernel_abi = "6.12"\n[[device]]\nbdf = "0000:00:02.0"\nmodel = "edu"\ngroup = 2\n'
    topology = parse(text, "t.toml")
    assert topology.kernel_abi == "6.12"
    machine = Machine(topology)
    try:
        assert machine.vfio.abi == V612 and machine.type1.abi == V612
        assert machine.vdevs["0000:00:02.0"].abi == V612 and machine.vdevs["0000:00:02.0"].io_width == 8
    finally:
        machine.close()
    machine = Machine(topology, kernel_abi="6.1")  # the command line wins
    try:
        assert machine.vfio.abi == V61 and machine.vdevs["0000:00:02.0"].io_width == 4
    finally:
        machine.close()


def test_a_topology_with_an_unknown_kernel_names_the_line():
    with pytest.raises(TopologyError, match=r"t.toml, line 2: kernel_abi '6.6' .* \"6.1\", \"6.12\""):
        parse('# x\nkernel_abi = "6.6"\n[[device]]\nbdf = "0000:00:02.0"\nmodel = "edu"\ngroup = 2\n', "t.toml")
