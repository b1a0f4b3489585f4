"""The handle table: every open of one of our files, as the kernel's ``struct file`` holds ``private_data``.

A handle is created by an OPEN reply (its ``fh`` is what the kernel sends
back with every later request on that open) and ends with RELEASE.  What a
pread and a pwrite of the open reach is bound when it is made (the
dispatcher's ``region_ops``): no request finds a handle whose file was
released, so the ops bound then stay right for as long as it exists.  A
request running on a worker holds its handle busy, as ``fdget`` holds a
file: a RELEASE that overtakes it is answered at once and carried out when
the last such request ends.
"""

from __future__ import annotations

import itertools
import threading
from typing import Callable, Dict, Optional

from ..dispatch import node_kind, region_ops
from ..uapi.ioctls import NodeKind


class Handle:
    """One open of one of our files."""

    __slots__ = ("fh", "file_object", "kind", "read", "write", "session", "ino", "busy", "released")

    def __init__(self, fh: int, file_object: object, session, ino: int = 0):
        self.fh = fh
        self.file_object = file_object
        self.kind = node_kind(file_object)
        #: ``read(size, offset) -> bytes`` and ``write(data, offset) -> count``: a pread's and a pwrite's op
        self.read, self.write = region_ops(file_object)
        self.session = session
        self.ino = ino
        self.busy = 0          # requests running on workers, like fdget references
        self.released = False  # RELEASE arrived


def release_order(handle: Handle) -> int:
    # Device fds first, then groups, then containers: the order that never
    # leaves a group waiting on a device fd.
    return {NodeKind.DEVICE: 0, NodeKind.GROUP: 1, NodeKind.CONTAINER: 2}[handle.kind]


class HandleTable:
    """fh -> Handle; ``release_file(handle)`` is what ending an open does (the dispatcher's release)."""

    def __init__(self, release_file: Callable[[Handle], None]):
        self._release_file = release_file
        self._lock = threading.Lock()
        self._handles: Dict[int, Handle] = {}
        self._fhs = itertools.count(1)
        #: fh -> Handle or None: the dict's own get (a lookup per request; no lock, as before)
        self.get: Callable[[int], Optional[Handle]] = self._handles.get

    def __len__(self) -> int:
        with self._lock:
            return len(self._handles)

    def new(self, file_object: object, session, ino: int = 0) -> Handle:
        with self._lock:
            handle = Handle(next(self._fhs), file_object, session, ino)
            self._handles[handle.fh] = handle
        return handle

    def hold(self, handle: Handle) -> None:
        """A request on ``handle`` goes to a worker (fdget)."""
        with self._lock:
            handle.busy += 1

    def unhold(self, handle: Handle) -> None:
        """That request ended (fdput): a RELEASE that came meanwhile is carried out now."""
        with self._lock:
            handle.busy -= 1
            last = handle.released and handle.busy == 0
        if last:
            self._release_file(handle)

    def release(self, fh: int) -> None:
        """RELEASE of ``fh``: the open ends now, or when its last request in flight does."""
        with self._lock:
            handle = self._handles.pop(fh, None)
            if handle is not None:
                handle.released = True
                busy = handle.busy
        if handle is not None and not busy:
            self._release_file(handle)

    def release_all(self) -> None:
        """Whatever clients still hold is gone: release it like their exit would."""
        with self._lock:
            handles = sorted(self._handles.values(), key=release_order)
            self._handles.clear()
        for handle in handles:
            self._release_file(handle)
