"""The sysfs view beyond the devices: the VFIO modules, the VT-d unit, SR-IOV attributes.

The expected values are Debian's 6.1 kernel's, read in the vfio VM (QEMU 7.2,
``-device intel-iommu,intremap=on``, vfio-pci bound to edu) and checked
against the kernel's sources; each test says where a value comes from.
Mount tests need /dev/fuse and root, like tests/test_sysfs.py.
"""

import errno
import logging
import os
import stat
import time

import pytest

from cuse_vfio.machine import Machine
from cuse_vfio.machine.topology import parse
from cuse_vfio.sysfs import (
    SysfsDevice, SysfsIommu, SysfsModule, SysfsView, SysfsViewError, bool_parameter, qemu_vtd, vfio_modules,
)
from cuse_vfio.sysfs.iommu import SZ_1G, SZ_2M

EDU = "0000:00:02.0"
PF = "0000:00:04.0"
SZ_4K = 1 << 12


class Switches:
    """Stand-ins for the IOMMU drivers' live settings."""

    def __init__(self):
        self.noiommu = False
        self.dma_entry_limit = 0xFFFF

    def value(self, module: str, name: str):
        if name == "enable_unsafe_noiommu_mode":
            return self.noiommu
        return self.dma_entry_limit if name == "dma_entry_limit" else False


def edu_config() -> bytearray:
    cfg = bytearray(256)
    cfg[0:4] = bytes.fromhex("3412e811")
    return cfg


def pf_config(total_vfs: int = 8) -> bytearray:
    """A PCIe function with an SR-IOV capability at 0x160 behind an AER one at 0x100."""
    cfg = bytearray(4096)
    cfg[0:4] = bytes.fromhex("8680d310")
    cfg[0x100:0x104] = (0x0001 | 1 << 16 | 0x160 << 20).to_bytes(4, "little")   # AER, next 0x160
    cfg[0x160:0x164] = (0x0010 | 1 << 16).to_bytes(4, "little")                 # SR-IOV, last
    cfg[0x160 + 0x0C:0x160 + 0x0E] = total_vfs.to_bytes(2, "little")            # InitialVFs
    cfg[0x160 + 0x0E:0x160 + 0x10] = total_vfs.to_bytes(2, "little")            # TotalVFs
    cfg[0x160 + 0x14:0x160 + 0x16] = (0x80).to_bytes(2, "little")               # First VF Offset
    cfg[0x160 + 0x16:0x160 + 0x18] = (2).to_bytes(2, "little")                  # VF Stride
    cfg[0x160 + 0x1A:0x160 + 0x1C] = (0x10ED).to_bytes(2, "little")             # VF Device ID
    return cfg


def make_view(switches: Switches, pf: bytearray) -> SysfsView:
    devices = [SysfsDevice.from_config_space(EDU, 2, lambda: bytes(edu_config())),
               SysfsDevice.from_config_space(PF, 4, lambda: bytes(pf))]
    modules = vfio_modules(switches.value)
    return SysfsView(devices, modules=modules,
                     iommu=qemu_vtd((0, (1 << 39) - 1), SZ_4K | SZ_2M | SZ_1G))


@pytest.fixture
def switches():
    return Switches()


@pytest.fixture
def pf():
    return pf_config()


@pytest.fixture
def view(switches, pf):
    return make_view(switches, pf)


@pytest.fixture
def mnt(view, tmp_path):
    root = tmp_path / "sys"
    root.mkdir()
    with view.mount(str(root)):
        yield str(root)


def cat(path: str) -> str:
    with open(path) as f:
        return f.read()


# -- modules -----------------------------------------------------------------------------

