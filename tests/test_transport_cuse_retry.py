"""The CUSE unrestricted-ioctl retry protocol, against a model of the kernel's side.

This host has no CUSE, so ``CuseKernel`` plays ``fuse_do_ioctl``: it sends an
ioctl with nothing first, copies in and out exactly the iovecs the server's
retry reply names (EFAULT when the caller's memory is not there), enforces
the 256-iovec / 128 KiB limits, and loops until a final answer.  The server
side is the real one (``Server._run_cuse_ioctl`` with the real dispatcher,
core, edu device and type1 IOMMU); the caller is an in-process LocalProcess
whose memory the "kernel" copies from.
"""

import ctypes
import errno
import struct

import pytest

from cuse_vfio.machine import Machine
from cuse_vfio.machine.topology import load
from cuse_vfio.dispatch import Node
from cuse_vfio.errors import VfioError
from cuse_vfio.transport.local import LocalProcess
from cuse_vfio.transport.retry import MAX_BYTES, MAX_IOV, RetryMemory
from cuse_vfio.transport.server import Server
from cuse_vfio.uapi import (
    VFIO_CHECK_EXTENSION,
    VFIO_DEVICE_GET_INFO,
    VFIO_DEVICE_SET_IRQS,
    VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_WRITE,
    VFIO_GET_API_VERSION,
    VFIO_GROUP_GET_DEVICE_FD,
    VFIO_GROUP_GET_STATUS,
    VFIO_GROUP_SET_CONTAINER,
    VFIO_IOMMU_GET_INFO,
    VFIO_IOMMU_MAP_DMA,
    VFIO_IOMMU_UNMAP_DMA,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_SET_IOMMU,
    VFIO_TYPE1v2_IOMMU,
    vfio_device_info,
    vfio_group_status,
    vfio_iommu_type1_dma_map,
    vfio_iommu_type1_dma_unmap,
    vfio_iommu_type1_info,
    vfio_irq_set,
)
from cuse_vfio.uapi.caps import parse_caps

PAGE = 4096
EDU = b"0000:00:02.0\0"


class FakeRequest:
    """What the C replies would send, recorded; the retry limits as cv_reply_ioctl_retry checks them."""

    def __init__(self):
        self.kind = None
        self.replied = False

    def err(self, e):
        self.kind, self.errno, self.replied = "err", e, True

    def ok(self):
        self.err(0)

    def ioctl(self, result, data=b""):
        self.kind, self.result, self.data, self.replied = "ioctl", result, bytes(data), True

    def ioctl_retry(self, ranges):
        if 2 * len(ranges) > 256 or sum(n for _, n in ranges) > 128 * 1024:
            return -errno.ENOMEM
        self.kind, self.ranges, self.replied = "retry", list(ranges), True
        return 0


class CuseKernel:
    """fuse_do_ioctl for an unrestricted ioctl on a CUSE device, one calling thread."""

    def __init__(self, server, proc, tid=4321):
        self.server = server
        self.proc = proc
        self.key = (7, tid)
        self.rounds = 0

    def ioctl(self, file_object, cmd, arg):
        handle = self.server._new_handle(file_object, None, 0)
        ranges = []
        self.rounds = 0
        while True:
            self.rounds += 1
            assert self.rounds <= 8, "the server keeps asking for more"
            try:
                data = b"".join(self.proc.memory.read(a, n) for a, n in ranges)
            except VfioError:
                return -errno.EFAULT  # copy_from_user of an in iovec failed: the server never sees it
            size = sum(n for _, n in ranges)
            rq = FakeRequest()
            self.server._run_cuse_ioctl(rq, handle, self.key, cmd, arg, self.proc, data, size, size)
            assert rq.replied
            if rq.kind == "retry":
                ranges = rq.ranges
                continue
            if rq.kind == "err":
                return -rq.errno
            # Copy the reply data out over the out iovecs, in order.
            out = rq.data
            assert len(out) <= size
            pos = 0
            for addr, n in ranges:
                chunk = out[pos:pos + n]
                if not chunk:
                    break
                try:
                    self.proc.memory.write(addr, chunk)
                except VfioError:
                    return -errno.EFAULT
                pos += len(chunk)
            return rq.result


