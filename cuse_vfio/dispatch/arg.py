"""The ioctl argument: copy-in and copy-out with the kernel's rules, written once.

Every handler reads its argument through an ``IoctlArg`` as the kernel reads
``unsigned long arg`` with copy_from_user: ``minsz`` bytes first (EFAULT when
they are not there), then the ``argsz`` check, then whatever trails.  Where
the bytes come from is the memory's business: process_vm_readv on the FUSE
transport, the CUSE retry protocol, a bytearray in tests.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from typing import Optional, Type, TypeVar

from ..errors import VfioError
from ..memory import PAGE_SIZE

T = TypeVar("T", bound=ctypes.Structure)

_INT = struct.Struct("<i")


class IoctlArg:
    """One ioctl's argument; implements ``cuse_vfio.core.ops.UserArg``."""

    __slots__ = ("value", "caller", "memory", "copied_in", "copied_out")

    def __init__(self, value: int, caller, memory=None, record: bool = False):
        self.value = value
        self.caller = caller
        self.memory = memory if memory is not None else caller.memory
        #: with ``record``: the bytes copied in and out, for the trace
        self.copied_in: Optional[bytearray] = bytearray() if record else None
        self.copied_out: Optional[bytearray] = bytearray() if record else None

    def read(self, offset: int, size: int) -> bytes:
        if size == 0:
            return b""
        data = self.memory.read(self.value + offset, size)
        if self.copied_in is not None:
            _record(self.copied_in, offset, data)
        return data

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        self.memory.write(self.value + offset, bytes(data))
        if self.copied_out is not None:
            _record(self.copied_out, offset, data)

    def fetch_struct(self, ctype: Type[T], minsz: int) -> T:
        obj = ctype()
        ctypes.memmove(ctypes.addressof(obj), self.read(0, minsz), minsz)
        argsz = getattr(obj, "argsz", None)
        if argsz is not None and argsz < minsz:
            raise VfioError(errno.EINVAL, f"{ctype.__name__}: argsz {argsz} is smaller than minsz {minsz}")
        return obj

    def fetch_int(self) -> int:
        return _INT.unpack(self.read(0, 4))[0]

    def fetch_string(self, limit: int = PAGE_SIZE) -> str:
        """strndup_user(arg, limit): the NUL must lie within ``limit`` bytes (EINVAL otherwise,
        without touching byte ``limit``); read page by page, so a string ending just before
        an unmapped page works."""
        buf = bytearray()
        addr = self.value
        while len(buf) < limit:
            chunk = min(PAGE_SIZE - (addr % PAGE_SIZE), limit - len(buf))
            data = self.read(addr - self.value, chunk)
            nul = data.find(b"\0")
            if nul >= 0:
                buf += data[:nul]
                return buf.decode("utf-8", "surrogateescape")
            buf += data
            addr += chunk
        raise VfioError(errno.EINVAL, f"string argument longer than {limit - 1} bytes")


def _record(buf: bytearray, offset: int, data: bytes) -> None:
    end = offset + len(data)
    if len(buf) < end:
        buf.extend(bytes(end - len(buf)))
    buf[offset:end] = data