def test_the_vfio_modules_of_a_loaded_vfio_pci(view):
    assert view.listdir("module") == ["irqbypass", "vfio", "vfio_iommu_type1", "vfio_pci", "vfio_pci_core",
                                      "vfio_virqfd"]
    # /sys/module/<m>/parameters as 6.1 lists it; vfio-pci's `ids` has permission 0, so no file
    assert sorted(view.listdir("module/vfio_pci/parameters")) == [
        "disable_denylist", "disable_idle_d3", "disable_vga", "enable_sriov", "nointxmask"]
    assert sorted(view.listdir("module/vfio_iommu_type1/parameters")) == [
        "allow_unsafe_interrupts", "disable_hugepages", "dma_entry_limit"]
    assert view.listdir("module/vfio/parameters") == ["enable_unsafe_noiommu_mode"]
    assert "parameters" not in view.listdir("module/vfio_pci_core")
    for param, value in (("vfio_pci/parameters/nointxmask", b"N\n"),
                         ("vfio_pci/parameters/disable_vga", b"N\n"),
                         ("vfio_iommu_type1/parameters/allow_unsafe_interrupts", b"N\n"),
                         ("vfio_iommu_type1/parameters/dma_entry_limit", b"65535\n"),
                         ("vfio/parameters/enable_unsafe_noiommu_mode", b"N\n"),
                         ("vfio/version", b"0.3\n"), ("vfio_iommu_type1/version", b"0.2\n"),
                         ("vfio_virqfd/version", b"0.1\n"), ("vfio/initstate", b"live\n"),
                         ("vfio/taint", b"\n")):
        assert view.read(f"module/{param}") == value, param
    with pytest.raises(FileNotFoundError):
        view.read("module/vfio_pci/version")  # vfio-pci declares no MODULE_VERSION
    assert sorted(view.listdir("module/vfio/holders")) == ["vfio_iommu_type1", "vfio_pci", "vfio_pci_core"]
    assert view.readlink("module/vfio/holders/vfio_pci") == "../../vfio_pci"
    assert view.readlink("module/vfio_pci/drivers/pci:vfio-pci") == "../../../bus/pci/drivers/vfio-pci"
    assert view.readlink("bus/pci/drivers/vfio-pci/module") == "../../../../module/vfio_pci"


def test_parameters_follow_the_drivers_switches(view, switches):
    switches.noiommu = True
    switches.dma_entry_limit = 100
    assert view.read("module/vfio/parameters/enable_unsafe_noiommu_mode") == b"Y\n"
    assert view.read("module/vfio_iommu_type1/parameters/dma_entry_limit") == b"100\n"


def test_vfio_virqfd_is_a_module_of_6_1_only():
    """6.2 folded vfio_virqfd.ko into vfio.ko: 6.12's /sys/module has no vfio_virqfd (seen in both VMs)."""
    from cuse_vfio.uapi.abi import KernelAbi

    def names(version):
        return [m.name for m in vfio_modules(lambda module, name: 0, abi=KernelAbi(version))]

    assert names("6.1") == ["irqbypass", "vfio", "vfio_iommu_type1", "vfio_pci", "vfio_pci_core", "vfio_virqfd"]
    assert names("6.12") == ["irqbypass", "vfio", "vfio_iommu_type1", "vfio_pci", "vfio_pci_core"]
    topology = parse(f'kernel_abi = "6.12"\n[[device]]\nbdf = "{EDU}"\nmodel = "edu"\ngroup = 2\n', "t.toml")
    machine = Machine(topology)
    try:
        assert "vfio_virqfd" not in machine.sysfs_view().listdir("module")
    finally:
        machine.close()


def test_a_kernel_without_noiommu_has_no_vfio_parameters():
    modules = {m.name: m for m in vfio_modules(lambda module, name: 1, noiommu=False)}
    assert modules["vfio"].parameters == []  # Debian's 6.1: CONFIG_VFIO_NOIOMMU is not set


@pytest.mark.parametrize("name, parameters, words", [
    ("vfio-pci", [], "'-'"),
    ("m", [bool_parameter("p", 0o644, bool), bool_parameter("p", 0o644, bool)], "twice"),
    ("m", [bool_parameter("ids", 0, bool)], "mode 0 means no file"),
])
def test_bad_modules_say_what_is_wrong(name, parameters, words):
    with pytest.raises(SysfsViewError, match=words):
        SysfsModule(name, parameters)


def test_a_holder_must_be_listed():
    with pytest.raises(SysfsViewError, match="held by vfio_pci"):
        SysfsView([], modules=[SysfsModule("vfio", holders=("vfio_pci",))])


