"""Module parameters ([module.NAME]) and the IOMMU's geometry ([iommu]): parsing, sysfs, and their effects."""

import ctypes
import errno
import struct

import pytest

from cuse_vfio import uapi
from cuse_vfio.machine import Machine
from cuse_vfio.machine.params import PARAMETERS, ModuleParams
from cuse_vfio.machine.topology import TopologyError, parse
from cuse_vfio.transport.local import LocalProcess

EDU = "0000:00:02.0"
DEVICE = f'[[device]]\nbdf = "{EDU}"\nmodel = "edu"\ngroup = 2\n'
PAGE = 4096
MSI_LOW, MSI_HIGH = 0xFEE00000, 0xFEEFFFFF


def machine_of(extra: str = "", **kw) -> Machine:
    return Machine(parse(DEVICE + extra, "t.toml"), **kw)


@pytest.fixture
def made():
    machines = []

    def make(extra: str = "", **kw):
        m = machine_of(extra, **kw)
        machines.append(m)
        return m
    yield make
    for m in machines:
        m.close()


def open_container(m: Machine, set_iommu: bool = True):
    p = LocalProcess(m.dispatcher)
    c = p.open("/dev/vfio/vfio")
    g = p.open("/dev/vfio/2")
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, struct.pack("<i", c))
    if set_iommu:
        p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
    return p, c, g


def map_dma(p, c, iova: int, size: int = PAGE) -> None:
    vaddr = p.memory.alloc(size)
    p.ioctl(c, uapi.VFIO_IOMMU_MAP_DMA, uapi.vfio_iommu_type1_dma_map(argsz=32, flags=3, vaddr=vaddr,
                                                                      iova=iova, size=size))


def errno_of(fn, *args) -> int:
    with pytest.raises(OSError) as e:
        fn(*args)
    return e.value.errno


def iova_ranges(p, c):
    info = bytearray(512)
    struct.pack_into("<I", info, 0, len(info))
    p.ioctl(c, uapi.VFIO_IOMMU_GET_INFO, info)
    head = uapi.vfio_iommu_type1_info.from_buffer_copy(info[:ctypes.sizeof(uapi.vfio_iommu_type1_info)])
    caps = {cap.id: cap for cap in uapi.parse_caps(bytes(info), head.cap_offset)}
    body = caps[uapi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE].body
    nr, = struct.unpack_from("<I", body)
    avail, = struct.unpack_from("<I", caps[uapi.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL].body)
    return head.iova_pgsizes, [struct.unpack_from("<QQ", body, 8 + 16 * i) for i in range(nr)], avail


# -- the topology tables -------------------------------------------------------------------

def test_module_tables_are_read_under_the_kernels_names():
    t = parse(DEVICE + "[module.vfio-iommu-type1]\ndma_entry_limit = 262144\n[module.vfio_pci]\ndisable_vga = true\n",
              "t.toml")
    assert t.modules == {"vfio_iommu_type1": {"dma_entry_limit": 262144}, "vfio_pci": {"disable_vga": True}}


@pytest.mark.parametrize("table, needle", [
    ("[module.vfio_iommu_type1]\ndma_entry_limt = 5\n", "line 7: module vfio_iommu_type1 has no parameter "
                                                       "'dma_entry_limt'"),
    ("[module.vfio_iommu_type1]\ndma_entry_limit = -1\n", "line 7: vfio_iommu_type1.dma_entry_limit is an unsigned"),
    ("[module.vfio_iommu_type1]\ndma_entry_limit = 4294967296\n", "unsigned 32-bit"),
    ("[module.vfio_iommu_type1]\ndma_entry_limit = true\n", "unsigned 32-bit"),
    ("[module.vfio]\nenable_unsafe_noiommu_mode = \"yes\"\n", "line 7: vfio.enable_unsafe_noiommu_mode is a bool"),
    ("[module.kvm]\nhalt_poll_ns = 0\n", "unknown module 'kvm'"),
    ("[module.vfio_pci]\nenable_sriov = true\n", "cannot be set here"),
    ("[module.vfio_pci]\nnointxmask = true\n", "cannot be set here"),
    ("[iommu]\naw_bits = 57\n", "line 7: aw_bits 57: QEMU's intel-iommu offers 39 or 48"),
    ("[iommu]\nintremap = 1\n", "intremap 1 is true or false"),
    ("[iommu]\nreserved = [[\"0x2000\", \"0x1000\"]]\n", "reserved region"),
    ("[iommu]\nreserved = [[0, 549755813887]]\n", "cover the whole aperture"),
    ("[iommu]\nwidth = 48\n", "unknown key 'width'"),
    ("[kernel]\nx = 1\n", "unknown section 'kernel'"),
])
def test_bad_parameters_and_geometry_name_the_line(table, needle):
    with pytest.raises(TopologyError) as e:
        parse(DEVICE + "\n" + table, "t.toml")
    assert needle in str(e.value)


def test_every_parameter_has_a_default_that_its_own_check_accepts():
    params = ModuleParams()
    for module, specs in PARAMETERS.items():
        for name, spec in specs.items():
            assert params.get(module, name) == spec.default
    with pytest.raises(ValueError, match="no parameter"):
        params.set("vfio", "nope", True)


# -- sysfs shows the live values ------------------------------------------------------------

