"""The VFIO core's rules (drivers/vfio/vfio.c "0.3", 6.1 where they differ), one test or more per rule."""

import ctypes
import errno
import logging
import threading

import pytest

from core_fakes import FakeIommuDriver, Topology
from cuse_vfio.core import BusDevice, StubDriver, device_bind, device_unbind
from cuse_vfio.errors import VfioError
from cuse_vfio.uapi import (
    VFIO_API_VERSION,
    VFIO_CHECK_EXTENSION,
    VFIO_GET_API_VERSION,
    VFIO_GROUP_FLAGS_CONTAINER_SET,
    VFIO_GROUP_FLAGS_VIABLE,
    VFIO_GROUP_GET_DEVICE_FD,
    VFIO_GROUP_GET_STATUS,
    VFIO_GROUP_SET_CONTAINER,
    VFIO_GROUP_UNSET_CONTAINER,
    VFIO_IOMMU_MAP_DMA,
    VFIO_SET_IOMMU,
    vfio_group_status,
)

DEV = "0000:00:02.0"


def errname(excinfo):
    return errno.errorcode[excinfo.value.errno]


def int_arg(value):
    return ctypes.c_int32(value)


@pytest.fixture
def topo():
    t = Topology()
    t.add(DEV, 2)
    return t


def status(p, gfd, argsz=8):
    st = vfio_group_status(argsz=argsz)
    p.ioctl(gfd, VFIO_GROUP_GET_STATUS, st)
    return st.flags


def ready(topo, p=None, iommu_type=1):
    """container + group 2 + SET_IOMMU: the state in which device fds can be had."""
    p = p or topo.process()
    cfd = p.open("/dev/vfio/vfio")
    gfd = p.open("/dev/vfio/2")
    p.ioctl(gfd, VFIO_GROUP_SET_CONTAINER, int_arg(cfd))
    p.ioctl(cfd, VFIO_SET_IOMMU, iommu_type)
    return p, cfd, gfd


# -- IOMMU driver registry ----------------------------------------------------
def test_register_duplicate_driver_is_einval(topo):
    with pytest.raises(VfioError) as e:
        topo.vfio.register_iommu_driver(topo.drivers[0])
    assert errname(e) == "EINVAL"


def test_unregister_driver_removes_it(topo):
    topo.vfio.unregister_iommu_driver(topo.drivers[0])
    p = topo.process()
    assert p.ioctl(p.open("/dev/vfio/vfio"), VFIO_CHECK_EXTENSION, 1) == 0


def test_api_version():
    p = Topology().process()
    assert p.ioctl(p.open("/dev/vfio/vfio"), VFIO_GET_API_VERSION) == VFIO_API_VERSION == 0


def test_check_extension_without_driver_polls_every_driver_first_positive_wins():
    a = FakeIommuDriver("a", {1: 0, 7: 5})
    b = FakeIommuDriver("b", {1: 2, 7: 9})
    t = Topology(drivers=[a, b])  # b registered last: asked first, as list_add puts it at the head
    p = t.process()
    cfd = p.open("/dev/vfio/vfio")
    assert p.ioctl(cfd, VFIO_CHECK_EXTENSION, 1) == 2
    assert p.ioctl(cfd, VFIO_CHECK_EXTENSION, 7) == 9
    assert p.ioctl(cfd, VFIO_CHECK_EXTENSION, 42) == 0


def test_check_extension_with_driver_set_asks_only_that_driver():
    a = FakeIommuDriver("a", {1: 1})
    b = FakeIommuDriver("b", {3: 1})
    t = Topology(drivers=[a, b])
    t.add(DEV, 2)
    p, cfd, _ = ready(t, iommu_type=1)
    assert p.ioctl(cfd, VFIO_CHECK_EXTENSION, 1) == 1
    assert p.ioctl(cfd, VFIO_CHECK_EXTENSION, 3) == 0  # b would say yes, but a is the driver now