def test_module_files_are_sysfs_like_when_mounted(mnt, caplog):
    here = os.path.join(mnt, "module")
    for rel, mode in (("vfio_pci/parameters/nointxmask", 0o644), ("vfio_pci/parameters/disable_denylist", 0o444),
                      ("vfio/parameters/enable_unsafe_noiommu_mode", 0o644), ("vfio/initstate", 0o444),
                      ("vfio/uevent", 0o200)):
        assert stat.S_IMODE(os.stat(os.path.join(here, rel)).st_mode) == mode, rel
    assert cat(os.path.join(here, "vfio_iommu_type1/parameters/dma_entry_limit")) == "65535\n"
    # a parameter root could write on a real kernel: the view does not change the machine
    with pytest.raises(OSError) as e:
        os.open(os.path.join(here, "vfio/parameters/enable_unsafe_noiommu_mode"), os.O_WRONLY)
    assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:
        os.open(os.path.join(here, "vfio_pci/parameters/disable_vga"), os.O_WRONLY)
    assert e.value.errno == errno.EACCES
    # links resolve inside the view, as they will under /sys
    assert os.path.realpath(os.path.join(here, "vfio/holders/vfio_pci")) == os.path.join(here, "vfio_pci")
    assert os.path.realpath(os.path.join(here, "vfio_pci/drivers/pci:vfio-pci")) == \
        os.path.join(mnt, "bus/pci/drivers/vfio-pci")
    assert os.path.realpath(os.path.join(mnt, "bus/pci/drivers/vfio-pci/module")) == os.path.join(here, "vfio_pci")
    caplog.set_level(logging.INFO, logger="cuse_vfio.sysfs.mount")
    with open(os.path.join(here, "vfio/uevent"), "w") as f:
        f.write("add\n")
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and "no uevents" not in caplog.text:
        time.sleep(0.01)
    assert "module/vfio/uevent" in caplog.text and "no uevents" in caplog.text


# -- the VT-d unit -------------------------------------------------------------------------

def test_qemu_vtd_registers_are_qemus():
    unit = qemu_vtd((0, (1 << 39) - 1), SZ_4K | SZ_2M | SZ_1G)
    assert (unit.cap, unit.ecap) == (0xD2008C22260206, 0xF00F4A)  # as the 6.1 VM shows them
    assert (unit.address_width, unit.domains_supported) == (39, 65536)
    wide = qemu_vtd((0, (1 << 48) - 1), SZ_4K | SZ_2M | SZ_1G)
    assert wide.address_width == 48 and wide.cap >> 8 & 0x1F == 0b110  # SAGAW: 39- and 48-bit tables
    assert qemu_vtd((0, (1 << 39) - 1), SZ_4K).cap >> 34 & 0xF == 0  # no superpages, no SLLPS
    assert qemu_vtd((0, (1 << 40) - 1), SZ_4K) is None  # QEMU has no aw-bits=40
    assert qemu_vtd((0x1000, (1 << 39) - 1), SZ_4K) is None
    with pytest.raises(SysfsViewError, match="64-bit register"):
        SysfsIommu("dmar0", cap=-1, ecap=0)


def test_the_device_reaches_the_vtd_unit(view, mnt):
    cap = os.path.join(mnt, "bus/pci/devices", EDU, "iommu/intel-iommu/cap")
    assert cat(cap) == "d2008c22260206\n"
    unit = os.path.join(mnt, "devices/virtual/iommu/dmar0")
    assert os.path.realpath(os.path.join(mnt, "bus/pci/devices", EDU, "iommu")) == unit
    assert sorted(os.listdir(os.path.join(unit, "intel-iommu"))) == [
        "address", "cap", "domains_supported", "ecap", "version"]
    for name, text in (("address", "fed90000\n"), ("ecap", "f00f4a\n"), ("version", "1:0\n"),
                       ("domains_supported", "65536\n")):
        assert cat(os.path.join(unit, "intel-iommu", name)) == text, name
    assert os.listdir(os.path.join(unit, "devices")) == [EDU, PF]
    assert os.path.realpath(os.path.join(unit, "devices", EDU)) == os.path.join(mnt, "bus/pci/devices", EDU)
    assert os.path.realpath(os.path.join(unit, "subsystem")) == os.path.join(mnt, "class/iommu")
    assert os.path.realpath(os.path.join(mnt, "class/iommu/dmar0")) == unit
    # DPDK's reading: MGAW + 1 is its DMA mask
    assert (int(cat(cap), 16) >> 16 & 0x3F) + 1 == 39