def test_sysfs_parameters_show_what_the_topology_set(made):
    m = made("[module.vfio_iommu_type1]\ndma_entry_limit = 3\ndisable_hugepages = true\n"
             "[module.vfio_pci]\ndisable_vga = true\n[module.vfio]\n"
             "enable_unsafe_noiommu_mode = true\n")
    view = m.sysfs_view()
    for path, value in (("vfio_iommu_type1/parameters/dma_entry_limit", b"3\n"),
                        ("vfio_iommu_type1/parameters/disable_hugepages", b"Y\n"),
                        ("vfio_iommu_type1/parameters/allow_unsafe_interrupts", b"N\n"),
                        ("vfio_pci/parameters/disable_idle_d3", b"N\n"),
                        ("vfio_pci/parameters/nointxmask", b"N\n"),
                        ("vfio_pci/parameters/disable_vga", b"Y\n"),
                        ("vfio/parameters/enable_unsafe_noiommu_mode", b"Y\n")):
        assert view.read(f"module/{path}") == value, path
    assert m.type1.dma_entry_limit == 3 and m.noiommu.enable_unsafe_noiommu_mode


def test_noiommu_option_is_the_vfio_parameter(made):
    m = made(noiommu=True)
    assert m.params.get("vfio", "enable_unsafe_noiommu_mode") and m.noiommu.enable_unsafe_noiommu_mode
    assert m.sysfs_view().read("module/vfio/parameters/enable_unsafe_noiommu_mode") == b"Y\n"


# -- vfio_iommu_type1 ----------------------------------------------------------------------

def test_dma_entry_limit_is_where_map_dma_says_enospc(made):
    p, c, _ = open_container(made("[module.vfio_iommu_type1]\ndma_entry_limit = 3\n"))
    assert iova_ranges(p, c)[2] == 3
    for i in range(3):
        map_dma(p, c, 0x100000 + i * PAGE)
    assert iova_ranges(p, c)[2] == 0
    assert errno_of(map_dma, p, c, 0x200000) == errno.ENOSPC


def test_a_raised_dma_entry_limit_takes_more_than_65535_mappings(made):
    p, c, _ = open_container(made("[module.vfio_iommu_type1]\ndma_entry_limit = 262144\n"))
    assert iova_ranges(p, c)[2] == 262144
    iommu = p.fds[c].iommu_data
    base = p.memory.alloc(PAGE)
    for i in range(65536):  # through the driver: the ioctl path is the same rule, only slower
        iommu.map(0x100000 + i * PAGE, PAGE, base, 3, p)
    map_dma(p, c, 0x100000 + 65536 * PAGE)
    assert iova_ranges(p, c)[2] == 262144 - 65537


def test_without_interrupt_remapping_type1_refuses_groups_unless_allowed(made, caplog):
    p, c, g = open_container(made("[iommu]\nintremap = false\n"), set_iommu=False)
    assert errno_of(p.ioctl, c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU) == errno.EPERM
    assert "No interrupt remapping support" in caplog.text
    m = made("[iommu]\nintremap = false\n[module.vfio_iommu_type1]\nallow_unsafe_interrupts = true\n")
    open_container(m)  # SET_IOMMU succeeds
    assert not m.sysfs_view().iommu.ecap & 1 << 3  # ECAP.IR clear: what DPDK and users read
    assert made().sysfs_view().iommu.ecap & 1 << 3


def test_disable_hugepages_maps_with_4k_pages_only_and_keeps_the_pgsizes(made):
    for extra, used in (("", 0x40201000), ("[module.vfio_iommu_type1]\ndisable_hugepages = true\n", PAGE)):
        p, c, _ = open_container(made(extra))
        map_dma(p, c, 0x200000, 0x200000)
        assert iova_ranges(p, c)[0] == 0x40201000  # GET_INFO is the same either way
        (dma,) = p.fds[c].iommu_data.mappings()
        assert dma.iommu_pgsizes == used


# -- [iommu] geometry ----------------------------------------------------------------------

def test_aw_bits_48_lets_guest_memory_above_512_gib_be_mapped(made):
    p, c, _ = open_container(made())
    assert errno_of(map_dma, p, c, 1 << 39) == errno.EINVAL
    assert iova_ranges(p, c)[1] == [(0, MSI_LOW - 1), (MSI_HIGH + 1, (1 << 39) - 1)]
    m = made("[iommu]\naw_bits = 48\n")
    p, c, _ = open_container(m)
    map_dma(p, c, 1 << 39)
    map_dma(p, c, (1 << 48) - PAGE)
    assert errno_of(map_dma, p, c, 1 << 48) == errno.EINVAL
    assert iova_ranges(p, c)[1] == [(0, MSI_LOW - 1), (MSI_HIGH + 1, (1 << 48) - 1)]
    assert m.sysfs_view().iommu.address_width == 48
    assert made().sysfs_view().iommu.address_width == 39


def test_reserved_regions_are_cut_from_the_iova_ranges_and_shown_in_sysfs(made):
    m = made('[iommu]\nreserved = [["0xd0000000", "0xd00fffff"]]\n')
    p, c, _ = open_container(m)
    assert iova_ranges(p, c)[1] == [(0, 0xCFFFFFFF), (0xD0100000, MSI_LOW - 1), (MSI_HIGH + 1, (1 << 39) - 1)]
    assert errno_of(map_dma, p, c, 0xD0000000) == errno.EINVAL
    assert errno_of(map_dma, p, c, MSI_LOW) == errno.EINVAL
    map_dma(p, c, 0xD0100000)
    assert m.sysfs_view().read("kernel/iommu_groups/2/reserved_regions") == (
        b"0x00000000d0000000 0x00000000d00fffff reserved\n0x00000000fee00000 0x00000000feefffff msi\n")
