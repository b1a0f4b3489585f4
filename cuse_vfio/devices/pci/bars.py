"""BARs and the expansion ROM: register BARs (MMIO, I/O), plain memory in a sealed memfd, ROM images."""

from __future__ import annotations

import fcntl
import mmap
import os
import weakref
from typing import Callable, Optional

from .regs import PCI_BASE_ADDRESS_MEM_PREFETCH, PCI_BASE_ADDRESS_MEM_TYPE_64, PCI_BASE_ADDRESS_SPACE_IO


# -- BARs ------------------------------------------------------------------------
class Bar:
    """One base address register's resource: its size, its type, and what accesses do."""

    io = False
    #: a BAR of plain memory may be mapped by the client (the whole BAR, VFIO_REGION_INFO_FLAG_MMAP)
    mmappable = False

    def __init__(self, size: int, *, bits64: bool = False, prefetchable: bool = False):
        if size & (size - 1) or size < (4 if self.io else 16):
            raise ValueError(f"BAR size {size:#x} is not a power of two of at least {4 if self.io else 16}")
        self.size = size
        self.bits64 = bits64 and not self.io
        self.prefetchable = prefetchable and not self.io
        #: the address the host's enumeration gave it (0 = unassigned)
        self.address = 0

    def type_bits(self) -> int:
        if self.io:
            return PCI_BASE_ADDRESS_SPACE_IO
        return (PCI_BASE_ADDRESS_MEM_TYPE_64 if self.bits64 else 0) | (
            PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetchable else 0)

    def read(self, offset: int, size: int) -> int:
        raise NotImplementedError

    def write(self, offset: int, size: int, value: int) -> None:
        raise NotImplementedError


class MmioBar(Bar):
    """Memory-space registers: ``read(offset, size) -> int``, ``write(offset, size, value)``."""

    def __init__(self, size: int, read: Callable[[int, int], int], write: Callable[[int, int, int], None],
                 **kwargs):
        super().__init__(size, **kwargs)
        self._read = read
        self._write = write

    def read(self, offset: int, size: int) -> int:
        return self._read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._write(offset, size, value)


class IoBar(MmioBar):
    """I/O-space registers (never 64-bit, never prefetchable, never mmapped)."""

    io = True


