"""vfio_pci's nointxmask and disable_idle_d3, as Linux 6.1 applies them (vfio_pci_core.c, vfio_pci_intrs.c).

nointxmask: INTx is masked at the interrupt line, never in the function's
INTx-disable bit, which the sysfs ``config`` shows untouched; GET_IRQ_INFO
does not change.  disable_idle_d3: without it a device no one has open is
runtime-suspended (a PM-capable function in D3hot, visible in sysfs
``config`` and ``power_state``) and woken to D0 by the first open.
"""

import struct

import pytest

from cuse_vfio import uapi
from cuse_vfio.devices import IrqIndex, MmioBar, PciDevice, PmCapability, VfioPciDevice
from cuse_vfio.machine import Machine
from cuse_vfio.machine.topology import parse
from cuse_vfio.transport.local import LocalProcess
from cuse_vfio.uapi import (
    VFIO_DEVICE_GET_IRQ_INFO,
    VFIO_DEVICE_SET_IRQS,
    VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_INFO_MASKABLE,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_INTX_IRQ_INDEX,
    vfio_irq_info,
)
from devices_fakes import FakeCaller, cfg_read, cfg_write, fds, ioctl, irq_set

PCI_COMMAND, PCI_STATUS = 0x04, 0x06
INTX_DISABLE, INTERRUPT_STATUS = 0x400, 0x08


class Pin(PciDevice):
    """A function with an INTx pin and one register BAR."""

    vendor_id, device_id = 0x1234, 0x0002
    interrupt_pin = 1

    def __init__(self, pm=False, **options):
        super().__init__(**options)
        self.add_bar(0, MmioBar(0x1000, lambda o, s: 0, lambda o, s, v: None))
        if pm:
            self.add_capability(PmCapability())


class PrePci23(Pin):
    """INTx-disable is read-only, as before PCI 2.3: pci_intx_mask_broken."""

    command_wmask = 0x0146  # memory, master, parity, SERR; no INTx disable


def opened(fn, **kw):
    vdev = VfioPciDevice(fn, **kw)
    vdev.open()
    return vdev


def intx_on(vdev):
    caller = FakeCaller()
    fd, efd = caller.eventfd()
    ioctl(vdev, VFIO_DEVICE_SET_IRQS, irq_set(flags=VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                                              index=VFIO_PCI_INTX_IRQ_INDEX, count=1, data=fds(fd)), caller)
    return efd


def unmask(vdev):
    ioctl(vdev, VFIO_DEVICE_SET_IRQS, irq_set(flags=VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
                                              index=VFIO_PCI_INTX_IRQ_INDEX, count=1))


def physical_command(fn):
    return fn.config_read(PCI_COMMAND, 2)


# -- nointxmask ---------------------------------------------------------------------------

def test_default_masks_intx_in_the_functions_bit():
    fn = Pin()
    vdev = opened(fn)
    efd = intx_on(vdev)
    fn.raise_irq(IrqIndex.INTX)
    assert efd.take() == 1 and vdev.intx.masked and physical_command(fn) & INTX_DISABLE


def test_nointxmask_masks_at_the_line_and_leaves_the_bit_alone():
    fn = Pin()
    vdev = opened(fn, nointxmask=True)
    assert not vdev.irqs.pci_2_3
    efd = intx_on(vdev)
    fn.raise_irq(IrqIndex.INTX)
    assert efd.take() == 1 and vdev.intx.masked
    assert not physical_command(fn) & INTX_DISABLE           # never set by vfio-pci
    assert fn.config_read(PCI_STATUS, 2) & INTERRUPT_STATUS  # the function still asserts
    unmask(vdev)  # enable_irq on a line still asserted: the handler runs again, masks, signals
    assert efd.take() == 1 and vdev.intx.masked
    fn.lower_irq()
    unmask(vdev)
    assert efd.take() == 0 and not vdev.intx.masked
    fn.raise_irq(IrqIndex.INTX)
    assert efd.take() == 1 and not physical_command(fn) & INTX_DISABLE


def test_nointxmask_virtual_intx_disable_masks_the_line():
    fn = Pin()
    vdev = opened(fn, nointxmask=True)
    efd = intx_on(vdev)
    cfg_write(vdev, PCI_COMMAND, 2, cfg_read(vdev, PCI_COMMAND, 2) | INTX_DISABLE)
    assert vdev.intx.masked and cfg_read(vdev, PCI_COMMAND, 2) & INTX_DISABLE  # the user's own bit
    assert not physical_command(fn) & INTX_DISABLE
    fn.raise_irq(IrqIndex.INTX)
    assert efd.take() == 0
    cfg_write(vdev, PCI_COMMAND, 2, cfg_read(vdev, PCI_COMMAND, 2) & ~INTX_DISABLE)
    assert efd.take() == 1 and vdev.intx.masked  # the line came back on asserted


@pytest.mark.parametrize("kw", [{}, {"nointxmask": True}])
def test_irq_info_does_not_change_with_nointxmask(kw):
    vdev = opened(Pin(), **kw)
    _, out = ioctl(vdev, VFIO_DEVICE_GET_IRQ_INFO, bytes(vfio_irq_info(argsz=16, index=VFIO_PCI_INTX_IRQ_INDEX)))
    info = vfio_irq_info.from_buffer_copy(out)
    assert info.flags == VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED
    assert info.count == 1


