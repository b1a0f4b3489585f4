"""(node, cmd, caller) -> core call, and the only place a VfioError becomes -errno.

The tables below say which ioctls the core answers itself on each kind of
node; everything else on a container goes to its IOMMU driver and everything
on a device fd to the device's driver, as ``vfio_fops_unl_ioctl`` and
``vfio_device_fops_unl_ioctl`` do.  Argument rules live in ``IoctlArg``.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple, Union

from ..core import Container, DeviceFile, Group, Vfio
from ..errors import RetryRequest, VfioError
from ..uapi import (
    VFIO_CHECK_EXTENSION,
    VFIO_GET_API_VERSION,
    VFIO_GROUP_GET_DEVICE_FD,
    VFIO_GROUP_GET_STATUS,
    VFIO_GROUP_SET_CONTAINER,
    VFIO_GROUP_UNSET_CONTAINER,
    VFIO_SET_IOMMU,
    NodeKind,
    decode,
    offsetofend,
    vfio_group_status,
)
from .arg import PAGE_SIZE, IoctlArg

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Node:
    """A node a client opens: the container node, or the node of one group."""

    kind: NodeKind
    name: str
    group_id: Optional[int] = None

    @classmethod
    def container(cls) -> "Node":
        return cls(NodeKind.CONTAINER, "vfio")

    @classmethod
    def group(cls, group_id: int) -> "Node":
        return cls(NodeKind.GROUP, str(group_id), group_id)


@dataclass(frozen=True)
class GroupNode:
    """A group's node and who may open it: a topology's [group.N] table, as a transport serves it."""

    id: int
    uid: int = 0
    gid: int = 0
    mode: int = 0o600
    #: a group made for a device without an IOMMU: its node is noiommu-N
    noiommu: bool = False

    @property
    def name(self) -> str:
        """The node's name under /dev/vfio (``vfio_group_alloc``: "noiommu-%d" or "%d")."""
        return f"noiommu-{self.id}" if self.noiommu else str(self.id)


# -- group ioctls -----------------------------------------------------------
_GROUP_STATUS_MINSZ = offsetofend(vfio_group_status, "flags")


def _group_get_status(group: Group, arg: IoctlArg) -> int:
    status = arg.fetch_struct(vfio_group_status, _GROUP_STATUS_MINSZ)
    status.flags = group.status_flags()
    arg.write(0, bytes(status)[:_GROUP_STATUS_MINSZ])
    return 0


def _group_set_container(group: Group, arg: IoctlArg) -> int:
    fd = arg.fetch_int()
    if fd < 0:
        raise VfioError(errno.EBADF, f"SET_CONTAINER: {fd} is not a file descriptor")
    group.set_container(arg.caller.resolve_fd(fd))
    return 0


def _group_unset_container(group: Group, arg: IoctlArg) -> int:
    group.unset_container()
    return 0


def _group_get_device_fd(group: Group, arg: IoctlArg) -> int:
    name = arg.fetch_string(PAGE_SIZE)
    devfile = group.get_device_fd(name)
    try:
        return arg.caller.install_fd(devfile)
    except BaseException:
        devfile.release()
        raise


_GROUP_IOCTLS: Dict[int, Callable[[Group, IoctlArg], int]] = {
    VFIO_GROUP_GET_STATUS: _group_get_status,
    VFIO_GROUP_SET_CONTAINER: _group_set_container,
    VFIO_GROUP_UNSET_CONTAINER: _group_unset_container,
    VFIO_GROUP_GET_DEVICE_FD: _group_get_device_fd,
}

# -- container ioctls ---------------------------------------------------------
_CONTAINER_IOCTLS: Dict[int, Callable[[Container, IoctlArg], int]] = {
    VFIO_GET_API_VERSION: lambda c, arg: c.get_api_version(),
    VFIO_CHECK_EXTENSION: lambda c, arg: c.check_extension(arg.value),
    VFIO_SET_IOMMU: lambda c, arg: c.set_iommu(arg.value, arg.caller),
}


def _no_such_group_ioctl(group: Group, cmd: int, arg: IoctlArg) -> int:
    raise VfioError(errno.ENOTTY, f"group {group.id}: unknown ioctl 0x{cmd:x}")


#: what a client's open file is, on each kind of node
FileObject = Union[Container, Group, DeviceFile]

# kind of file -> (table, what the rest goes to)
_ROUTES: Dict[type, Tuple[NodeKind, Dict[int, Callable[[Any, IoctlArg], int]], Callable[..., int]]] = {
    Container: (NodeKind.CONTAINER, _CONTAINER_IOCTLS, Container.ioctl),
    Group: (NodeKind.GROUP, _GROUP_IOCTLS, _no_such_group_ioctl),
    DeviceFile: (NodeKind.DEVICE, {}, DeviceFile.ioctl),
}