class _MemoryFd:
    """The fd a kind of BAR memory owns: closed with the object even when nobody calls close()."""

    _fd: int

    def _own(self, fd: int) -> None:
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    def fileno(self) -> int:
        if not self._finalizer.alive:
            raise ValueError("shared memory is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive


class SharedMemory(_MemoryFd):
    """Bytes in a memfd, mapped here: memory a transport can hand to a client to map.

    ``fileno()`` is the memfd (send it over a Unix socket; the client maps it
    ``MAP_SHARED``), ``view`` is this process's writable mapping of the same
    pages, so a store by either side is seen by the other.  ``close()`` drops
    this side's mapping and fd (a client's mapping lives on).
    """

    def __init__(self, size: int, name: str = "cuse-vfio"):
        if size <= 0:
            raise ValueError("shared memory needs at least one byte")
        self.size = size
        self._fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self._fd, size)
            # A client gets this very memfd: sealed, it can neither shrink it
            # under our mapping (a SIGBUS in the server) nor grow it.
            fcntl.fcntl(self._fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(self._fd)
            raise
        self.view = memoryview(self._map)
        self._own(self._fd)

    def close(self) -> None:
        if self.closed:
            return
        self.view.release()
        try:
            self._map.close()
        except BufferError:
            pass  # a slice of the view is still held somewhere: the mapping goes with it
        self._finalizer()


class RamBar(Bar):
    """Plain memory: reads return what was written.  Offered for mmap.

    The bytes live in a memfd (:class:`SharedMemory`): vfio-pci offers the BAR
    for mmap (VFIO_REGION_INFO_FLAG_MMAP) and hands ``memory`` to a transport, which
    passes the fd to the client; the client's stores through its mapping and
    the model's through ``backing`` are the same memory.  ``on_write(offset,
    size)`` (optional) is told after a write through the device fd; writes
    through an mmap are not seen, as on hardware.
    """

    mmappable = True

    def __init__(self, size: int, *, on_write: Optional[Callable[[int, int], None]] = None, **kwargs):
        super().__init__(size, **kwargs)
        self.memory = SharedMemory(size, "cuse-vfio-bar")
        #: the model's view of the BAR's bytes (writable, ``size`` long)
        self.backing = self.memory.view
        self._on_write = on_write

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.backing[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.backing[offset:offset + size] = value.to_bytes(size, "little")
        if self._on_write is not None:
            self._on_write(offset, size)

    def renew_memory(self) -> None:
        """Move the bytes into a fresh memfd and let go of this side of the old one.

        Every mapping a client took of the old memfd stays on pages nothing
        else sees any more: the model, and whoever maps the BAR next, use the
        new memory.  vfio-pci calls it at the device's last close, since here
        (unlike in Linux, where a mapping holds the device file open) a
        mapping can outlive the open it came from.
        """
        old = self.memory
        new = SharedMemory(self.size, "cuse-vfio-bar")
        new.view[:] = old.view
        self.memory = new
        self.backing = new.view
        old.close()

    def close(self) -> None:
        self.memory.close()


class FileMemory(_MemoryFd):
    """A file's bytes shared with every process that maps the file: memory a transport can hand out.

    Unlike :class:`SharedMemory`, this process never maps it: a regular file
    cannot be sealed, and a client holding its fd could truncate it under a
    mapping of ours (a SIGBUS in the server).  The server's own accesses are
    ``pread``/``pwrite`` on the fd instead; past a truncated end they read
    zeros and write nothing.  ``server_maps`` tells a transport that the fd it
    hands out need not be sealed.
    """

    server_maps = False

    def __init__(self, path: str, size: int):
        self.path = path
        self.size = size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)  # as QEMU's memory-backend-file grows a new or short file
        except OSError:
            os.close(fd)
            raise
        self._own(fd)

    def read(self, offset: int, size: int) -> bytes:
        data = os.pread(self._fd, size, offset)
        return data + bytes(size - len(data))

    def write(self, offset: int, data: bytes) -> None:
        os.pwrite(self._fd, data, offset)

    def close(self) -> None:
        self._finalizer()


class FileRamBar(RamBar):
    """A :class:`RamBar` whose bytes are a file's (:class:`FileMemory`), shared beyond this server.

    Two BARs naming the same file, in this server or another process, are the
    same memory.  At the device's last close the memory is not renewed as a
    memfd BAR's is: it belongs to the file, which anyone with the path reaches.
    """

    # Not a SharedMemory (it has no view): what a transport uses of a RamBar's memory, fileno() and
    # close(), both have; its own read, write and renew_memory replace RamBar's, which use the view.
    memory: FileMemory  # type: ignore[assignment]

    def __init__(self, size: int, path: str, *, on_write: Optional[Callable[[int, int], None]] = None, **kwargs):
        Bar.__init__(self, size, **kwargs)
        self.memory = FileMemory(path, size)
        self._on_write = on_write

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.memory.read(offset, size), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.memory.write(offset, value.to_bytes(size, "little"))
        if self._on_write is not None:
            self._on_write(offset, size)

    def renew_memory(self) -> None:
        pass


class Rom:
    """An expansion ROM image; the BAR is the image rounded up to a power of two (at least 2 KiB)."""

    def __init__(self, image: bytes, size: Optional[int] = None):
        self.image = bytes(image)
        bar = max(2048, 1 << max(0, len(self.image) - 1).bit_length())
        self.size = size if size is not None else bar
        if self.size & (self.size - 1) or self.size < max(2048, len(self.image)):
            raise ValueError(f"ROM BAR size {self.size:#x} must be a power of two >= 2 KiB holding the image")
        self.address = 0

    def read(self, offset: int, size: int) -> int:
        chunk = self.image[offset:offset + size]
        return int.from_bytes(chunk + b"\xff" * (size - len(chunk)), "little")

    def image_size(self) -> int:
        """How much of the BAR a host believes is ROM (``pci_get_rom_size``): 0 when the header is invalid."""
        pos = 0
        while True:
            if self.read(pos, 2) != 0xAA55:
                break
            pcir = pos + self.read(pos + 24, 2)
            if self.read(pcir, 4) != 0x52494350:  # "PCIR"
                break
            last = self.read(pcir + 21, 1) & 0x80
            length = self.read(pcir + 16, 2)
            pos += length * 512
            if pos >= self.size or not length or last:
                break
        return min(pos, self.size)