def test_bind_dirs_add_the_modules_and_the_unit(view):
    binds = view.bind_dirs("/run/cv")
    assert {k: v for k, v in binds.items() if k in SysfsView.paths()} == SysfsView.paths("/run/cv")
    assert binds["/sys/module/vfio"] == "/run/cv/module/vfio"
    assert binds["/sys/module/vfio_pci"] == "/run/cv/module/vfio_pci"
    assert binds["/sys/devices/virtual/iommu"] == "/run/cv/devices/virtual/iommu"
    assert binds["/sys/class/iommu"] == "/run/cv/class/iommu"
    assert SysfsView([]).bind_dirs("/r") == SysfsView.paths("/r")


# -- SR-IOV ------------------------------------------------------------------------------

def test_only_a_physical_function_has_sriov_files(view, pf):
    names = view.listdir(f"bus/pci/devices/{PF}")
    assert [n for n in names if n.startswith("sriov")] == [
        "sriov_drivers_autoprobe", "sriov_numvfs", "sriov_offset", "sriov_stride", "sriov_totalvfs",
        "sriov_vf_device", "sriov_vf_total_msix"]
    assert not [n for n in view.listdir(f"bus/pci/devices/{EDU}") if n.startswith("sriov")]
    assert not [n for n in names + view.listdir(f"bus/pci/devices/{EDU}") if n == "max_vfs"]  # igb_uio's only
    read = lambda name: view.read(f"bus/pci/devices/{PF}/{name}")  # noqa: E731
    assert (read("sriov_totalvfs"), read("sriov_offset"), read("sriov_stride")) == (b"8\n", b"128\n", b"2\n")
    assert read("sriov_vf_device") == b"10ed\n" and read("sriov_drivers_autoprobe") == b"1\n"
    assert read("sriov_numvfs") == b"0\n"
    pf[0x160 + 0x10] = 3                 # NumVFs written ...
    assert read("sriov_numvfs") == b"0\n"
    pf[0x160 + 0x08] |= 1                # ... and VF Enable set: num_VFs
    assert read("sriov_numvfs") == b"3\n"


def test_an_sriov_capability_without_vfs_makes_no_physical_function():
    dev = SysfsDevice.from_config_space(PF, 4, lambda: bytes(pf_config(total_vfs=0)))
    assert dev.sriov is None
    assert SysfsDevice.from_config_space(PF, 4, lambda: bytes(pf_config())).sriov == 0x160
    with pytest.raises(SysfsViewError, match="SR-IOV"):
        SysfsDevice(PF, 4, 0x8086, 0x10D3, 0, 0, 0, 0, 0, config_reader=bytes, sriov=0x40)


def test_sriov_files_mounted(mnt):
    here = os.path.join(mnt, "bus/pci/devices", PF)
    assert cat(os.path.join(here, "sriov_totalvfs")) == "8\n"
    assert stat.S_IMODE(os.stat(os.path.join(here, "sriov_numvfs")).st_mode) == 0o644
    assert not os.access(os.path.join(mnt, "bus/pci/devices", EDU, "sriov_numvfs"), os.F_OK)


# -- the machine ---------------------------------------------------------------------------

def test_the_machines_view_shows_its_iommu_drivers():
    topology = parse(f'[[device]]\nbdf = "{EDU}"\nmodel = "edu"\ngroup = 2\n', "t.toml")
    for noiommu, shown in ((False, b"N\n"), (True, b"Y\n")):
        machine = Machine(topology, noiommu=noiommu)
        try:
            view = machine.sysfs_view()
            assert view.read("module/vfio/parameters/enable_unsafe_noiommu_mode") == shown
            assert view.read("module/vfio_iommu_type1/parameters/dma_entry_limit") == \
                f"{machine.type1.dma_entry_limit}\n".encode()
            assert view.iommu.address_width == (machine.type1.aperture[1] + 1).bit_length() - 1
            assert view.readlink(f"bus/pci/devices/{EDU}/iommu") == "../../../../devices/virtual/iommu/dmar0"
        finally:
            machine.close()