def test_a_function_whose_intx_disable_bit_does_not_stick_is_masked_at_the_line():
    fn = PrePci23()
    vdev = opened(fn)
    assert not vdev.intx_mask_supported and not vdev.irqs.pci_2_3
    efd = intx_on(vdev)
    fn.raise_irq(IrqIndex.INTX)
    assert efd.take() == 1 and vdev.intx.masked
    assert opened(Pin()).intx_mask_supported


# -- disable_idle_d3 --------------------------------------------------------------------------

def test_an_idle_device_is_in_d3hot_until_opened_and_again_after_the_last_close():
    fn = Pin(pm=True)
    vdev = VfioPciDevice(fn)
    assert fn.power_state == 3 and vdev.runtime_pm.suspended
    vdev.open()
    assert fn.power_state == 0 and not vdev.runtime_pm.suspended
    vdev.release()
    assert fn.power_state == 3
    vdev.open()  # config state saved at suspend comes back on the way up
    assert fn.power_state == 0 and physical_command(fn) & 0x2


def test_disable_idle_d3_keeps_idle_devices_in_d0():
    fn = Pin(pm=True)
    vdev = VfioPciDevice(fn, disable_idle_d3=True)
    assert fn.power_state == 0 and not vdev.runtime_pm.suspended
    vdev.open()
    vdev.release()
    assert fn.power_state == 0 and not vdev.runtime_pm.suspended


def test_a_function_without_pm_capability_stays_in_d0_while_idle():
    fn = Pin()
    vdev = VfioPciDevice(fn)
    assert vdev.runtime_pm.suspended and fn.power_state == 0


def test_low_power_entry_still_suspends_with_disable_idle_d3():
    fn = Pin(pm=True)
    vdev = opened(fn, disable_idle_d3=True)
    ioctl(vdev, uapi.VFIO_DEVICE_FEATURE, struct.pack("<II", 8, uapi.VFIO_DEVICE_FEATURE_SET
                                                      | uapi.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY))
    assert fn.power_state == 3  # the probe's count was the one low-power entry let go of
    vdev.release()
    assert fn.power_state == 0 and not vdev.runtime_pm.suspended


# -- through a machine: the topology sets them, sysfs shows them ------------------------------

NVME = "0000:00:04.0"


def nvme_machine(extra=""):
    return Machine(parse(f'[[device]]\nbdf = "{NVME}"\nmodel = "nvme"\ngroup = 4\n' + extra, "t.toml"))


@pytest.mark.parametrize("disable_idle_d3", [False, True])
def test_sysfs_shows_idle_d3_and_the_wake_on_open(disable_idle_d3):
    m = nvme_machine("[module.vfio_pci]\ndisable_idle_d3 = true\n" if disable_idle_d3 else "")
    try:
        view = m.sysfs_view()
        pm = m.vdevs[NVME].function.pm.offset
        idle = "D0" if disable_idle_d3 else "D3hot"

        def state():
            cfg = view.read(f"bus/pci/devices/{NVME}/config")
            text = view.read(f"bus/pci/devices/{NVME}/power_state").decode().strip()
            assert ("D0", "D1", "D2", "D3hot")[cfg[pm + 4] & 3] == text  # the two views agree
            return text

        assert view.read("module/vfio_pci/parameters/disable_idle_d3") == (b"Y\n" if disable_idle_d3 else b"N\n")
        assert state() == idle
        p = LocalProcess(m.dispatcher)
        c, g = p.open("/dev/vfio/vfio"), p.open("/dev/vfio/4")
        p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, struct.pack("<i", c))
        p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
        d = p.ioctl(g, uapi.VFIO_GROUP_GET_DEVICE_FD, NVME.encode() + b"\0")
        assert state() == "D0"
        p.close(d)
        assert state() == idle
    finally:
        m.close()


def test_topology_nointxmask_reaches_vfio_pci_and_sysfs():
    m = nvme_machine("[module.vfio_pci]\nnointxmask = true\n")
    try:
        view = m.sysfs_view()
        assert view.read("module/vfio_pci/parameters/nointxmask") == b"Y\n"
        vdev = m.vdevs[NVME]
        assert vdev.nointxmask and not vdev.irqs.pci_2_3
    finally:
        m.close()


def test_hot_reset_wakes_an_idle_member_and_lets_it_sleep_again():
    from cuse_vfio.devices import HotResetBus
    from devices_fakes import FakeGroupFile

    bus = HotResetBus(segment=0, bus=3)
    a, idle = opened(Pin(pm=True)), VfioPciDevice(Pin(pm=True))
    resets, reset_function = [], idle.function.reset_function
    idle.function.reset_function = lambda: (resets.append(idle.function.power_state), reset_function())
    bus.add(0x00, 7, a)
    bus.add(0x08, 8, idle)
    assert idle.function.power_state == 3
    caller = FakeCaller()
    groups = fds(caller.add(FakeGroupFile(7)), caller.add(FakeGroupFile(8)))
    ioctl(a, uapi.VFIO_DEVICE_PCI_HOT_RESET, struct.pack("<III", 12 + len(groups), 0, 2) + groups, caller)
    assert resets == [0]  # the bus reset finds it in D0 (vfio_pci_dev_set_pm_runtime_get), then back to sleep
    assert idle.function.power_state == 3 and idle.runtime_pm.suspended and a.function.power_state == 0