def test_set_iommu_without_group_is_einval(topo):
    p = topo.process()
    cfd = p.open("/dev/vfio/vfio")
    with pytest.raises(OSError) as e:
        p.ioctl(cfd, VFIO_SET_IOMMU, 1)
    assert errname(e) == "EINVAL"


def test_set_iommu_twice_is_einval(topo):
    p, cfd, _ = ready(topo)
    with pytest.raises(OSError) as e:
        p.ioctl(cfd, VFIO_SET_IOMMU, 1)
    assert errname(e) == "EINVAL"


def test_set_iommu_unsupported_type_is_enodev(topo):
    p = topo.process()
    cfd = p.open("/dev/vfio/vfio")
    gfd = p.open("/dev/vfio/2")
    p.ioctl(gfd, VFIO_GROUP_SET_CONTAINER, int_arg(cfd))
    with pytest.raises(OSError) as e:
        p.ioctl(cfd, VFIO_SET_IOMMU, 99)
    assert errname(e) == "ENODEV"


def test_set_iommu_attaches_every_group_and_unwinds_on_failure():
    picky = FakeIommuDriver("picky", {1: 1}, refuse_groups={3})
    easy = FakeIommuDriver("easy", {1: 1})
    t = Topology(drivers=[easy, picky])  # picky asked first
    t.add("0000:00:02.0", 2)
    t.add("0000:00:03.0", 3)
    p = t.process()
    cfd = p.open("/dev/vfio/vfio")
    for g in (2, 3):
        p.ioctl(p.open(f"/dev/vfio/{g}"), VFIO_GROUP_SET_CONTAINER, int_arg(cfd))
    p.ioctl(cfd, VFIO_SET_IOMMU, 1)
    # picky attached group 2, refused group 3, detached 2 again and was released
    (tried,) = picky.opened
    assert tried.groups == [] and tried.released
    (chosen,) = easy.opened
    assert [g.id for g in chosen.groups] == [2, 3]


def test_set_iommu_every_driver_refusing_reports_the_error():
    picky = FakeIommuDriver("picky", {1: 1}, refuse_groups={2})
    t = Topology(drivers=[picky])
    t.add(DEV, 2)
    p = t.process()
    cfd = p.open("/dev/vfio/vfio")
    p.ioctl(p.open("/dev/vfio/2"), VFIO_GROUP_SET_CONTAINER, int_arg(cfd))
    with pytest.raises(OSError) as e:
        p.ioctl(cfd, VFIO_SET_IOMMU, 1)
    assert errname(e) == "EIO"
    assert picky.opened[0].released


def test_detaching_last_group_releases_the_driver(topo):
    p, cfd, gfd = ready(topo)
    (iommu,) = topo.drivers[0].opened
    p.ioctl(gfd, VFIO_GROUP_UNSET_CONTAINER)
    assert iommu.released
    # the container is deprivileged: back to the unset state
    with pytest.raises(OSError) as e:
        p.ioctl(cfd, VFIO_IOMMU_MAP_DMA, 0)
    assert errname(e) == "EINVAL"


def test_unknown_container_ioctl_is_einval_before_set_iommu_and_goes_to_driver_after(topo):
    p = topo.process()
    cfd = p.open("/dev/vfio/vfio")
    with pytest.raises(OSError) as e:
        p.ioctl(cfd, 0x3B7F, 0)
    assert errname(e) == "EINVAL"
    gfd = p.open("/dev/vfio/2")
    p.ioctl(gfd, VFIO_GROUP_SET_CONTAINER, int_arg(cfd))
    p.ioctl(cfd, VFIO_SET_IOMMU, 1)
    with pytest.raises(OSError) as e:
        p.ioctl(cfd, 0x3B7F, 0)
    assert errname(e) == "ENOTTY"
    assert topo.drivers[0].opened[0].ioctls == [0x3B7F]


