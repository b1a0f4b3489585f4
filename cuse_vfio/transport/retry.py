"""The CUSE unrestricted-ioctl retry protocol, planned from what the handler reads.

A CUSE server never touches its caller's memory: the kernel sends each
ioctl first with nothing (in = out = 0); the server answers "retry" with the
caller-address ranges to copy in and the ranges it may copy out, and the
kernel sends the same ioctl again with those bytes.  A fault while copying
in fails the ioctl with EFAULT before the server sees it, as copy_from_user
would.

No table of argument sizes is kept here (that rule lives in dispatch): the
handler runs against a ``RetryMemory`` holding the bytes fetched so far, and
its first read that is not there raises ``RetryRequest``.  So the kernel
copies ``minsz`` first (the handler's fetch_struct), then ``argsz`` (the
arg's ``fetch_struct`` reports it through ``cover``), then trailing data,
strings page by page.  Handlers therefore run two or three times; every
VFIO handler reads all of its input before it acts, so only the last run has
effects.  Each range is declared both ways: the kernel then copies back the
bytes up to the last one the handler wrote (what the caller had, overlaid
with what was written), so a copy-out never exceeds ``argsz``.
"""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass, field
from typing import List, NoReturn, Optional, Tuple, Type, TypeVar

from ..dispatch import IoctlArg, RetryRequest
from ..errors import VfioError

# the kernel's limits of a retry, as csrc/shim.h states them for cv_reply_ioctl_retry:
# FUSE_IOCTL_MAX_IOV in and out iovecs together, 128 KiB per direction (CUSE never raises max_pages)
from .shim import MAX_BYTES, MAX_IOV

T = TypeVar("T", bound=ctypes.Structure)


Range = Tuple[int, int]  # (address, length)


def _merge(ranges: List[Range]) -> List[Range]:
    out: List[Range] = []
    for start, length in sorted(r for r in ranges if r[1] > 0):
        if out and start <= out[-1][0] + out[-1][1]:
            prev_start, prev_len = out[-1]
            out[-1] = (prev_start, max(prev_start + prev_len, start + length) - prev_start)
        else:
            out.append((start, length))
    return out


@dataclass
class RetryState:
    """What one in-flight ioctl asked the kernel for, kept between its retries."""

    fh: int
    cmd: int
    arg: int
    ranges: List[Range] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(length for _, length in self.ranges)

    def matches(self, fh: int, cmd: int, arg: int, in_size: int, out_size: int) -> bool:
        return (self.fh, self.cmd, self.arg) == (fh, cmd, arg) and in_size == out_size == self.size


class RetryMemory:
    """The caller's memory as far as the kernel copied it in; implements AddressSpace for the arg."""

    def __init__(self, pid: int, ranges: List[Range], data: bytes):
        self.pid = pid
        self.ranges = list(ranges)
        self._data = bytearray(data)
        if len(self._data) != sum(length for _, length in self.ranges):
            raise VfioError(errno.EIO, f"pid {pid}: the kernel sent {len(data)} bytes for ranges {self.ranges}")
        self._wanted: List[Range] = []
        #: end (in the concatenation of ranges) of the last byte written
        self._written_end = 0

    def _locate(self, addr: int, size: int) -> Optional[int]:
        """Offset of [addr, addr + size) in the fetched data, or None when not fetched in one range."""
        pos = 0
        for start, length in self.ranges:
            if start <= addr and addr + size <= start + length:
                return pos + addr - start
            pos += length
        return None

    def _want(self, addr: int, size: int) -> NoReturn:
        if addr < 0 or addr + size > 1 << 64:
            raise VfioError(errno.EFAULT, f"pid {self.pid}: 0x{addr:x} is not a user address")
        self._wanted.append((addr, size))
        raise RetryRequest(addr, size)

    def read(self, addr: int, size: int) -> bytes:
        pos = self._locate(addr, size)
        if pos is None:
            self._want(addr, size)
        return bytes(self._data[pos:pos + size])

    def write(self, addr: int, data: bytes) -> None:
        pos = self._locate(addr, len(data))
        if pos is None:
            self._want(addr, len(data))
        self._data[pos:pos + len(data)] = data
        self._written_end = max(self._written_end, pos + len(data))

    def cover(self, addr: int, size: int) -> None:
        """Make [addr, addr + size) part of the exchange (an argsz): copied in and allowed out."""
        size = min(size, MAX_BYTES)
        if self._locate(addr, size) is None:
            self._want(addr, size)

    @property
    def incomplete(self) -> bool:
        """The handler asked for bytes that were not fetched: whatever it returned, this run is void.

        Checked besides catching RetryRequest, because a layer that turns
        every unexpected exception into EIO would otherwise swallow it.
        """
        return bool(self._wanted)

    def next_ranges(self) -> List[Range]:
        """The ranges of the next retry: everything so far plus what the handler asked for."""
        ranges = _merge(self.ranges + self._wanted)
        if 2 * len(ranges) > MAX_IOV or sum(length for _, length in ranges) > MAX_BYTES:
            # The kernel would refuse such a retry with ENOMEM; say it first.
            raise VfioError(errno.ENOMEM, f"pid {self.pid}: the ioctl argument needs more than "
                                          f"{MAX_BYTES // 1024} KiB or {MAX_IOV // 2} pieces of memory, "
                                          "more than CUSE can copy: use --transport fuse")
        return ranges

    def out_data(self) -> bytes:
        """The bytes to copy back: every declared range up to the last byte written."""
        return bytes(self._data[:self._written_end])


class CuseIoctlArg(IoctlArg):
    """An IoctlArg that tells its RetryMemory the argsz, so the whole struct is exchanged before any effect."""

    __slots__ = ()

    def fetch_struct(self, ctype: Type[T], minsz: int) -> T:
        obj = super().fetch_struct(ctype, minsz)
        argsz = getattr(obj, "argsz", None)
        if argsz is not None and argsz > minsz:
            # The kernel touches only what it copies: a struct without a capability
            # chain never more than the struct itself (GROUP_GET_STATUS with argsz
            # 4096 copies 8 bytes, so a buffer at the end of the stack is fine);
            # one with a chain (cap_offset) may write its capabilities up to argsz.
            has_caps = any(field[0] == "cap_offset" for field in ctype._fields_)
            reach = argsz if has_caps else min(argsz, ctypes.sizeof(ctype))
            if reach > minsz:
                self.memory.cover(self.value, reach)
        return obj