@pytest.fixture
def world():
    records = []
    machine = Machine(load(None), trace=records.append)
    server = Server(machine.dispatcher, [2], transport="cuse")
    proc = LocalProcess(machine.dispatcher)
    kernel = CuseKernel(server, proc)
    yield machine, server, proc, kernel, records
    machine.close()


def put(proc, data, writable=True):
    addr = proc.memory.alloc(len(data))
    proc.memory.write(addr, bytes(data))
    if not writable:
        proc.memory._writable[addr] = False
    return addr


def group_with_container(machine, proc, kernel):
    container = machine.dispatcher.open(Node.container())
    group = machine.dispatcher.open(Node.group(2))
    cfd = proc.install_fd(container)
    assert kernel.ioctl(group, VFIO_GROUP_SET_CONTAINER, put(proc, struct.pack("<i", cfd))) == 0
    assert kernel.ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU) == 0
    return container, group


def test_integer_ioctls_need_no_retry(world):
    machine, server, proc, kernel, records = world
    container = machine.dispatcher.open(Node.container())
    assert kernel.ioctl(container, VFIO_GET_API_VERSION, 0) == 0 and kernel.rounds == 1
    assert kernel.ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) == 1 and kernel.rounds == 1


def test_get_status_fetches_minsz_then_copies_back(world):
    machine, server, proc, kernel, records = world
    group = machine.dispatcher.open(Node.group(2))
    addr = put(proc, bytes(vfio_group_status(argsz=8)) + b"\xee" * 8)
    assert kernel.ioctl(group, VFIO_GROUP_GET_STATUS, addr) == 0
    assert kernel.rounds == 2
    assert vfio_group_status.from_buffer_copy(proc.memory.read(addr, 8)).flags == 1
    assert proc.memory.read(addr + 8, 8) == b"\xee" * 8  # nothing past argsz is touched
    # The trace sees the call once, with what was copied.
    (record,) = [r for r in records if r.get("ioctl") == "VFIO_GROUP_GET_STATUS"]
    assert record["out"]["flags"] == 1 and record["result"] == 0


def test_a_large_argsz_without_capabilities_exchanges_only_the_struct(world):
    """GROUP_GET_STATUS with argsz 4096 at the end of mapped memory: the kernel copies 8 bytes, and so do we."""
    machine, server, proc, kernel, records = world
    group = machine.dispatcher.open(Node.group(2))
    area = proc.memory.alloc(PAGE)          # the page after it is a guard
    at_end = area + PAGE - 8
    proc.memory.write(at_end, bytes(vfio_group_status(argsz=4096)))
    assert kernel.ioctl(group, VFIO_GROUP_GET_STATUS, at_end) == 0
    assert vfio_group_status.from_buffer_copy(proc.memory.read(at_end, 8)).flags == 1


def test_get_status_errors_as_the_kernel(world):
    machine, server, proc, kernel, records = world
    group = machine.dispatcher.open(Node.group(2))
    small = put(proc, struct.pack("<II", 4, 0x5A))
    assert kernel.ioctl(group, VFIO_GROUP_GET_STATUS, small) == -errno.EINVAL
    assert proc.memory.read(small, 8) == struct.pack("<II", 4, 0x5A)
    assert kernel.ioctl(group, VFIO_GROUP_GET_STATUS, 8) == -errno.EFAULT
    readonly = put(proc, bytes(vfio_group_status(argsz=8)), writable=False)
    assert kernel.ioctl(group, VFIO_GROUP_GET_STATUS, readonly) == -errno.EFAULT


def test_set_container_acts_once_after_all_input(world, monkeypatch):
    machine, server, proc, kernel, records = world
    container = machine.dispatcher.open(Node.container())
    group = machine.dispatcher.open(Node.group(2))
    calls = []
    real = type(group).set_container
    monkeypatch.setattr(type(group), "set_container", lambda self, target: (calls.append(target), real(self, target)))
    cfd = proc.install_fd(container)
    assert kernel.ioctl(group, VFIO_GROUP_SET_CONTAINER, put(proc, struct.pack("<i", cfd))) == 0
    assert kernel.rounds == 2 and calls == [container]
    assert kernel.ioctl(group, VFIO_GROUP_SET_CONTAINER, put(proc, struct.pack("<i", 99))) == -errno.EBADF
    assert len(calls) == 1


