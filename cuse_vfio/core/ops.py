"""The operation tables the core talks through, as ``typing.Protocol``s.

The core never knows which IOMMU or which device it talks to: an IOMMU driver
(``drivers/vfio/vfio_iommu_type1.c`` in the kernel) implements
``IommuDriverOps`` and the per-container ``IommuData`` it opens; a device
(``vfio-pci`` in the kernel) implements ``DeviceOps``.  Arguments of
passthrough ioctls arrive as a ``UserArg``: the client's memory at the ioctl
argument, with the copy-in/copy-out rules (argsz, minsz, EFAULT) applied by its
implementation in :mod:`cuse_vfio.dispatch`, never re-implemented by drivers.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence, Tuple, Type, TypeVar, runtime_checkable

T = TypeVar("T")


class AddressSpace(Protocol):
    """The memory of one client process, as DMA and copy_{from,to}_user reach it."""

    pid: int

    def read(self, addr: int, size: int) -> bytes:
        """Raise VfioError(EFAULT) when any byte is not mapped readable."""

    def write(self, addr: int, data: bytes) -> None:
        """Raise VfioError(EFAULT) when any byte is not mapped writable."""

    def probe(self, addr: int, size: int, write: bool) -> None:
        """What pinning user pages checks, without moving bytes: EFAULT when any byte is
        not mapped (or not writable, with ``write``)."""


class ForeignFile:
    """An fd argument that is open but is none of this VFIO's files (/dev/null,
    an eventfd): what ``fget`` gives the kernel before it checks ``f_op``, so
    each ioctl answers it with its own errno (SET_CONTAINER: EINVAL or EBADFD)."""

    def __init__(self, what: str):
        self.what = what

    def __repr__(self) -> str:
        return f"ForeignFile({self.what!r})"


class Caller(Protocol):
    """Who issued a request: the process, and its memory."""

    pid: int
    memory: AddressSpace


@runtime_checkable
class UserArg(Protocol):
    """The ioctl argument of one call, as the kernel's ``unsigned long arg``."""

    #: the raw argument: a pointer into the caller, or an integer (SET_IOMMU, CHECK_EXTENSION)
    value: int
    #: the process that made the call (MAP_DMA records whose memory a vaddr is in)
    caller: Caller
    #: the caller's memory through the same channel as the argument, for pointers found
    #: *inside* the argument (the dirty bitmaps of UNMAP_DMA and DIRTY_PAGES)
    memory: AddressSpace

    def fetch_struct(self, ctype: Type[T], minsz: int) -> T:
        """copy_from_user of ``minsz`` bytes into a zeroed ``ctype``.

        EFAULT when the memory is not there; EINVAL when the struct has an
        ``argsz`` field and it is smaller than ``minsz``.  The returned object
        carries the bytes the caller passed; fields past ``minsz`` are zero.
        """

    def read(self, offset: int, size: int) -> bytes:
        """copy_from_user of ``size`` bytes at ``arg + offset`` (EFAULT if absent)."""

    def write(self, offset: int, data: bytes) -> None:
        """copy_to_user of ``data`` at ``arg + offset`` (EFAULT if absent)."""

    def fetch_int(self) -> int:
        """get_user of a 32-bit signed int at ``arg`` (fds in SET_CONTAINER)."""

    def fetch_string(self, limit: int) -> str:
        """strndup_user(arg, limit): NUL-terminated; EFAULT, or EINVAL when longer than ``limit``."""


class IommuData(Protocol):
    """One container's IOMMU (``iommu_data`` in the kernel): created by ``IommuDriverOps.open``."""

    def release(self) -> None: ...

    def attach_group(self, group: "object") -> None:
        """Attach an IOMMU group (``core.IommuGroup``); raise VfioError to refuse."""

    def detach_group(self, group: "object") -> None: ...

    def ioctl(self, cmd: int, arg: UserArg) -> int:
        """Every container ioctl the core does not handle itself, CHECK_EXTENSION included."""


class IommuDriverOps(Protocol):
    """An IOMMU backend registered with the core (``vfio_iommu_driver_ops``)."""

    name: str

    def check_extension(self, ext: int) -> int:
        """CHECK_EXTENSION asked of the driver with no container (``ops->ioctl(NULL, ...)``)."""

    def open(self, arg: int) -> IommuData:
        """SET_IOMMU(arg) chose this driver: build the per-container state."""


class DeviceOps(Protocol):
    """A device bound to a vfio driver (``vfio_device_ops``)."""

    name: str

    def open(self) -> None:
        """A device fd is being created; raise VfioError to refuse it."""

    def release(self) -> None:
        """The last reference of one device fd went away."""

    def ioctl(self, cmd: int, arg: UserArg) -> int: ...

    def read(self, size: int, offset: int) -> bytes: ...

    def write(self, data: bytes, offset: int) -> int: ...

    def request(self, count: int) -> None:
        """Hot removal waits for the user: ask it (again) to let the device go."""

    # Optional: ``match(name) -> bool`` decides which GET_DEVICE_FD names mean this
    # device (raising VfioError for a malformed one); without it the name must be exact.
    # Optional: ``device_feature(flags, arg, argsz) -> int`` answers VFIO_DEVICE_FEATURE
    # after the core checked its header (``uapi.device_feature_header``), inside the
    # driver's optional ``awake()`` context; ``argsz`` counts the bytes after the header.


class DmaSpace(Protocol):
    """What a device model sees of the container's IOMMU: DMA by IOVA."""

    def dma_read(self, iova: int, size: int, device: Optional[str] = None) -> bytes: ...

    def dma_write(self, iova: int, data: bytes, device: Optional[str] = None) -> None: ...

    # Scatter lists [(iova, length), ...] in one go; a DmaSpace without them is
    # driven one entry at a time by the PCI framework's DmaPort.
    def dma_readv(self, segments: Sequence[Tuple[int, int]], device: Optional[str] = None) -> bytes: ...

    def dma_writev(self, segments: Sequence[Tuple[int, int]], data: bytes, device: Optional[str] = None) -> None: ...


#: capability numbers (include/uapi/linux/capability.h)
CAP_SYS_RAWIO = 17


def capable(caller, cap: int) -> bool:
    """``capable(cap)`` of the process behind ``caller``; in-process callers without a
    ``capable`` method (tests, tools) act as the server's own root."""
    check = getattr(caller, "capable", None)
    return True if check is None else bool(check(cap))
