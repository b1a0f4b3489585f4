"""The topology keys of ``model = "nvme"``, checked: each wrong value is a ValueError naming the key and the fix."""

from __future__ import annotations

import hashlib
import uuid
from typing import List, Optional, Tuple

from .inject import Injector
from .storage import Backing, Namespace, carve_namespaces, parse_size

LBA_FORMATS = [512, 4096]


def _text(value, name: str, width: int) -> str:
    if not isinstance(value, str) or not value or len(value) > width or not value.isascii() \
            or not value.isprintable():
        raise ValueError(f"{name} must be 1 to {width} printable ASCII characters, not {value!r}")
    return value


def _int(value, name: str, low: int, high: int, choices=None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high or \
            (choices is not None and value not in choices):
        allowed = " or ".join(map(str, choices)) if choices else f"a whole number from {low} to {high}"
        raise ValueError(f"{name} must be {allowed}, not {value!r}")
    return value


def namespace_ids(serial: str, nsid: int) -> Tuple[bytes, bytes, bytes]:
    """UUID, NGUID and EUI-64 of a namespace: the same for the same serial, distinct per namespace."""
    ns_uuid = uuid.uuid5(uuid.NAMESPACE_URL, f"cuse-vfio:nvme:{serial}:{nsid}")
    digest = hashlib.sha256(ns_uuid.bytes).digest()
    return ns_uuid.bytes, digest[:16], bytes([0x52, 0x54, 0x00]) + digest[16:21]


class ControllerOptions:
    """What a topology entry asks of one controller (see the package docstring for each key)."""

    def __init__(self, name: str, *, backing: Optional[str] = None, size=None, lba_size: int = 512,
                 namespaces: int = 1, serial: Optional[str] = None, model_name: str = "QEMU NVMe Ctrl",
                 max_queues: int = 64, mdts: int = 7, inject=None, io_thread: Optional[bool] = None,
                 ready_delay: float = 0.001):
        self.lba_size = _int(lba_size, "lba_size", 512, 4096, LBA_FORMATS)
        self.namespaces = _int(namespaces, "namespaces", 1, 256)
        self.max_queues = _int(max_queues, "max_queues", 1, 1024)
        self.mdts = _int(mdts, "mdts", 0, 15)
        if serial is None:  # derived from the device name (the BDF), so two controllers never share one
            serial = ("CUSEVFIO" + "".join(c for c in name if c.isalnum()).upper()[-12:])[:20]
        self.serial = _text(serial, "serial", 20)
        self.model_name = _text(model_name, "model_name", 40)
        if isinstance(ready_delay, bool) or not isinstance(ready_delay, (int, float)) or not 0 <= ready_delay <= 10:
            raise ValueError(f"ready_delay must be seconds from 0 to 10, not {ready_delay!r}")
        self.ready_delay = float(ready_delay)
        if io_thread is not None and not isinstance(io_thread, bool):
            raise ValueError(f"io_thread must be true or false, not {io_thread!r}")
        self.io_thread = io_thread
        if backing is not None and (not isinstance(backing, str) or not backing):
            raise ValueError(f"backing must be the path of a file, not {backing!r}")
        self.backing = backing
        self.size = None if size is None else parse_size(size)
        if self.size is not None and self.size % (self.namespaces * self.lba_size):
            per = f" for each of {self.namespaces} namespaces" if self.namespaces > 1 else ""
            raise ValueError(f"size {size!r} ({self.size} bytes) is not a whole number of "
                             f"{self.lba_size}-byte LBAs{per}")
        self.injector = Injector(inject)

    def open_storage(self) -> Tuple[Backing, List[Namespace]]:
        """The backing file (opened or created) and the namespaces carved from it."""
        backing = Backing(self.backing, self.size)
        try:
            return backing, carve_namespaces(backing, self.namespaces, self.lba_size,
                                             lambda nsid: namespace_ids(self.serial, nsid))
        except ValueError:
            backing.close()
            raise