def test_container_read_write_go_to_driver(topo):
    p = topo.process()
    cfd = p.open("/dev/vfio/vfio")
    with pytest.raises(OSError) as e:
        p.pread(cfd, 4, 0)
    assert errname(e) == "EINVAL"
    gfd = p.open("/dev/vfio/2")
    p.ioctl(gfd, VFIO_GROUP_SET_CONTAINER, int_arg(cfd))
    p.ioctl(cfd, VFIO_SET_IOMMU, 1)
    assert p.pread(cfd, 4, 0) == b"rrrr"
    with pytest.raises(OSError) as e:  # the fake driver has no write op
        p.pwrite(cfd, b"x", 0)
    assert errname(e) == "EINVAL"


# -- groups -------------------------------------------------------------------
def test_group_one_open_at_a_time(topo):
    p = topo.process()
    gfd = p.open("/dev/vfio/2")
    with pytest.raises(OSError) as e:
        topo.process().open("/dev/vfio/2")
    assert errname(e) == "EBUSY"
    p.close(gfd)
    topo.process().open("/dev/vfio/2")


def test_open_unknown_group_is_enodev(topo):
    with pytest.raises(OSError) as e:
        topo.process().open("/dev/vfio/9")
    assert errname(e) == "ENODEV"


def test_get_status_flags(topo):
    p = topo.process()
    gfd = p.open("/dev/vfio/2")
    assert status(p, gfd) == VFIO_GROUP_FLAGS_VIABLE
    cfd = p.open("/dev/vfio/vfio")
    p.ioctl(gfd, VFIO_GROUP_SET_CONTAINER, int_arg(cfd))
    assert status(p, gfd) == VFIO_GROUP_FLAGS_VIABLE | VFIO_GROUP_FLAGS_CONTAINER_SET


def test_get_status_short_argsz_is_einval(topo):
    p = topo.process()
    gfd = p.open("/dev/vfio/2")
    with pytest.raises(OSError) as e:
        status(p, gfd, argsz=7)
    assert errname(e) == "EINVAL"


def test_get_status_bad_pointer_is_efault(topo):
    p = topo.process()
    gfd = p.open("/dev/vfio/2")
    with pytest.raises(OSError) as e:
        p.ioctl(gfd, VFIO_GROUP_GET_STATUS, 0x1000)
    assert errname(e) == "EFAULT"


def test_get_status_copies_out_only_minsz(topo):
    p = topo.process()
    gfd = p.open("/dev/vfio/2")
    buf = bytearray(b"\x10\x00\x00\x00" + b"\xff" * 12)  # argsz 16
    p.ioctl(gfd, VFIO_GROUP_GET_STATUS, buf)
    assert buf[4:8] == VFIO_GROUP_FLAGS_VIABLE.to_bytes(4, "little")
    assert buf[8:] == b"\xff" * 8


def test_unknown_group_ioctl_is_enotty(topo):
    p = topo.process()
    with pytest.raises(OSError) as e:
        p.ioctl(p.open("/dev/vfio/2"), 0x3B7F, 0)
    assert errname(e) == "ENOTTY"


def test_set_container_bad_fd_is_ebadf(topo):
    p = topo.process()
    gfd = p.open("/dev/vfio/2")
    for fd in (-1, 77):
        with pytest.raises(OSError) as e:
            p.ioctl(gfd, VFIO_GROUP_SET_CONTAINER, int_arg(fd))
        assert errname(e) == "EBADF"


def test_set_container_with_a_non_container_fd_is_einval(topo):
    p = topo.process()
    gfd = p.open("/dev/vfio/2")
    for fd in (gfd, p.eventfd()):
        with pytest.raises(OSError) as e:
            p.ioctl(gfd, VFIO_GROUP_SET_CONTAINER, int_arg(fd))
        assert errname(e) == "EINVAL"


def test_set_container_twice_is_einval(topo):
    p = topo.process()
    gfd = p.open("/dev/vfio/2")
    cfd = p.open("/dev/vfio/vfio")
    p.ioctl(gfd, VFIO_GROUP_SET_CONTAINER, int_arg(cfd))
    with pytest.raises(OSError) as e:
        p.ioctl(gfd, VFIO_GROUP_SET_CONTAINER, int_arg(p.open("/dev/vfio/vfio")))
    assert errname(e) == "EINVAL"


