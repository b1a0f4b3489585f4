"""Where an NVMe model's namespaces keep their blocks: one backing file, cut in equal regions.

Namespace ``n`` (1-based) of ``count`` is the ``n``-th of ``count`` equal
regions of the file, each a whole number of LBAs.  Writes go to the file with
``pwrite`` before the command completes (so a reader of the file sees them),
Flush is ``fdatasync``, a write with FUA (or any write while the volatile
write cache is off) is written with ``RWF_DSYNC``.  Deallocation punches holes
(``FALLOC_FL_PUNCH_HOLE``), so deallocated blocks read as zeros and the file
stays sparse.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import tempfile
import weakref
from typing import List, Optional, Sequence

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

#: the size of the anonymous backing file when the topology gives neither a file nor a size
DEFAULT_SIZE = 1 << 30
_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_ZEROS = bytes(1 << 20)


def parse_size(value, what: str = "size") -> int:
    """``1073741824``, ``"512"``, ``"64K"``, ``"1G"``, ``"2T"`` (binary units) -> bytes."""
    if isinstance(value, bool):
        raise ValueError(f"{what} {value!r} is not a size: use bytes or a string like \"1G\"")
    if isinstance(value, int):
        number, unit = value, ""
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([KMGTkmgt]?)\s*", value)
        if not m:
            raise ValueError(f"{what} {value!r} is not a size: use bytes or a number with K, M, G or T, like \"1G\"")
        number, unit = int(m.group(1)), m.group(2).upper()
    else:
        raise ValueError(f"{what} {value!r} is not a size: use bytes or a string like \"1G\"")
    size = number * _SUFFIXES[unit]
    if size <= 0:
        raise ValueError(f"{what} {value!r} is empty: a namespace needs at least one LBA")
    return size


class Backing:
    """The file behind every namespace of one controller (an fd held until ``close``)."""

    def __init__(self, path: Optional[str], size: Optional[int]):
        self.path = path
        if path is None:
            self.size = DEFAULT_SIZE if size is None else size
            f = tempfile.TemporaryFile(prefix="cuse-vfio-nvme-")
            self.fd = os.dup(f.fileno())
            f.close()
            self.anonymous = True
        else:
            self.anonymous = False
            exists = os.path.exists(path)
            if not exists and size is None:
                raise ValueError(f"backing file {path} does not exist: give size = \"1G\" (or any size) to create it")
            try:
                self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise ValueError(
                    f"backing file {path} cannot be opened for reading and writing: {e.strerror}") from None
            actual = os.fstat(self.fd).st_size
            if size is not None and (not exists or actual == 0):  # (a new file always has a size)
                self.size = size
            elif size is not None and size != actual:
                os.close(self.fd)
                raise ValueError(f"backing file {path} holds {actual} bytes but size says {size}: "
                                 "leave size out to use the file as it is")
            else:
                self.size = actual
            if self.size == 0:
                os.close(self.fd)
                raise ValueError(f"backing file {path} is empty: give size = \"1G\" (or any size)")
        try:
            if os.fstat(self.fd).st_size != self.size:
                os.ftruncate(self.fd, self.size)  # sparse: nothing is allocated
        except OSError as e:
            os.close(self.fd)
            raise ValueError(f"backing file {path or '(anonymous)'} cannot be sized to {self.size} bytes: "
                             f"{e.strerror}") from None
        self._finalizer = weakref.finalize(self, os.close, self.fd)

    def close(self) -> None:
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    # -- the block operations -------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:  # the file was cut short behind our back: missing blocks read as zeros
            data += bytes(length - len(data))
        return data

    def write(self, offset: int, chunks: Sequence[bytes], sync: bool) -> None:
        expected = sum(len(c) for c in chunks)
        done = os.pwritev(self.fd, chunks, offset, os.RWF_DSYNC if sync else 0)
        if done != expected:
            raise OSError(errno.EIO, f"short write: {done} of {expected} bytes")

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def deallocate(self, offset: int, length: int) -> None:
        """Punch a hole (reads return zeros); where holes are not supported, write zeros."""
        if _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
            return
        self._write_zeros(offset, length)

    def zero(self, offset: int, length: int) -> None:
        """Zeros that stay allocated (Write Zeroes without deallocation)."""
        if _fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
            return
        self._write_zeros(offset, length)

    def _write_zeros(self, offset: int, length: int) -> None:
        while length > 0:
            n = min(length, len(_ZEROS))
            done = os.pwrite(self.fd, memoryview(_ZEROS)[:n], offset)
            if done <= 0:
                raise OSError(errno.EIO, "short write of zeros")
            offset += done
            length -= done


class Namespace:
    """One active namespace: ``nlbas`` LBAs of ``lba_size`` bytes at ``base`` in the backing file."""

    __slots__ = ("nsid", "backing", "base", "lba_size", "lba_shift", "nlbas", "uuid", "nguid", "eui64",
                 "bytes_read", "bytes_written", "read_commands", "write_commands", "media_errors")

    def __init__(self, nsid: int, backing: Backing, base: int, lba_size: int, nlbas: int, ids):
        self.nsid = nsid
        self.backing = backing
        self.base = base
        self.lba_size = lba_size
        self.lba_shift = lba_size.bit_length() - 1
        self.nlbas = nlbas
        self.uuid, self.nguid, self.eui64 = ids
        self.bytes_read = self.bytes_written = 0
        self.read_commands = self.write_commands = 0
        self.media_errors = 0

    def offset(self, slba: int) -> int:
        return self.base + (slba << self.lba_shift)


def carve_namespaces(backing: Backing, count: int, lba_size: int, ids_of) -> List[Namespace]:
    """``count`` equal namespaces over the file; the file must be a whole number of LBAs for each."""
    share = backing.size // count
    if backing.size % (count * lba_size):
        where = backing.path or "the anonymous backing file"
        per = f" for each of {count} namespaces" if count > 1 else ""
        raise ValueError(f"{where} is {backing.size} bytes: not a whole number of {lba_size}-byte LBAs{per}")
    return [Namespace(i + 1, backing, i * share, lba_size, share // lba_size, ids_of(i + 1)) for i in range(count)]