def node_kind(file_object: object) -> NodeKind:
    return _ROUTES[type(file_object)][0]


def region_ops(file_object: object) -> Tuple[Callable[[int, int], bytes], Callable[[bytes, int], int]]:
    """``(read, write)`` of an open, looked up once for a transport to bind when it opens: what
    ``Dispatcher.read`` and ``Dispatcher.write`` reach on every call.  A device fd hands out its
    driver's region access (``DeviceFile.region_ops``); anything else answers through the dispatcher."""
    own = getattr(file_object, "region_ops", None)
    if own is not None:
        return own()
    return partial(Dispatcher.read, file_object), partial(Dispatcher.write, file_object)


class Dispatcher:
    """Routes requests of every transport to the core; one per server."""

    def __init__(self, vfio: Vfio, trace: Optional[Callable[[dict], None]] = None):
        self.vfio = vfio
        self._sink: Optional[Callable[[dict], None]] = None
        #: ``make_arg(value, caller, memory=None)``: the IoctlArg of one ioctl, which records its bytes
        #: while tracing is on (the class itself otherwise: made once per ioctl)
        self.make_arg: Callable[..., IoctlArg] = IoctlArg
        self.trace = trace

    @property
    def trace(self) -> Optional[Callable[[dict], None]]:
        """Receives one decoded record per ioctl when set (``--trace``)."""
        return self._sink

    @trace.setter
    def trace(self, sink: Optional[Callable[[dict], None]]) -> None:
        self._sink = sink
        self.make_arg = IoctlArg if sink is None else partial(IoctlArg, record=True)

    # -- open / release --------------------------------------------------
    def open(self, node: Node, caller=None) -> object:
        if node.kind is NodeKind.CONTAINER:
            return self.vfio.open_container()
        if node.kind is NodeKind.GROUP:
            assert node.group_id is not None  # Node.group() always sets it
            return self.vfio.open_group(node.group_id, caller)
        raise VfioError(errno.ENODEV, f"{node.name} cannot be opened by path")

    @staticmethod
    def release(file_object: Any) -> None:  # whatever a transport keeps open: a FileObject, a local eventfd
        file_object.release()

    # -- ioctl -----------------------------------------------------------
    def ioctl(self, file_object: object, cmd: int, arg: IoctlArg) -> int:
        """The result the client's ioctl() returns: >= 0, or -errno."""
        kind, table, rest = _ROUTES[type(file_object)]
        sink = self._sink
        started = time.time() if sink is not None else 0.0
        try:
            handler = table.get(cmd)
            result = handler(file_object, arg) if handler is not None else rest(file_object, cmd, arg)
        except RetryRequest:
            raise
        except VfioError as e:
            log.info("pid %s: %s on %r: %s", getattr(arg.caller, "pid", "?"), _name(kind, cmd), file_object, e.strerror)
            result = -e.errno
        except Exception:
            log.exception("pid %s: %s on %r failed inside the server", getattr(arg.caller, "pid", "?"),
                          _name(kind, cmd), file_object)
            result = -errno.EIO
        if sink is not None:
            self._trace(sink, started, kind, file_object, cmd, arg, result)
        return result

    # -- read / write ----------------------------------------------------
    @staticmethod
    def read(file_object: object, size: int, offset: int) -> bytes:
        op = getattr(file_object, "read", None)
        if op is None:
            raise VfioError(errno.EINVAL, f"{file_object!r} cannot be read")
        return op(size, offset)

    @staticmethod
    def write(file_object: object, data: bytes, offset: int) -> int:
        op = getattr(file_object, "write", None)
        if op is None:
            raise VfioError(errno.EINVAL, f"{file_object!r} cannot be written")
        return op(data, offset)

    @staticmethod
    def _trace(sink, started, kind, file_object, cmd, arg, result) -> None:
        in_data = bytes(arg.copied_in) if arg.copied_in else arg.value
        out_data = bytes(arg.copied_out) if arg.copied_out else None
        record = decode(kind, cmd, in_data, out_data, result)
        record.update(time=started, pid=getattr(arg.caller, "pid", None), node=_node_name(file_object))
        try:
            sink(record)
        except Exception:
            log.exception("trace sink failed; tracing stays on")


def _name(kind: NodeKind, cmd: int) -> str:
    from ..uapi import ioctl_name

    return ioctl_name(kind, cmd) or f"ioctl 0x{cmd:x}"


def _node_name(file_object: FileObject) -> str:
    if isinstance(file_object, Container):
        return "vfio"
    if isinstance(file_object, Group):
        return str(file_object.id)
    return f"device {file_object.device.name}"
