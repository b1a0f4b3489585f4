"""BARs and the expansion ROM: register BARs (MMIO, I/O) with optional windows of memory, plain memory in a
sealed memfd, ROM images."""

from __future__ import annotations

import fcntl
import mmap
import os
import weakref
from typing import Callable, List, Optional, Sequence

from ...memory import PAGE_SIZE
from .regs import PCI_BASE_ADDRESS_MEM_PREFETCH, PCI_BASE_ADDRESS_MEM_TYPE_64, PCI_BASE_ADDRESS_SPACE_IO


# -- BARs ------------------------------------------------------------------------
class Bar:
    """One base address register's resource: its size, its type, and what accesses do."""

    io = False
    #: a BAR of plain memory may be mapped by the client (the whole BAR, VFIO_REGION_INFO_FLAG_MMAP)
    mmappable = False
    #: the register windows served as memory (:meth:`MmioBar.add_window`), by offset
    windows: Sequence["BarWindow"] = ()

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

    def close(self) -> None:
        """The device goes away: let go of the memory this BAR holds, if any."""


class BarWindow:
    """Registers of a :class:`MmioBar` that need no trap, served as memory the model keeps current.

    For reads without side effects and writes the model only needs to see
    when it next acts (IDs, scratch, a configuration structure a driver reads
    often).  The bytes live in the BAR's memfd at the same offset as in the
    BAR: vfio-pci offers the window for mmap (a VFIO_REGION_INFO_CAP_SPARSE_MMAP
    area), and a read or write of it through the device fd is a load or store
    of the same memory, so trapped and mapped accesses agree.  The model
    updates it with :meth:`write` (offsets from the window's start);
    ``on_write(offset, size)`` (optional, offsets in the window) is told after
    a write through the device fd, never after a store through a mapping.
    """

    def __init__(self, bar: "MmioBar", offset: int, size: int,
                 on_write: Optional[Callable[[int, int], None]] = None):
        self.bar = bar
        self.offset = offset
        self.size = size
        self.end = offset + size
        self.on_write = on_write

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` in the window, as a client's mapping sees them now."""
        if offset < 0 or offset + size > self.size:
            raise ValueError(f"0x{offset:x}+0x{size:x} is outside a window of 0x{self.size:x} bytes")
        start = self.offset + offset
        return bytes(self.bar.memory_view()[start:start + size])

    def write(self, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset`` in the window: what every mapping and pread sees from now on."""
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"0x{offset:x}+0x{len(data):x} is outside a window of 0x{self.size:x} bytes")
        start = self.offset + offset
        self.bar.memory_view()[start:start + len(data)] = data

    def __repr__(self) -> str:
        return f"BarWindow(0x{self.offset:x}+0x{self.size:x})"


class MmioBar(Bar):
    """Memory-space registers: ``read(offset, size) -> int``, ``write(offset, size, value)``.

    :meth:`add_window` makes whole pages of it memory instead (:class:`BarWindow`):
    the handlers never see an access there.
    """

    memory: Optional["SharedMemory"] = None

    def __init__(self, size: int, read: Callable[[int, int], int], write: Callable[[int, int, int], None],
                 **kwargs):
        super().__init__(size, **kwargs)
        self._read = read
        self._write = write
        self.windows: List[BarWindow] = []

    def add_window(self, offset: int, size: int, *, on_write: Optional[Callable[[int, int], None]] = None
                   ) -> BarWindow:
        """Serve ``size`` bytes at ``offset`` (whole pages) as memory; returns the window to keep current.

        The memory starts as zeros.  Put nothing there with side effects on
        read or write: a client that maps the window reaches it without the
        model (vfio-pci lists it as a sparse mmap area).
        """
        if self.io:
            raise ValueError("an I/O BAR is never mapped: it cannot have a window")
        if offset % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise ValueError(f"window 0x{offset:x}+0x{size:x} is not whole pages of 0x{PAGE_SIZE:x} bytes")
        if offset < 0 or offset + size > self.size:
            raise ValueError(f"window 0x{offset:x}+0x{size:x} is outside the 0x{self.size:x}-byte BAR")
        for w in self.windows:
            if offset < w.end and w.offset < offset + size:
                raise ValueError(f"window 0x{offset:x}+0x{size:x} overlaps {w!r}")
        if self.memory is None:
            self.memory = SharedMemory(self.size, "cuse-vfio-bar")
        window = BarWindow(self, offset, size, on_write)
        self.windows.append(window)
        self.windows.sort(key=lambda w: w.offset)
        return window

    def memory_view(self) -> memoryview:
        assert self.memory is not None  # made with the first window
        return self.memory.view

    def window_at(self, offset: int, size: int) -> Optional[BarWindow]:
        """The window holding the access ``offset``..``offset + size``, or None."""
        for w in self.windows:
            if w.offset <= offset and offset + size <= w.end:
                return w
        return None

    def read(self, offset: int, size: int) -> int:
        if self.windows and self.window_at(offset, size) is not None:
            return int.from_bytes(self.memory_view()[offset:offset + size], "little")
        return self._read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        window = self.window_at(offset, size) if self.windows else None
        if window is None:
            self._write(offset, size, value)
            return
        self.memory_view()[offset:offset + size] = value.to_bytes(size, "little")
        if window.on_write is not None:
            window.on_write(offset - window.offset, size)

    def renew_memory(self) -> None:
        """The windows move to a fresh memfd with the same bytes (see :meth:`RamBar.renew_memory`)."""
        old = self.memory
        if old is not None:
            self.memory = old.copy()
            old.close()

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()


class IoBar(MmioBar):
    """I/O-space registers (never 64-bit, never prefetchable, never mmapped, no windows)."""

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
        self.name = name
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

    def copy(self) -> "SharedMemory":
        """The same bytes in a fresh memfd (to move to before closing this one: see RamBar.renew_memory)."""
        new = SharedMemory(self.size, self.name)
        new.view[:] = self.view
        return new

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
        self.memory = old.copy()
        self.backing = self.memory.view  # the model's view moves before the old one is released
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
