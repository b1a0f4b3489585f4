"""Capability chains of the VFIO info ioctls, built and parsed.

An info struct (``vfio_device_info``, ``vfio_region_info``,
``vfio_iommu_type1_info``) may be followed by a chain of capabilities, each
opening with ``vfio_info_cap_header``.  ``next`` and the info's ``cap_offset``
are offsets from the start of the *info buffer*, not from the chain, and the
last capability has ``next`` 0.

When the caller's ``argsz`` leaves no room for the chain the kernel still
succeeds: it sets the CAPS flag, leaves ``cap_offset`` 0 and reports in
``argsz`` the size that would have fit everything, so the caller can retry.
``CapChain.place`` applies exactly that rule.

Linux 6.1 puts each capability at the byte its predecessor ends; since 6.6
(a881b496941f) ``vfio_info_cap_add`` rounds every capability up to 8 bytes.
``CapChain.for_abi(abi)`` gives the layout of the release a server is
(rule CAP_ALIGN); ``CapChain(align=8)`` the newer one directly.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import List, Tuple

from .abi import KernelAbi, Rule
from .structs import vfio_info_cap_header

_HEADER = ctypes.sizeof(vfio_info_cap_header)


#: the alignment of each capability in 6.1's vfio_info_cap_add: none
LINUX_6_1_ALIGN = 1

#: how far each capability of an info chain is rounded up
CAP_ALIGN = Rule(
    "caps.align", LINUX_6_1_ALIGN, since={"6.6": 8},
    why="vfio_info_cap_add rounds each capability's size up to 8 bytes since 'vfio: align capability "
        "structures' (a881b496941f, 6.6), so type1's IOVA range capability moves from 0x44 to 0x48.")


class CapChain:
    """Capabilities in the order they were added (the order the client walks them)."""

    def __init__(self, align: int = LINUX_6_1_ALIGN) -> None:
        if align < 1 or align & (align - 1):
            raise ValueError(f"capability alignment is a power of two, not {align}")
        self.align = align
        self._caps: List[Tuple[int, int, bytes]] = []

    @classmethod
    def for_abi(cls, abi: KernelAbi) -> "CapChain":
        """An empty chain laid out as ``abi``'s kernel lays it out."""
        return cls(align=CAP_ALIGN.of(abi))

    def _size_of(self, body: bytes) -> int:
        return (_HEADER + len(body) + self.align - 1) & ~(self.align - 1)

    def __len__(self) -> int:
        return len(self._caps)

    def add(self, cap_id: int, version: int, body: bytes) -> None:
        """Append a capability; ``body`` is what follows its header."""
        self._caps.append((cap_id, version, bytes(body)))

    def add_struct(self, cap: ctypes.Structure, cap_id: int, version: int, trailing: bytes = b"") -> None:
        """Append a capability struct that opens with a ``header`` field (header filled in here)."""
        self.add(cap_id, version, bytes(cap)[_HEADER:] + trailing)

    def size(self) -> int:
        return sum(self._size_of(body) for _, _, body in self._caps)

    def build(self, base: int) -> bytes:
        """The chain as bytes, to be copied to ``base`` bytes past the start of the info buffer."""
        out = bytearray()
        for i, (cap_id, version, body) in enumerate(self._caps):
            size = self._size_of(body)
            last = i == len(self._caps) - 1
            nxt = 0 if last else base + len(out) + size
            header = vfio_info_cap_header(id=cap_id, version=version, next=nxt)
            out += bytes(header) + body + bytes(size - _HEADER - len(body))
        return bytes(out)

    def place(self, info: ctypes.Structure, caps_flag: int) -> bytes:
        """Fit the chain behind ``info`` (which has argsz, flags and cap_offset).

        Returns the bytes to copy at ``sizeof(info)`` past the argument, or
        b"" when argsz is too small, in which case ``info.argsz`` now says
        how much the caller needs.  ``info`` is updated either way.
        """
        if not self._caps:
            return b""
        info.flags |= caps_flag
        base = ctypes.sizeof(info)
        needed = base + self.size()
        if info.argsz < needed:
            info.argsz = needed
            info.cap_offset = 0
            return b""
        info.cap_offset = base
        return self.build(base)


@dataclass(frozen=True)
class Cap:
    """One capability found in an info buffer: where it is and its bytes after the header."""

    id: int
    version: int
    offset: int
    body: bytes


def parse_caps(buf: bytes, cap_offset: int, limit: int = 64) -> List[Cap]:
    """Walk a chain inside ``buf`` (the whole info buffer) starting at ``cap_offset``.

    Raises ValueError on a chain that points outside the buffer, backwards,
    or loops, since a client would walk into garbage there.
    """
    caps: List[Cap] = []
    offset = cap_offset
    while offset:
        if len(caps) >= limit:
            raise ValueError(f"capability chain longer than {limit} entries (a loop?)")
        if offset + _HEADER > len(buf):
            raise ValueError(f"capability at {offset} lies outside the {len(buf)}-byte buffer")
        header = vfio_info_cap_header.from_buffer_copy(buf, offset)
        end = header.next if header.next else len(buf)
        if header.next and header.next <= offset:
            raise ValueError(f"capability at {offset} points backwards to {header.next}")
        caps.append(Cap(header.id, header.version, offset, bytes(buf[offset + _HEADER:end])))
        offset = header.next
    return caps