def test_set_container_on_non_viable_group_is_eperm(topo):
    topo.add("0000:00:02.1", 2, driver="e1000")
    p = topo.process()
    gfd = p.open("/dev/vfio/2")
    assert status(p, gfd) == 0
    with pytest.raises(OSError) as e:
        p.ioctl(gfd, VFIO_GROUP_SET_CONTAINER, int_arg(p.open("/dev/vfio/vfio")))
    assert errname(e) == "EPERM"


def test_set_container_bad_pointer_is_efault(topo):
    p = topo.process()
    with pytest.raises(OSError) as e:
        p.ioctl(p.open("/dev/vfio/2"), VFIO_GROUP_SET_CONTAINER, 0x10)
    assert errname(e) == "EFAULT"


def test_unset_container_without_one_is_einval(topo):
    p = topo.process()
    with pytest.raises(OSError) as e:
        p.ioctl(p.open("/dev/vfio/2"), VFIO_GROUP_UNSET_CONTAINER)
    assert errname(e) == "EINVAL"


def test_unset_container_with_device_fds_open_is_ebusy(topo):
    p, cfd, gfd = ready(topo)
    dfd = p.ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, DEV.encode() + b"\0")
    with pytest.raises(OSError) as e:
        p.ioctl(gfd, VFIO_GROUP_UNSET_CONTAINER)
    assert errname(e) == "EBUSY"
    p.close(dfd)
    p.ioctl(gfd, VFIO_GROUP_UNSET_CONTAINER)
    assert status(p, gfd) == VFIO_GROUP_FLAGS_VIABLE


def test_get_device_fd_needs_container_and_iommu(topo):
    p = topo.process()
    gfd = p.open("/dev/vfio/2")
    name = DEV.encode() + b"\0"
    with pytest.raises(OSError) as e:
        p.ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, name)
    assert errname(e) == "EINVAL"
    cfd = p.open("/dev/vfio/vfio")
    p.ioctl(gfd, VFIO_GROUP_SET_CONTAINER, int_arg(cfd))
    with pytest.raises(OSError) as e:
        p.ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, name)
    assert errname(e) == "EINVAL"
    p.ioctl(cfd, VFIO_SET_IOMMU, 1)
    assert p.ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, name) >= 3


def test_get_device_fd_unknown_name_is_enodev_even_before_a_container(topo):
    p = topo.process()
    gfd = p.open("/dev/vfio/2")
    with pytest.raises(OSError) as e:
        p.ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, b"0000:00:09.0\0")
    assert errname(e) == "ENODEV"


def test_get_device_fd_unterminated_or_unmapped_name(topo):
    p, _, gfd = ready(topo)
    with pytest.raises(OSError) as e:
        p.ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, 0x10)
    assert errname(e) == "EFAULT"
    with pytest.raises(OSError) as e:  # no NUL within PAGE_SIZE
        p.ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, b"x" * 5000)
    assert errname(e) == "EINVAL"
    with pytest.raises(OSError) as e:  # strndup_user(arg, PAGE_SIZE): 4096 bytes and a NUL is one too many
        p.ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, b"x" * 4096 + b"\0")
    assert errname(e) == "EINVAL"
    # ...and byte 4096 is never read: a page boundary right there is not a fault
    page = p.memory.alloc(4096)  # followed by an unmapped guard page
    p.memory.write(page, b"x" * 4096)
    with pytest.raises(OSError) as e:
        p.ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, page)
    assert errname(e) == "EINVAL"


def test_get_device_fd_name_ending_just_before_an_unmapped_page(topo):
    p, _, gfd = ready(topo)
    page = p.memory.alloc(4096)
    name = DEV.encode() + b"\0"
    p.memory.write(page + 4096 - len(name), name)
    assert p.ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, page + 4096 - len(name)) >= 3


def test_get_device_fd_on_group_made_non_viable_by_hot_add_is_einval(topo, caplog):
    p, _, gfd = ready(topo)
    late = BusDevice("0000:00:02.1")
    late.driver = StubDriver("e1000")  # arrives already bound to a host driver
    with caplog.at_level(logging.WARNING):
        topo.groups[2].add_device(late)
    assert "added to live group 2" in caplog.text
    with pytest.raises(OSError) as e:
        p.ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, DEV.encode() + b"\0")
    assert errname(e) == "EINVAL"