def test_device_name_is_fetched_page_by_page(world):
    machine, server, proc, kernel, records = world
    container, group = group_with_container(machine, proc, kernel)
    # Ending on the last byte of its page (the next page is a guard): one fetch.
    area = proc.memory.alloc(PAGE)
    at_end = area + PAGE - len(EDU)
    proc.memory.write(at_end, EDU)
    before = len(proc.fds)
    fd = kernel.ioctl(group, VFIO_GROUP_GET_DEVICE_FD, at_end)
    assert fd >= 3 and kernel.rounds == 2 and len(proc.fds) == before + 1
    # Across a page boundary: the second page is fetched only when the first has no NUL.
    area2 = proc.memory.alloc(2 * PAGE)
    across = area2 + PAGE - 5
    proc.memory.write(across, EDU)
    fd2 = kernel.ioctl(group, VFIO_GROUP_GET_DEVICE_FD, across)
    assert fd2 >= 3 and kernel.rounds == 3
    # No NUL before unmapped memory: EFAULT, and no device was opened for it.
    proc.memory.write(area + PAGE - 4, b"xxxx")
    opened = len(proc.fds)
    assert kernel.ioctl(group, VFIO_GROUP_GET_DEVICE_FD, area + PAGE - 4) == -errno.EFAULT
    assert len(proc.fds) == opened


def test_argsz_widens_the_exchange_before_any_effect(world):
    machine, server, proc, kernel, records = world
    container, group = group_with_container(machine, proc, kernel)
    argsz = 512
    head = bytes(vfio_iommu_type1_info(argsz=argsz))
    addr = put(proc, head + bytes(argsz - len(head)) + b"\xab" * 64)
    assert kernel.ioctl(container, VFIO_IOMMU_GET_INFO, addr) == 0
    assert kernel.rounds == 3  # minsz, then argsz, then the answer
    buf = proc.memory.read(addr, argsz)
    info = vfio_iommu_type1_info.from_buffer_copy(buf)
    assert info.flags & 2 and info.cap_offset  # VFIO_IOMMU_INFO_CAPS
    assert 1 in [cap.id for cap in parse_caps(buf, info.cap_offset)]  # the IOVA range cap
    assert proc.memory.read(addr + argsz, 64) == b"\xab" * 64  # never past argsz


def test_argsz_beyond_the_cuse_limit_is_clipped(world):
    machine, server, proc, kernel, records = world
    container, group = group_with_container(machine, proc, kernel)
    addr = put(proc, bytes(vfio_iommu_type1_info(argsz=1 << 20)) + bytes((1 << 20) - 32))
    assert kernel.ioctl(container, VFIO_IOMMU_GET_INFO, addr) == 0
    assert vfio_iommu_type1_info.from_buffer_copy(proc.memory.read(addr, 32)).cap_offset


def test_trailing_data_and_eventfds(world):
    # Device fds are FUSE files in production, never CUSE; this runs a device
    # ioctl through the protocol anyway for its trailing data, and because
    # vfio-pci turns unexpected exceptions into EIO, RetryRequest included.
    machine, server, proc, kernel, records = world
    container, group = group_with_container(machine, proc, kernel)
    device = proc.resolve_fd(kernel.ioctl(group, VFIO_GROUP_GET_DEVICE_FD, put(proc, EDU)))
    efd = proc.eventfd()
    hdr = vfio_irq_set(argsz=ctypes.sizeof(vfio_irq_set) + 4, flags=VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                       index=VFIO_PCI_INTX_IRQ_INDEX, start=0, count=1)
    addr = put(proc, bytes(hdr) + struct.pack("<i", efd))
    assert kernel.ioctl(device, VFIO_DEVICE_SET_IRQS, addr) == 0
    assert kernel.rounds == 3
    assert machine.vdevs["0000:00:02.0"].intx.trigger is proc.resolve_fd(efd)
    info_addr = put(proc, bytes(vfio_device_info(argsz=ctypes.sizeof(vfio_device_info))))
    assert kernel.ioctl(device, VFIO_DEVICE_GET_INFO, info_addr) == 0
    info = vfio_device_info.from_buffer_copy(proc.memory.read(info_addr, ctypes.sizeof(vfio_device_info)))
    assert info.num_regions == 9 and info.num_irqs == 5


