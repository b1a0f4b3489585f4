"""Config space as the hardware holds it: bytes with per-bit write masks, and walking its capability list."""

from __future__ import annotations

from typing import Callable, Dict, List

from .regs import PCI_CAP_LIST_ID, PCI_CAP_LIST_NEXT, PCI_CAPABILITY_LIST, PCI_STATUS, PCI_STATUS_CAP_LIST


# -- config space --------------------------------------------------------------
class ConfigSpace:
    """Bytes with per-bit write masks: what a config read or write does in hardware.

    ``wmask`` bits take the written value, ``w1cmask`` bits clear when written
    with 1 (RW1C), every other bit is read-only.  Hooks run after a write that
    touches their range, for registers with side effects.
    """

    def __init__(self, size: int):
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)
        #: the power-on value of every byte (what a reset gives back to software-changeable bits)
        self.default = bytearray(size)
        self._hooks: List[tuple] = []

    def init(self, offset: int, size: int, value: int, wmask: int = 0, w1c: int = 0) -> None:
        """Set a register's power-on value and which of its bits software may change."""
        self.data[offset:offset + size] = value.to_bytes(size, "little")
        self.default[offset:offset + size] = value.to_bytes(size, "little")
        self.wmask[offset:offset + size] = wmask.to_bytes(size, "little")
        self.w1cmask[offset:offset + size] = w1c.to_bytes(size, "little")

    def set(self, offset: int, size: int, value: int) -> None:
        """The device updating its own register: no masks, no hooks."""
        self.data[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def reset(self) -> None:
        """A function reset: every bit software can change returns to its power-on value.

        Read-only bits the device maintains itself (the interrupt status bit,
        pending bits) are the device's to clear.
        """
        for o in range(self.size):
            soft = self.wmask[o] | self.w1cmask[o]
            if soft:
                self.data[o] = (self.data[o] & ~soft) | (self.default[o] & soft)

    def on_write(self, offset: int, size: int, hook: Callable[[int, int], None]) -> None:
        self._hooks.append((offset, offset + size, hook))

    def read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > self.size:
            return (1 << (8 * size)) - 1  # beyond the function's config space: all ones
        return self.get(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > self.size:
            return
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            o = offset + i
            new = (self.data[o] & ~self.wmask[o]) | (byte & self.wmask[o])
            self.data[o] = new & ~(byte & self.w1cmask[o]) & 0xFF
        for start, end, hook in self._hooks:
            if offset < end and start < offset + size:
                hook(offset, size)



def capability_offsets(config_read: Callable[[int, int], int]) -> Dict[int, int]:
    """Walk a standard capability list through ``config_read``: {offset: cap id}, in list order."""
    found: Dict[int, int] = {}
    if not config_read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST:
        return found
    pos = config_read(PCI_CAPABILITY_LIST, 1) & ~3
    while pos and pos not in found and len(found) < 48:
        found[pos] = config_read(pos + PCI_CAP_LIST_ID, 1)
        pos = config_read(pos + PCI_CAP_LIST_NEXT, 1) & ~3
    return found