def test_device_fds_count_as_container_users(topo):
    p, cfd, gfd = ready(topo)
    group = topo.vfio.group(2)
    d1 = p.ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, DEV.encode() + b"\0")
    d2 = p.ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, DEV.encode() + b"\0")
    assert group.container_users == 3
    ops = topo.ops[DEV]
    assert ops.opens == 1  # the driver sees the first open and the last close
    p.close(gfd)
    assert group.container_users == 2 and group.container is not None
    p.close(d1)
    assert ops.releases == 0 and group.container_users == 1
    p.close(d2)
    assert ops.releases == 1 and group.container_users == 0 and group.container is None
    (iommu,) = topo.drivers[0].opened
    assert iommu.released


def test_group_cannot_be_reopened_while_previous_device_fds_live(topo):
    p, cfd, gfd = ready(topo)
    dfd = p.ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, DEV.encode() + b"\0")
    p.close(gfd)
    with pytest.raises(OSError) as e:
        topo.process().open("/dev/vfio/2")
    assert errname(e) == "EBUSY"
    p.close(dfd)
    topo.process().open("/dev/vfio/2")


def test_process_exit_leaves_nothing_behind(topo):
    p, cfd, gfd = ready(topo)
    p.ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, DEV.encode() + b"\0")
    p.exit()
    q, _, qgfd = ready(topo)
    assert status(q, qgfd) == VFIO_GROUP_FLAGS_VIABLE | VFIO_GROUP_FLAGS_CONTAINER_SET


def test_two_groups_share_a_container_and_leave_it_one_by_one():
    t = Topology()
    t.add("0000:00:02.0", 2)
    t.add("0000:00:03.0", 3)
    p = t.process()
    cfd = p.open("/dev/vfio/vfio")
    g2, g3 = p.open("/dev/vfio/2"), p.open("/dev/vfio/3")
    p.ioctl(g2, VFIO_GROUP_SET_CONTAINER, int_arg(cfd))
    p.ioctl(g3, VFIO_GROUP_SET_CONTAINER, int_arg(cfd))
    p.ioctl(cfd, VFIO_SET_IOMMU, 1)
    (iommu,) = t.drivers[0].opened
    p.close(g2)
    assert [g.id for g in iommu.groups] == [3] and not iommu.released
    p.close(cfd)  # the container lives on while a group holds it
    assert p.ioctl(g3, VFIO_GROUP_GET_DEVICE_FD, b"0000:00:03.0\0") >= 3


# -- viability ----------------------------------------------------------------
@pytest.mark.parametrize("driver,viable", [
    ("vfio-pci", True), ("pci-stub", True), ("pcieport", True), (None, True), ("e1000", False),
])
def test_viability_of_a_second_device(driver, viable):
    t = Topology()
    t.add(DEV, 2)
    t.add("0000:00:02.1", 2, driver=driver)
    assert t.vfio.group(2).viable() is viable


def test_unbound_list_keeps_group_viable_during_removal(topo):
    group = topo.vfio.group(2)
    dev = topo.devs[DEV]
    group.unbound.append(dev)
    group.devices.clear()  # the device is gone from the group, its driver not yet
    assert group.viable()
    group.unbound.clear()
    assert not group.viable()


# -- devices: hot add, hot remove, notifier -----------------------------------
def test_binding_a_dma_driver_inside_a_live_group_is_refused(topo):
    extra = topo.add("0000:00:02.1", 2, driver=None)
    p, _, _ = ready(topo)
    with pytest.raises(VfioError) as e:
        device_bind(extra, StubDriver("e1000"))
    assert errname(e) == "EBUSY" and extra.driver is None
    device_bind(extra, StubDriver("pci-stub"))  # whitelisted: fine


