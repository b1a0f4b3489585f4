"""Config space: the PCI function as hardware, and what vfio-pci shows of it."""

import ctypes
import errno
import struct

from cuse_vfio.devices import (
    Capability,
    ExpressCapability,
    ExtendedCapability,
    IoBar,
    IrqIndex,
    MmioBar,
    MsiCapability,
    MsixCapability,
    PciDevice,
    PmCapability,
    RamBar,
    Rom,
    VendorCapability,
    VendorExtCapability,
    VfioPciDevice,
)
from cuse_vfio.devices.vfio_pci import HotResetBus
from cuse_vfio.devices.pci import capability_offsets
from cuse_vfio.uapi import (
    VFIO_DEVICE_GET_REGION_INFO,
    VFIO_DEVICE_SET_IRQS,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_PCI_MSI_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
    vfio_region_info,
)
from devices_fakes import (
    FakeCaller,
    bar_read,
    cfg_read,
    cfg_write,
    errno_of,
    fds,
    ioctl,
    irq_set,
)


def rom_image(size=4096):
    """A valid expansion ROM: 55 AA, a PCIR structure, one last image of ``size`` bytes."""
    image = bytearray(size)
    image[0:2] = b"\x55\xaa"
    image[24:26] = (0x40).to_bytes(2, "little")
    image[0x40:0x44] = b"PCIR"
    image[0x40 + 16:0x40 + 18] = (size // 512).to_bytes(2, "little")
    image[0x40 + 21] = 0x80
    return bytes(image)


class Plain(PciDevice):
    """Conventional PCI: MMIO, I/O, a 64-bit prefetchable RAM BAR, two unimplemented, a ROM, three caps."""

    vendor_id, device_id = 0x1AF4, 0x1234
    subsystem_vendor_id, subsystem_id = 0x1AF4, 0x0001
    revision = 3
    class_code = 0x020000
    interrupt_pin = 1

    def __init__(self, **options):
        super().__init__(**options)
        self.add_bar(0, MmioBar(0x1000, lambda o, s: 0, lambda o, s, v: None))
        self.add_bar(1, IoBar(0x20, lambda o, s: 0, lambda o, s, v: None))
        self.add_bar(2, RamBar(0x4000, bits64=True, prefetchable=True))
        self.set_rom(Rom(rom_image(), size=0x2000))
        self.add_capability(PmCapability())
        self.add_capability(MsiCapability(vectors=4, addr64=False, per_vector_mask=True))
        self.add_capability(VendorCapability(b"hello"))


class HiddenCap(Capability):
    """A capability vfio-pci does not show (hot-plug controller, SHPC)."""

    cap_id = 0x0C

    def length(self):
        return 4


class Express(PciDevice):
    vendor_id, device_id = 0x8086, 0x10D3
    class_code = 0x020000

    def __init__(self, hide_first_ecap=False, **options):
        super().__init__(**options)
        self.add_bar(0, MmioBar(0x4000, lambda o, s: 0x5A5A5A5A, lambda o, s, v: None))
        self.add_capability(ExpressCapability(flr=True))
        self.add_capability(HiddenCap())
        self.add_capability(MsixCapability(vectors=8, table_bar=0, table_offset=0x2000))
        if hide_first_ecap:
            self.add_capability(ExtendedCapability(0x1B, 1, bytes(4)))  # PASID: vfio-pci hides it
        self.add_capability(ExtendedCapability(0x03, 1, bytes(range(8))))  # serial number
        self.add_capability(ExtendedCapability(0x1B, 1, bytes(4)))
        self.add_capability(VendorExtCapability(0x42, 1, b"vsec"))

    def reset(self):
        self.resets = getattr(self, "resets", 0) + 1


# -- the function as hardware ---------------------------------------------------
def test_ids_and_class_are_read_only():
    fn = Plain()
    for off, size in ((0, 4), (0x08, 4), (0x2C, 4)):
        before = fn.config_read(off, size)
        fn.config_write(off, size, 0xFFFFFFFF)
        assert fn.config_read(off, size) == before
    assert fn.config_read(0, 4) == 0x12341AF4
    assert fn.config_read(0x08, 4) == 0x02000003


def test_command_has_only_the_bits_the_function_implements():
    fn = Plain()
    fn.config_write(4, 2, 0xFFFF)
    assert fn.config_read(4, 2) == 0x0001 | 0x0002 | 0x0004 | 0x0040 | 0x0100 | 0x0400

    class MemOnly(PciDevice):
        dma_capable = False

        def __init__(self):
            super().__init__()
            self.add_bar(0, RamBar(0x1000))

    m = MemOnly()
    m.config_write(4, 2, 0xFFFF)
    assert m.config_read(4, 2) & 0x7 == 0x0002  # no I/O BAR, no bus master


def test_status_error_bits_are_rw1c():
    fn = Plain()
    fn.config.set(6, 2, fn.config.get(6, 2) | 0x2000 | 0x8000)  # the device records errors
    fn.config_write(6, 2, 0x2000)
    status = fn.config_read(6, 2)
    assert not status & 0x2000 and status & 0x8000
    fn.config_write(6, 2, 0x0010)  # capability list is read-only
    assert fn.config_read(6, 2) & 0x0010


def test_bar_sizing_in_the_function():
    fn = Plain()
    for reg in range(0x10, 0x28, 4):
        fn.config_write(reg, 4, 0xFFFFFFFF)
    assert fn.config_read(0x10, 4) == 0xFFFFF000          # 4 KiB, 32-bit, non-prefetchable
    assert fn.config_read(0x14, 4) == 0xFFFFFFE1          # 32 bytes of I/O
    assert fn.config_read(0x18, 4) == 0xFFFFC00C          # 16 KiB, 64-bit, prefetchable
    assert fn.config_read(0x1C, 4) == 0xFFFFFFFF          # its upper half
    assert fn.config_read(0x20, 4) == 0 and fn.config_read(0x24, 4) == 0  # unimplemented
    fn.config_write(0x30, 4, 0xFFFFFFFF)
    assert fn.config_read(0x30, 4) == 0xFFFFE001          # 8 KiB ROM, enable bit


def test_interrupt_line_is_writable_and_pin_is_not():
    fn = Plain()
    fn.config_write(0x3C, 2, 0xFFFF)
    assert fn.config_read(0x3C, 1) == 0xFF
    assert fn.config_read(0x3D, 1) == 1


def test_capability_list_walk():
    fn = Plain()
    assert fn.config.size == 256
    # Capabilities are packed, each on the next dword (PCI: bits 1:0 of a pointer are reserved):
    # PM is 8 bytes, MSI with 32-bit address and per-vector masking 20 (0x48 + 0x14 = 0x5C).
    assert list(capability_offsets(fn.config_read).items()) == [(0x40, 0x01), (0x48, 0x05), (0x5C, 0x09)]
    assert fn.config_read(0x48 + 2, 2) == (2 << 1) | 0x100  # 4 vectors, 32-bit, per-vector mask
    assert fn.config_read(0x5C + 2, 1) == 8  # vendor cap length


def test_express_function_has_4k_config_and_extended_caps():
    fn = Express()
    assert fn.config.size == 4096
    assert [cap for cap in capability_offsets(fn.config_read).values()] == [0x10, 0x0C, 0x11]
    pos, chain = 0x100, []
    while pos:
        header = fn.config_read(pos, 4)
        chain.append(header & 0xFFFF)
        pos = header >> 20
    assert chain == [0x03, 0x1B, 0x0B]


def test_msix_capability_describes_table_and_pba():
    fn = Express()
    msix = fn.msix
    assert fn.config_read(msix.offset + 2, 2) == 7
    assert fn.config_read(msix.offset + 4, 4) == 0x2000
    assert fn.config_read(msix.offset + 8, 4) == 0x2080


# -- what vfio-pci shows ------------------------------------------------------------
def test_vfio_ids_are_virtual_and_read_only():
    vdev = VfioPciDevice(Plain())
    vdev.open()
    cfg_write(vdev, 0, 4, 0)
    assert cfg_read(vdev, 0, 4) == 0x12341AF4
    assert cfg_read(vdev, 8, 4) == 0x02000003


def test_vfio_bar_sizing_is_virtual():
    fn = Plain()
    vdev = VfioPciDevice(fn)
    vdev.open()
    assert cfg_read(vdev, 0x10, 4) == fn.bars[0].address  # the host's address until written
    for reg in range(0x10, 0x28, 4):
        cfg_write(vdev, reg, 4, 0xFFFFFFFF)
    cfg_write(vdev, 0x30, 4, 0xFFFFFFFF)
    assert [cfg_read(vdev, reg, 4) for reg in range(0x10, 0x28, 4)] == [
        0xFFFFF000, 0xFFFFFFE1, 0xFFFFC00C, 0xFFFFFFFF, 0, 0]
    assert cfg_read(vdev, 0x30, 4) == 0xFFFFE001
    cfg_write(vdev, 0x10, 4, 0xFEB00000)
    assert cfg_read(vdev, 0x10, 4) == 0xFEB00000
    assert fn.config_read(0x10, 4) == fn.bars[0].address  # the function's BAR never changes


def test_vfio_status_writes_are_dropped():
    fn = Plain()
    vdev = VfioPciDevice(fn)
    vdev.open()
    fn.config.set(6, 2, fn.config.get(6, 2) | 0x2000)
    cfg_write(vdev, 6, 2, 0x2000)
    assert cfg_read(vdev, 6, 2) & 0x2000  # vfio-pci gives no write access to status


def test_vfio_command_goes_to_the_function_but_intx_disable_is_virtual():
    fn = Plain()
    vdev = VfioPciDevice(fn)
    vdev.open()
    assert cfg_read(vdev, 4, 2) & 0x7 == 0x3  # memory and I/O decode on, bus master off
    cfg_write(vdev, 4, 2, cfg_read(vdev, 4, 2) | 0x4 | 0x400)
    assert fn.bus_master_enabled()
    assert cfg_read(vdev, 4, 2) & 0x400
    assert vdev.virq_disabled
    # The bit is virtual, but while INTx is not in use vfio_pci_intx_mask makes the
    # function's own bit follow it (pci_intx on a PCI 2.3 function)...
    assert fn.command() & 0x400
    cfg_write(vdev, 4, 2, cfg_read(vdev, 4, 2) & ~0x400)
    assert not fn.command() & 0x400 and not vdev.virq_disabled
    # ...and a virtual bit the function does not have reads back as the user wrote it.
    fn.config_write(4, 2, fn.command() | 0x400)
    assert not cfg_read(vdev, 4, 2) & 0x400


def test_intx_status_line_and_check_and_set_mask():
    # The Interrupt Status bit is the level; INTx-disable keeps the line down, not the
    # bit; pci_check_and_{mask,unmask}_intx acts only when that bit agrees.
    fn = Plain()
    fn.irq_sink = lines = _LineRecorder()
    assert not fn.check_and_set_intx_mask(True)  # nothing pending: not its interrupt
    assert not fn.command() & 0x400
    fn.raise_irq(IrqIndex.INTX)
    assert fn.config_read(6, 2) & 0x08 and fn.intx_asserted() and lines.levels == [True]
    assert not fn.check_and_set_intx_mask(False)  # pending: no unmasking
    assert fn.check_and_set_intx_mask(True)
    assert fn.command() & 0x400 and not fn.intx_asserted() and fn.config_read(6, 2) & 0x08
    assert lines.levels == [True, False]
    fn.lower_irq()
    assert not fn.config_read(6, 2) & 0x08 and lines.levels == [True, False]
    assert fn.check_and_set_intx_mask(False) and not fn.command() & 0x400
    fn.raise_irq(IrqIndex.INTX)
    fn.raise_irq(IrqIndex.INTX)  # a level: once is the same as twice
    assert lines.levels == [True, False, True]
    fn.config_write(4, 2, fn.command() | 0x400)  # the host masks it itself (pci_intx)
    assert lines.levels == [True, False, True, False]


class _LineRecorder:
    def __init__(self):
        self.levels = []

    def intx_line(self, asserted):
        self.levels.append(asserted)


def test_vfio_interrupt_line_virtual_pin_read_only():
    fn = Plain()
    vdev = VfioPciDevice(fn)
    vdev.open()
    cfg_write(vdev, 0x3C, 2, 0x0B0B)
    assert cfg_read(vdev, 0x3C, 1) == 0x0B and cfg_read(vdev, 0x3D, 1) == 1
    assert fn.config_read(0x3C, 1) == 0


def test_vfio_capability_chain_hides_unknown_caps():
    vdev = VfioPciDevice(Express())
    vdev.open()
    walk = capability_offsets(lambda off, size: cfg_read(vdev, off, size))
    assert list(walk.values()) == [0x10, 0x11]  # SHPC skipped
    pos, chain = 0x100, []
    while pos:
        header = cfg_read(vdev, pos, 4)
        chain.append(header & 0xFFFF)
        pos = header >> 20
    assert chain == [0x03, 0x0B]  # PASID skipped
    dsn = 0x100
    assert vdev.read(8, (7 << 40) + dsn + 4) == bytes(range(8))


def test_vfio_first_hidden_ecap_becomes_a_placeholder():
    vdev = VfioPciDevice(Express(hide_first_ecap=True))
    vdev.open()
    header = cfg_read(vdev, 0x100, 4)
    assert header & 0xFFFFF == 0 and header >> 20 == 0x108


def test_vfio_pm_hides_pme_and_changes_power_state():
    fn = Plain()
    vdev = VfioPciDevice(fn)
    vdev.open()
    fn.config.set(0x40 + 2, 2, fn.config.get(0x40 + 2, 2) | 0xF800)
    assert fn.config_read(0x42, 2) & 0xF800
    vdev2 = VfioPciDevice(fn)
    vdev2.open()
    assert not cfg_read(vdev2, 0x42, 2) & 0xF800
    cfg_write(vdev2, 0x44, 2, 3)  # D3hot
    assert fn.power_state == 3
    assert errno_of(bar_read, vdev2, 0, 0, 4) == errno.EIO
    cfg_write(vdev2, 0x44, 2, 0)
    assert fn.power_state == 0 and bar_read(vdev2, 0, 0, 4) == 0


def test_vfio_config_access_beyond_the_space_is_efault():
    vdev = VfioPciDevice(Plain())
    vdev.open()
    assert errno_of(vdev.read, 4, (7 << 40) + 256) == errno.EFAULT
    assert errno_of(vdev.read, 8, (7 << 40) + 252) == errno.EFAULT
    assert len(vdev.read(256, 7 << 40)) == 256


def test_vfio_msi_enable_bit_follows_set_irqs():
    fn = Plain()
    vdev = VfioPciDevice(fn)
    vdev.open()
    flags_at = fn.msi.offset + 2
    assert cfg_read(vdev, flags_at, 2) & 0x0E == 2 << 1  # Multiple Message Capable: the device's own
    cfg_write(vdev, flags_at, 2, 0x0001 | (2 << 4))
    assert cfg_read(vdev, flags_at, 2) & 0x71 == 0  # not enabled through SET_IRQS: enable and MME dropped
    caller = FakeCaller()
    fd, _ = caller.eventfd()
    ioctl(vdev, VFIO_DEVICE_SET_IRQS, irq_set(flags=VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                                              index=VFIO_PCI_MSI_IRQ_INDEX, start=0, count=2, data=fds(fd, -1)),
          caller)
    assert fn.msi_enabled()
    cfg_write(vdev, flags_at, 2, 0x0001 | (3 << 4))
    flags = cfg_read(vdev, flags_at, 2)
    assert flags & 1 and (flags >> 4) & 7 == 1  # MME clamped to the 2 vectors enabled
    # The low byte of the flags is virtual and writable (init_pci_cap_msi_perm), and
    # vfio_msi_config_read rewrites QMASK at the capability's start, not in the flags:
    # after a write, Multiple Message Capable reads back what the user wrote.
    assert cfg_read(vdev, flags_at, 2) & 0x0E == 0
    cfg_write(vdev, flags_at, 2, 0)
    assert not fn.msi_enabled()  # the user's Enable=0 reaches the function


def test_vfio_msix_enable_bit_is_the_functions():
    fn = Express()
    vdev = VfioPciDevice(fn)
    vdev.open()
    flags_at = fn.msix.offset + 2
    cfg_write(vdev, flags_at, 2, 0x8000)
    assert cfg_read(vdev, flags_at, 2) == 7  # writes to MSI-X control are dropped
    caller = FakeCaller()
    fd, _ = caller.eventfd()
    ioctl(vdev, VFIO_DEVICE_SET_IRQS, irq_set(flags=VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                                              index=VFIO_PCI_MSIX_IRQ_INDEX, start=0, count=1, data=fds(fd)),
          caller)
    assert cfg_read(vdev, flags_at, 2) == 0x8007


def test_vfio_flr_is_virtual_and_resets_the_function():
    fn = Express()
    vdev = VfioPciDevice(fn)
    vdev.open()
    resets = fn.resets
    devctl = fn.express.offset + 8
    cfg_write(vdev, devctl, 2, cfg_read(vdev, devctl, 2) | 0x8000)
    assert not cfg_read(vdev, devctl, 2) & 0x8000
    assert fn.resets == resets + 1
    assert cfg_read(vdev, 4, 2) & 0x2  # config space restored around the reset


def test_vfio_unassigned_config_bytes_pass_through():
    fn = Plain()
    vdev = VfioPciDevice(fn)
    vdev.open()
    fn.config.init(0xF0, 4, 0x11223344, wmask=0xFFFF0000)
    assert cfg_read(vdev, 0xF0, 4) == 0x11223344
    cfg_write(vdev, 0xF0, 4, 0xAAAABBBB)
    assert fn.config_read(0xF0, 4) == 0xAAAA3344


def test_express_config_region_is_4k_and_conventional_256():
    for fn, size in ((Plain(), 256), (Express(), 4096)):
        vdev = VfioPciDevice(fn)
        vdev.open()
        _, out = ioctl(vdev, VFIO_DEVICE_GET_REGION_INFO, struct.pack("<IIIIQQ", 32, 0, 7, 0, 0, 0))
        info = vfio_region_info.from_buffer_copy(out[:ctypes.sizeof(vfio_region_info)])
        assert (info.size, info.offset) == (size, 7 << 40)
        assert len(vdev.read(size, 7 << 40)) == size
        assert errno_of(vdev.read, 1, (7 << 40) + size) == errno.EFAULT


def test_a_function_reset_returns_writable_config_to_power_on():
    fn = Plain()
    fn.config_write(4, 2, 0x0007)
    fn.config_write(0x0C, 1, 0x10)
    fn.config_write(0x3C, 1, 0x0B)
    fn.config_write(fn.msi.offset + 2, 2, 0x0001)
    fn.config_write(0x10, 4, 0xFFFFFFFF)
    fn.config.set(6, 2, fn.config.get(6, 2) | 0x2000)  # an error bit the device recorded (RW1C)
    fn.reset_function()
    assert fn.config_read(4, 2) == 0 and fn.config_read(0x0C, 1) == 0 and fn.config_read(0x3C, 1) == 0
    assert not fn.msi_enabled()
    assert fn.config_read(0x10, 4) == fn.bars[0].address  # the BAR as enumeration left it
    assert not fn.config_read(6, 2) & 0x2000 and fn.config_read(6, 2) & 0x0010  # RW1C cleared, RO kept
    assert fn.config_read(0, 4) == 0x12341AF4 and fn.config_read(0x3D, 1) == 1


class SoftReset(PciDevice):
    """D3hot -> D0 resets it (No_Soft_Reset clear): the PCI core's PM reset."""

    vendor_id, device_id = 0x1234, 0x5678

    def __init__(self, **options):
        super().__init__(**options)
        self.add_bar(0, MmioBar(0x1000, lambda o, s: 0, lambda o, s, v: None))
        self.add_capability(PmCapability(no_soft_reset=False))
        self.resets = 0

    def reset(self):
        self.resets += 1


def test_reset_methods_follow_the_capabilities():
    assert Plain().reset_methods() == []                   # PM with No_Soft_Reset set: no PM reset
    assert SoftReset().reset_methods() == ["pm"]
    assert Express().reset_methods() == ["flr"]

    alone = VfioPciDevice(Plain())
    HotResetBus(bus=2).add(0, 5, alone)
    assert alone.reset_methods() == ["bus"]   # alone on a bus that can be reset: pci_parent_bus_reset
    shared = HotResetBus(bus=3)
    a, b = VfioPciDevice(Plain()), VfioPciDevice(Plain())
    shared.add(0, 5, a)
    shared.add(8, 6, b)
    assert a.reset_methods() == []


def test_pm_soft_reset_through_d3hot():
    fn = SoftReset()
    vdev = VfioPciDevice(fn)
    assert fn.power_state == 3 and fn.resets == 0  # idle after probe: runtime-suspended to D3hot
    vdev.open()
    # waking from D3hot is a soft reset, then the reset probed at open (pci_try_reset_function)
    assert fn.resets == 2 and fn.power_state == 0
    cfg_write(vdev, fn.pm.offset + 4, 2, 3)    # D3hot
    cfg_write(vdev, fn.pm.offset + 4, 2, 0)    # D0: No_Soft_Reset clear, the function resets
    assert fn.resets == 3 and fn.power_state == 0


def test_vfio_pm_capability_hides_pme_support():
    fn = Plain()
    fn.config.init(fn.pm.offset + 2, 2, 0xC803)  # PME from D0 and D3hot/cold
    vdev = VfioPciDevice(fn)
    vdev.open()
    assert cfg_read(vdev, fn.pm.offset + 2, 2) == 0x0003
