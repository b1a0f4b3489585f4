"""Stand-ins for what the device layer is given: the ioctl argument, the caller, eventfds, DMA."""

import ctypes
import errno
import struct

from cuse_vfio.errors import VfioError


class FakeEventfd:
    """An eventfd: counts signals; ``watch`` lets a test play the client writing to it."""

    def __init__(self):
        self.count = 0
        self.released = False
        self.watchers = []

    def signal(self, value=1):
        self.count += value

    def take(self):
        value, self.count = self.count, 0
        return value

    def release(self):
        self.released = True

    def watch(self, callback):
        self.watchers.append(callback)
        return lambda: self.watchers.remove(callback)

    def client_write(self):
        for callback in list(self.watchers):
            callback()


class FakeGroupFile:
    def __init__(self, group_id):
        self.iommu_group = type("IommuGroup", (), {"id": group_id})()


class FakeCaller:
    """The process behind an ioctl: its fd table (eventfds, group files)."""

    pid = 4242
    memory = None

    def __init__(self):
        self.fds = {}

    def add(self, obj):
        fd = max(self.fds, default=9) + 1
        self.fds[fd] = obj
        return fd

    def eventfd(self):
        efd = FakeEventfd()
        return self.add(efd), efd

    def resolve_fd(self, fd):
        try:
            return self.fds[fd]
        except KeyError:
            raise VfioError(errno.EBADF, f"no fd {fd}") from None

    def get_eventfd(self, fd):
        obj = self.resolve_fd(fd)
        if not isinstance(obj, FakeEventfd):
            raise VfioError(errno.EINVAL, f"fd {fd} is not an eventfd")
        return obj


class FakeArg:
    """A UserArg over a bytearray: copy-in/copy-out with EFAULT outside it, the argsz rule in fetch_struct."""

    def __init__(self, data=b"", caller=None, value=0x7F0000001000):
        self.buf = bytearray(bytes(data))
        self.caller = caller if caller is not None else FakeCaller()
        self.value = value

    def _check(self, offset, size):
        if offset < 0 or offset + size > len(self.buf):
            raise VfioError(errno.EFAULT, f"{size} bytes at +{offset} are outside the argument")

    def read(self, offset, size):
        self._check(offset, size)
        return bytes(self.buf[offset:offset + size])

    def write(self, offset, data):
        self._check(offset, len(data))
        self.buf[offset:offset + len(data)] = data

    def fetch_struct(self, ctype, minsz):
        obj = ctype()
        ctypes.memmove(ctypes.addressof(obj), self.read(0, minsz), minsz)
        argsz = getattr(obj, "argsz", None)
        if argsz is not None and argsz < minsz:
            raise VfioError(errno.EINVAL, "argsz smaller than minsz")
        return obj

    def fetch_int(self):
        return struct.unpack("<i", self.read(0, 4))[0]


def ioctl(vdev, cmd, data, caller=None):
    """Run one device ioctl; returns (result, bytes of the argument afterwards). Raises VfioError."""
    arg = FakeArg(data, caller)
    result = vdev.ioctl(cmd, arg)
    return result, bytes(arg.buf)


def errno_of(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except VfioError as e:
        return e.errno
    return 0


class FakeIommuFault(VfioError):
    def __init__(self, iova, size, write):
        super().__init__(errno.EFAULT, f"iova 0x{iova:x}+{size} is not mapped")
        self.reason = "unmapped"


class FakeDmaSpace:
    """A DmaSpace with mapped windows of memory and a fault log."""

    def __init__(self):
        self.windows = {}  # iova -> bytearray
        self.faults = []

    def map(self, iova, size):
        self.windows[iova] = bytearray(size)
        return self.windows[iova]

    def _find(self, iova, size, write):
        for base, mem in self.windows.items():
            if base <= iova and iova + size <= base + len(mem):
                return mem, iova - base
        self.faults.append({"iova": iova, "size": size, "write": write, "reason": "unmapped"})
        raise FakeIommuFault(iova, size, write)

    def dma_read(self, iova, size, device=None):
        mem, off = self._find(iova, size, False)
        return bytes(mem[off:off + size])

    def dma_write(self, iova, data, device=None):
        mem, off = self._find(iova, len(data), True)
        mem[off:off + len(data)] = data

    def record_fault(self, **fault):
        self.faults.append(fault)


# -- device-fd helpers ------------------------------------------------------------
OFFSET_SHIFT = 40
CONFIG_REGION = 7


def region_offset(index, offset=0):
    return (index << OFFSET_SHIFT) + offset


def cfg_read(vdev, offset, size):
    return int.from_bytes(vdev.read(size, region_offset(CONFIG_REGION, offset)), "little")


def cfg_write(vdev, offset, size, value):
    return vdev.write(value.to_bytes(size, "little"), region_offset(CONFIG_REGION, offset))


def bar_read(vdev, index, offset, size):
    return int.from_bytes(vdev.read(size, region_offset(index, offset)), "little")


def bar_write(vdev, index, offset, size, value):
    return vdev.write(value.to_bytes(size, "little"), region_offset(index, offset))


def irq_set(argsz=None, flags=0, index=0, start=0, count=0, data=b""):
    """A struct vfio_irq_set with its data, as a client lays it out."""
    if argsz is None:
        argsz = 20 + len(data)
    return struct.pack("<IIIII", argsz, flags, index, start, count) + bytes(data)


def fds(*numbers):
    return b"".join(struct.pack("<i", n) for n in numbers)


def enable_master(vdev):
    cmd = cfg_read(vdev, 4, 2)
    cfg_write(vdev, 4, 2, cmd | 0x6)