def test_hot_remove_waits_for_release_and_escalates_requests(topo):
    p, _, gfd = ready(topo)
    dfd = p.ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, DEV.encode() + b"\0")
    ops = topo.ops[DEV]
    done = threading.Event()

    def unbind():
        device_unbind(topo.devs[DEV])
        done.set()

    def on_request(count):
        if count == 2:  # the user gives in after the third request
            threading.Thread(target=p.close, args=(dfd,)).start()

    ops.on_request = on_request
    t = threading.Thread(target=unbind)
    t.start()
    assert done.wait(5)
    assert ops.requests[:3] == [0, 1, 2]
    assert topo.devs[DEV].driver is None
    assert topo.vfio.group(2) is not None  # still open by p
    assert topo.vfio.group(2).devices == [] and topo.vfio.group(2).unbound == []


def test_hot_remove_of_an_unused_device_does_not_wait(topo):
    device_unbind(topo.devs[DEV])
    assert topo.ops[DEV].requests == []
    assert topo.vfio.group(2) is None  # the last reference went with the device
    with pytest.raises(OSError) as e:
        topo.process().open("/dev/vfio/2")
    assert errname(e) == "ENODEV"


def test_rebinding_after_removal_makes_a_fresh_group(topo):
    dev = topo.devs[DEV]
    device_unbind(dev)
    device_bind(dev, topo.vfio_pci)
    p, _, gfd = ready(topo)
    assert p.ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, DEV.encode() + b"\0") >= 3


def test_device_removed_from_iommu_group_unbinds_first(topo):
    dev = topo.devs[DEV]
    topo.groups[2].remove_device(dev)
    assert dev.driver is None and dev.iommu_group is None and topo.vfio.group(2) is None


# -- external users -------------------------------------------------------------
def test_external_user_needs_a_group_file(topo):
    with pytest.raises(VfioError) as e:
        topo.vfio.group_get_external_user(topo.vfio.open_container())
    assert errname(e) == "EINVAL"


def test_external_user_needs_container_and_iommu(topo):
    p = topo.process()
    gfd = p.open("/dev/vfio/2")
    group = p.fds[gfd]
    with pytest.raises(VfioError) as e:
        topo.vfio.group_get_external_user(group)
    assert errname(e) == "EINVAL"
    cfd = p.open("/dev/vfio/vfio")
    p.ioctl(gfd, VFIO_GROUP_SET_CONTAINER, int_arg(cfd))
    with pytest.raises(VfioError) as e:
        topo.vfio.group_get_external_user(group)
    assert errname(e) == "EINVAL"
    assert group.container_users == 1  # the failed attempt gave its count back


def test_external_user_holds_the_container(topo):
    p, cfd, gfd = ready(topo)
    group = p.fds[gfd]
    ext = topo.vfio.group_get_external_user(group)
    assert topo.vfio.external_user_iommu_id(ext) == 2
    assert topo.vfio.external_check_extension(ext, 1) == 1
    assert topo.vfio.external_check_extension(ext, 99) == 0
    p.close(gfd)
    assert group.container is not None  # KVM still uses it
    topo.vfio.group_put_external_user(ext)
    assert group.container is None


def test_an_open_binds_the_region_ops_a_pread_and_pwrite_reach(topo):
    """dispatch.region_ops, what a transport binds when a file opens: a device fd's are its driver's
    own read and write; a file without them answers through the dispatcher, with its sentence."""
    from cuse_vfio.dispatch import region_ops

    p, cfd, gfd = ready(topo)
    dfd = p.ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, DEV.encode() + b"\0")
    read, write = region_ops(p.resolve_fd_os(dfd))
    ops = topo.ops[DEV]
    assert read == ops.read and write == ops.write
    assert read(3, 0) == bytes(3) and write(b"xy", 0) == 2
    read, write = region_ops(p.resolve_fd_os(gfd))
    with pytest.raises(VfioError) as e:
        read(4, 0)
    assert e.value.errno == errno.EINVAL and "cannot be read" in e.value.strerror
    with pytest.raises(VfioError) as e:
        write(b"x", 0)
    assert e.value.errno == errno.EINVAL and "cannot be written" in e.value.strerror