def test_map_and_unmap_write_back_only_after_acting(world):
    machine, server, proc, kernel, records = world
    container, group = group_with_container(machine, proc, kernel)
    buf = proc.memory.alloc(2 * PAGE)
    dma_map = vfio_iommu_type1_dma_map(argsz=32, flags=VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                                       vaddr=buf, iova=0x100000, size=2 * PAGE)
    assert kernel.ioctl(container, VFIO_IOMMU_MAP_DMA, put(proc, bytes(dma_map), writable=False)) == 0
    unmap_addr = put(proc, bytes(vfio_iommu_type1_dma_unmap(argsz=24, iova=0x100000, size=2 * PAGE)))
    assert kernel.ioctl(container, VFIO_IOMMU_UNMAP_DMA, unmap_addr) == 0
    assert vfio_iommu_type1_dma_unmap.from_buffer_copy(proc.memory.read(unmap_addr, 24)).size == 2 * PAGE
    # Unmapped exactly once: a second unmap of the range finds nothing.
    again = put(proc, bytes(vfio_iommu_type1_dma_unmap(argsz=24, iova=0x100000, size=2 * PAGE)))
    assert kernel.ioctl(container, VFIO_IOMMU_UNMAP_DMA, again) == 0
    assert vfio_iommu_type1_dma_unmap.from_buffer_copy(proc.memory.read(again, 24)).size == 0


def test_a_retry_that_does_not_match_is_refused(world):
    machine, server, proc, kernel, records = world
    group = machine.dispatcher.open(Node.group(2))
    handle = server._new_handle(group, None, 0)
    rq = FakeRequest()
    server._run_cuse_ioctl(rq, handle, (7, 1), VFIO_GROUP_GET_STATUS, 0x1000, proc, b"\0" * 12, 12, 12)
    assert rq.kind == "err" and rq.errno == errno.EIO


def test_retry_memory_limits():
    mem = RetryMemory(1, [], b"")
    for i in range(MAX_IOV // 2 + 1):
        with pytest.raises(Exception):
            mem.read(0x10000 + i * 2 * PAGE, 8)
    with pytest.raises(VfioError) as e:
        mem.next_ranges()
    assert e.value.errno == errno.ENOMEM
    big = RetryMemory(1, [], b"")
    with pytest.raises(Exception):
        big.read(0x10000, MAX_BYTES + 1)
    with pytest.raises(VfioError) as e:
        big.next_ranges()
    assert e.value.errno == errno.ENOMEM


def test_retry_memory_copies_back_up_to_the_last_write():
    data = bytes(range(16)) + bytes(range(100, 108))
    mem = RetryMemory(1, [(0x1000, 16), (0x3000, 8)], data)
    assert mem.read(0x1004, 4) == bytes([4, 5, 6, 7])
    assert mem.out_data() == b""
    mem.write(0x1002, b"\xff")
    assert mem.out_data() == bytes([0, 1, 0xFF])
    mem.write(0x3001, b"\xaa")
    assert mem.out_data() == bytes([0, 1, 0xFF]) + bytes(range(3, 16)) + bytes([100, 0xAA])


def test_release_waits_for_requests_in_flight(world):
    """A RELEASE that overtakes a deferred request is carried out when the request ends (fdget/fdput)."""
    machine, server, proc, kernel, records = world
    group = machine.dispatcher.open(Node.group(2))
    handle = server._new_handle(group, None, 0)
    handle.busy += 1
    rq = FakeRequest()
    server._release(rq, handle.fh, 7)
    assert rq.kind == "err" and rq.errno == 0  # answered at once
    assert group.opened  # but not yet released
    server._unbusy(handle)
    assert not group.opened
