"""Copies of client memory made on the thread that needs them, watched by a guard thread.

A copy through the copier (:func:`.process.bounded_copy`) is a hand-off to
another thread and back: two context switches, most of what a small copy
costs.  A thread that holds nothing (no lock of the model, nothing any other
request waits for) may instead copy *inline*: the syscall on its own thread
(``cv_inline_copy`` in csrc/copier.c).  A client's page can still stall such
a copy for as long as the client likes (a userfaultfd page, a file on a FUSE
mount), so a guard thread samples the copy in flight every ``GUARD_PERIOD``;
one it finds running across a whole period is declared stalled, charged to
its process like a stalled copier copy, and its owner's ``on_stall`` is
called on the guard thread, which can then have another thread take over
what the stalled one was doing.  The stalled copy itself returns whenever
the kernel lets it, with ``STALLED`` added to its result.

One inline copy runs at a time in the process, and none while any copy is
stalled: those calls get ``-ENOKEY`` and go through the copier instead.
"""

from __future__ import annotations

import errno
import itertools
import logging
import threading
from typing import Callable, Dict

from ._copier import ffi as _ffi
from ._copier import lib as _copier
from .process import STALL_CHECK

log = logging.getLogger(__name__)

#: the guard samples every GUARD_PERIOD: a copy is declared stalled after one to two periods
GUARD_PERIOD = STALL_CHECK / 2
#: added to the result (bytes moved or -errno) of a copy that was declared stalled while it ran
STALLED = _copier.CV_INLINE_STALLED
#: the result of a copy that was not made (another runs, or one is stalled): use the copier
NOT_MADE = -errno.ENOKEY

READ = _copier.CV_COPY_READV
WRITE = _copier.CV_COPY_WRITEV

_owners: Dict[int, Callable[[], None]] = {}
_ids = itertools.count(1)
_lock = threading.Lock()
_guard: "threading.Thread | None" = None


def watch(on_stall: Callable[[], None]) -> int:
    """An owner id for :func:`copy`; ``on_stall()`` runs on the guard thread when a copy made
    with it is declared stalled.  The guard starts with the first owner and lasts the process."""
    global _guard
    with _lock:
        owner = next(_ids)
        _owners[owner] = on_stall
        if _guard is None:
            _guard = threading.Thread(target=_watch, name="cuse-vfio-copy-guard", daemon=True)
            _guard.start()
    return owner


def unwatch(owner: int) -> None:
    with _lock:
        _owners.pop(owner, None)


def copy(op: int, pid: int, remote: int, local, size: int, owner: int) -> int:
    """``size`` bytes at ``remote`` in thread ``pid``'s process, to or from ``local`` (a writable
    buffer for a read): the bytes moved or -errno, plus ``STALLED`` if it was declared stalled;
    ``NOT_MADE`` when it could not be made inline."""
    return _copier.cv_inline_copy(op, pid, remote, _ffi.from_buffer(local), size, owner)


def _watch() -> None:
    period_ms = max(1, int(GUARD_PERIOD * 1000))
    while True:
        owner = _copier.cv_guard_watch(period_ms)
        with _lock:
            on_stall = _owners.get(owner)
        if on_stall is None:
            continue  # its owner is gone: the copy ends on its own, nobody waits for it
        try:
            on_stall()
        except Exception:
            log.exception("taking over from a stalled copy failed")
