"""The in-process transport: a simulated client process talking to a Dispatcher.

It has what a real client has (an fd table, memory at addresses, eventfds)
without any kernel object, so every VFIO rule can be exercised from Python
exactly as a C client would: ``open``, ``ioctl`` with a pointer, ``pread``.
Used by the tests and by ``cuse-vfio demo --in-process``.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import itertools
import os
from typing import Dict, List, Optional, Union

from ..dispatch import Dispatcher, Node
from ..errors import VfioError
from ..memory import PAGE_SIZE

_pids = itertools.count(1000)


class LocalMemory:
    """A sparse address space: page-aligned areas, EFAULT everywhere else."""

    def __init__(self, pid: int, base: int = 0x7F0000000000):
        self.pid = pid
        self._next = base
        self._starts: List[int] = []
        self._areas: Dict[int, bytearray] = {}
        self._writable: Dict[int, bool] = {}

    def alloc(self, size: int, writable: bool = True, align: int = PAGE_SIZE) -> int:
        """Map ``size`` zeroed bytes (rounded to pages) and return their address."""
        size = max(PAGE_SIZE, -(-size // PAGE_SIZE) * PAGE_SIZE)
        addr = -(-self._next // align) * align
        self._next = addr + size + PAGE_SIZE  # a guard page between areas
        bisect.insort(self._starts, addr)
        self._areas[addr] = bytearray(size)
        self._writable[addr] = writable
        return addr

    def protect(self, addr: int, writable: bool) -> None:
        """mprotect of a whole area: make it read-only or writable again."""
        self._writable[addr] = writable

    def free(self, addr: int) -> None:
        self._starts.remove(addr)
        del self._areas[addr]
        del self._writable[addr]

    def _locate(self, addr: int, size: int, write: bool):
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            start = self._starts[i]
            area = self._areas[start]
            if addr + size <= start + len(area) and (self._writable[start] or not write):
                return area, addr - start
        raise VfioError(errno.EFAULT, f"pid {self.pid}: {size} bytes at 0x{addr:x} are not mapped"
                        + (" writable" if write else ""))

    def probe(self, addr: int, size: int, write: bool) -> None:
        """What pinning checks: every byte mapped, and writable when ``write`` (EFAULT otherwise)."""
        self._locate(addr, size, write)

    def read(self, addr: int, size: int) -> bytes:
        area, off = self._locate(addr, size, False)
        return bytes(area[off:off + size])

    def write(self, addr: int, data: bytes) -> None:
        area, off = self._locate(addr, len(data), True)
        area[off:off + len(data)] = data


class LocalEventfd:
    """An eventfd of the simulated client: a counter that interrupts add to."""

    def __init__(self):
        self.count = 0

    def signal(self, value: int = 1) -> None:
        self.count += value

    def read(self) -> int:
        value, self.count = self.count, 0
        return value

    def release(self) -> None:
        pass


class LocalProcess:
    """A client process: ``open``/``ioctl``/``pread``/``pwrite``/``close`` like libc, raising OSError."""

    def __init__(self, dispatcher: Dispatcher, pid: Optional[int] = None):
        self.dispatcher = dispatcher
        self.pid = pid if pid is not None else next(_pids)
        self.memory = LocalMemory(self.pid)
        self.fds: Dict[int, object] = {}

    # -- what the server asks of a caller (core.ops.Caller) --------------
    def resolve_fd(self, fd: int) -> object:
        try:
            return self.fds[fd]
        except KeyError:
            raise VfioError(errno.EBADF, f"pid {self.pid} has no fd {fd}") from None

    def install_fd(self, file_object: object) -> int:
        fd = next(n for n in itertools.count(3) if n not in self.fds)
        self.fds[fd] = file_object
        return fd

    def get_eventfd(self, fd: int) -> LocalEventfd:
        obj = self.resolve_fd(fd)
        if not isinstance(obj, LocalEventfd):
            raise VfioError(errno.EINVAL, f"fd {fd} is not an eventfd")
        return obj

    # -- what a client does ----------------------------------------------
    def open(self, path: str) -> int:
        name = os.path.basename(path)
        node = Node.container() if name == "vfio" else Node.group(int(name.rpartition("-")[2]))
        try:
            return self.install_fd(self.dispatcher.open(node, self))
        except VfioError as e:
            raise OSError(e.errno, e.strerror, path) from None

    def eventfd(self) -> int:
        return self.install_fd(LocalEventfd())

    def close(self, fd: int) -> None:
        obj = self.fds.pop(fd, None)
        if obj is None:
            raise OSError(errno.EBADF, "bad file descriptor")
        self.dispatcher.release(obj)

    def exit(self) -> None:
        """The process dies: every fd is closed, in fd order as the kernel's exit does."""
        for fd in sorted(self.fds):
            self.close(fd)

    def ioctl(self, fd: int, cmd: int, arg: Union[int, ctypes.Structure, bytes, bytearray] = 0) -> int:
        """ioctl(fd, cmd, arg): an int is passed as is; a struct or bytes is copied into this
        process's memory, passed by pointer, and copied back (a struct is updated in place)."""
        obj = self.resolve_fd_os(fd)
        if isinstance(arg, int):
            return self._check(self.dispatcher.ioctl(obj, cmd, self.dispatcher.make_arg(arg, self)))
        data = bytes(arg)
        addr = self.memory.alloc(len(data))
        try:
            self.memory.write(addr, data)
            result = self.dispatcher.ioctl(obj, cmd, self.dispatcher.make_arg(addr, self))
            back = self.memory.read(addr, len(data))
            if isinstance(arg, ctypes.Structure):
                ctypes.memmove(ctypes.addressof(arg), back, len(data))
            elif isinstance(arg, bytearray):
                arg[:] = back
        finally:
            self.memory.free(addr)
        return self._check(result)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        try:
            return self.dispatcher.read(self.resolve_fd_os(fd), size, offset)
        except VfioError as e:
            raise OSError(e.errno, e.strerror) from None

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        try:
            return self.dispatcher.write(self.resolve_fd_os(fd), data, offset)
        except VfioError as e:
            raise OSError(e.errno, e.strerror) from None

    def resolve_fd_os(self, fd: int) -> object:
        try:
            return self.resolve_fd(fd)
        except VfioError as e:
            raise OSError(e.errno, e.strerror) from None

    @staticmethod
    def _check(result: int) -> int:
        if result < 0:
            raise OSError(-result, os.strerror(-result))
        return result
