"""The noiommu driver (drivers/vfio/container.c vfio_noiommu_ops) and register_default_drivers."""

import ctypes

import pytest

from core_fakes import Topology
from cuse_vfio.core import IommuGroup, Vfio
from cuse_vfio.errors import VfioError
from cuse_vfio.iommu import NoIommuDriver, Type1Driver, register_default_drivers
from cuse_vfio.uapi import (
    VFIO_CHECK_EXTENSION,
    VFIO_GROUP_SET_CONTAINER,
    VFIO_IOMMU_GET_INFO,
    VFIO_IOMMU_MAP_DMA,
    VFIO_NOIOMMU_IOMMU,
    VFIO_SET_IOMMU,
    VFIO_TYPE1_IOMMU,
    VFIO_TYPE1v2_IOMMU,
    vfio_iommu_type1_dma_map,
)
from test_iommu_common import errname, fails


def noiommu_topology(enabled=True):
    t = Topology(drivers=[])
    type1, noiommu = register_default_drivers(t.vfio, noiommu=enabled)
    # a fake group, as vfio_group_find_or_alloc makes for a device without an IOMMU
    t.groups[7] = IommuGroup(7, noiommu=True)
    t.add("0000:00:07.0", 7)
    return t, type1, noiommu


def joined(t, group=7):
    p = t.process()
    cfd = p.open("/dev/vfio/vfio")
    gfd = p.open(f"/dev/vfio/{group}")
    p.ioctl(gfd, VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(cfd))
    return p, cfd, gfd


def test_off_by_default():
    d = NoIommuDriver()
    assert d.enable_unsafe_noiommu_mode is False
    assert d.check_extension(VFIO_NOIOMMU_IOMMU) == 0
    with pytest.raises(VfioError) as e:
        d.open(VFIO_NOIOMMU_IOMMU)
    assert errname(e) == "ENODEV"


def test_enabled_answers_only_its_own_extension():
    d = NoIommuDriver(enable_unsafe_noiommu_mode=True)
    assert d.check_extension(VFIO_NOIOMMU_IOMMU) == 1
    assert [d.check_extension(e) for e in (VFIO_TYPE1_IOMMU, VFIO_TYPE1v2_IOMMU, 0, 9, 10)] == [0] * 5
    with pytest.raises(VfioError) as e:
        d.open(VFIO_TYPE1v2_IOMMU)
    assert errname(e) == "EINVAL"


def test_the_module_switch_can_be_flipped_at_run_time():
    t, _, noiommu = noiommu_topology(enabled=False)
    p = t.process()
    cfd = p.open("/dev/vfio/vfio")
    assert p.ioctl(cfd, VFIO_CHECK_EXTENSION, VFIO_NOIOMMU_IOMMU) == 0
    noiommu.enable_unsafe_noiommu_mode = True
    assert p.ioctl(cfd, VFIO_CHECK_EXTENSION, VFIO_NOIOMMU_IOMMU) == 1


def test_noiommu_container_has_no_map_dma():
    t, _, _ = noiommu_topology()
    p, cfd, _ = joined(t)
    # the container is noiommu now: only the noiommu driver is asked
    assert p.ioctl(cfd, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) == 0
    fails("ENODEV", p.ioctl, cfd, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)
    p.ioctl(cfd, VFIO_SET_IOMMU, VFIO_NOIOMMU_IOMMU)
    assert p.ioctl(cfd, VFIO_CHECK_EXTENSION, VFIO_NOIOMMU_IOMMU) == 1
    fails("ENOTTY", p.ioctl, cfd, VFIO_IOMMU_MAP_DMA, vfio_iommu_type1_dma_map(argsz=32))
    fails("ENOTTY", p.ioctl, cfd, VFIO_IOMMU_GET_INFO, bytearray(24))
    assert [g.id for g in p.fds[cfd].iommu_data.groups] == [7]


def test_set_iommu_noiommu_while_off_is_enodev():
    t, _, _ = noiommu_topology(enabled=False)
    p, cfd, _ = joined(t)
    fails("ENODEV", p.ioctl, cfd, VFIO_SET_IOMMU, VFIO_NOIOMMU_IOMMU)


def test_noiommu_refuses_iommu_backed_groups():
    data = NoIommuDriver(enable_unsafe_noiommu_mode=True).open(VFIO_NOIOMMU_IOMMU)
    with pytest.raises(VfioError) as e:
        data.attach_group(IommuGroup(2))
    assert errname(e) == "EINVAL"
    group = IommuGroup(7, noiommu=True)
    data.attach_group(group)
    with pytest.raises(VfioError):
        data.attach_group(group)
    data.detach_group(group)
    assert data.groups == []


def test_type1_refuses_noiommu_groups():
    iommu = Type1Driver().open(VFIO_TYPE1v2_IOMMU)
    with pytest.raises(VfioError) as e:
        iommu.attach_group(IommuGroup(7, noiommu=True))
    assert errname(e) == "EINVAL"


def test_register_default_drivers_registers_both_type1_asked_first():
    vfio = Vfio()
    type1, noiommu = register_default_drivers(vfio, noiommu=True, dma_entry_limit=10)
    assert vfio.iommu_drivers() == [type1, noiommu]
    assert (type1.name, noiommu.name) == ("vfio-iommu-type1", "vfio-noiommu")
    assert type1.dma_entry_limit == 10 and noiommu.enable_unsafe_noiommu_mode


def test_type1_container_through_the_default_drivers():
    t, type1, _ = noiommu_topology()
    t.add("0000:00:02.0", 2)
    p, cfd, _ = joined(t, group=2)
    p.ioctl(cfd, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)
    assert p.fds[cfd].iommu_driver is type1
