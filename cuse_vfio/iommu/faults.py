"""The IOMMU fault log: every DMA the emulated IOMMU refused, as it happened.

A real IOMMU reports a blocked DMA through its fault registers and the kernel
prints a line ("DMAR: [DMA Write] Request device [00:02.0] fault addr ...");
here each refusal becomes a ``Fault`` record, kept in a bounded log that a
server can show while it runs (``faults()``) or stream to a user
(``subscribe``).  The device model that tried the DMA gets an ``IommuFault``
(``VfioError(EFAULT)`` with a ``reason``), and nothing was transferred.
"""

from __future__ import annotations

import collections
import errno
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Deque, List, NoReturn, Optional

from ..errors import VfioError

log = logging.getLogger(__name__)

# Why a DMA was refused (``Fault.reason``, ``IommuFault.reason``).
#: no mapping covers (part of) the IOVA range
UNMAPPED = "unmapped"
#: the device read a mapping made without VFIO_DMA_MAP_FLAG_READ
READ_NOT_PERMITTED = "read-not-permitted"
#: the device wrote a mapping made without VFIO_DMA_MAP_FLAG_WRITE
WRITE_NOT_PERMITTED = "write-not-permitted"
#: the mapping's vaddr was invalidated (UNMAP_DMA with VFIO_DMA_UNMAP_FLAG_VADDR) and not yet updated
VADDR_INVALIDATED = "vaddr-invalidated"
#: the mapping translated, but the client's own memory at the vaddr refused the access
CLIENT_MEMORY = "client-memory"

#: how many faults a log keeps (the oldest go first); ``FaultLog.total`` counts them all
FAULT_LOG_SIZE = 4096


@dataclass(frozen=True)
class Fault:
    """One refused DMA."""

    time: float
    #: the device that issued it (its BDF), when the model said
    device: Optional[str]
    iova: int
    length: int
    #: "read" (device reads memory) or "write" (device writes memory)
    direction: str
    reason: str
    #: a sentence for a person: which address failed and why
    detail: str = ""

    @property
    def write(self) -> bool:
        return self.direction == "write"

    def __str__(self) -> str:
        who = self.device or "?"
        return (f"{who}: DMA {self.direction} of {self.length} bytes at iova 0x{self.iova:x} "
                f"blocked: {self.reason}" + (f" ({self.detail})" if self.detail else ""))


class IommuFault(VfioError):
    """What a device model gets back from a refused DMA: EFAULT, with the reason."""

    def __init__(self, fault: Fault):
        super().__init__(errno.EFAULT, str(fault))
        self.fault = fault
        self.reason = fault.reason
        self.iova = fault.iova
        self.size = fault.length
        self.write = fault.write
        self.device = fault.device


Subscriber = Callable[[Fault], None]


class FaultLog:
    """A bounded, thread-safe record of faults, readable while DMA goes on."""

    def __init__(self, maxlen: int = FAULT_LOG_SIZE):
        self._lock = threading.Lock()
        self._faults: Deque[Fault] = collections.deque(maxlen=maxlen)
        self._subscribers: List[Subscriber] = []
        #: every fault ever recorded, including those the bound pushed out
        self.total = 0

    def record(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
            self.total += 1
            subscribers = list(self._subscribers)
        log.info("%s", fault)
        # Outside the lock: a subscriber may read the log or be slow.
        for subscriber in subscribers:
            try:
                subscriber(fault)
            except Exception:
                log.exception("fault log subscriber failed; it stays subscribed")
        return fault

    def record_fault(self, *, iova: int, size: int, write: bool, reason: str,
                     device: Optional[str] = None, detail: str = "") -> Fault:
        """Record a fault found outside the IOMMU (DmaPort's bus-master check uses this)."""
        return self.record(Fault(time.time(), device, iova, size, "write" if write else "read", reason, detail))

    def faults(self) -> List[Fault]:
        """A snapshot, oldest first."""
        with self._lock:
            return list(self._faults)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber(fault)`` for every new fault; returns the function that unsubscribes."""
        with self._lock:
            self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            with self._lock:
                if subscriber in self._subscribers:
                    self._subscribers.remove(subscriber)

        return unsubscribe


class FaultLogged:
    """What a DMA space that keeps its faults in ``self.fault_log`` answers: the faults seen before it
    (DmaPort's bus-master check) go in the same log, and a refused DMA is recorded and raised."""

    fault_log: FaultLog

    def record_fault(self, *, iova: int, size: int, write: bool, reason: str,
                     device: Optional[str] = None, detail: str = "") -> Fault:
        return self.fault_log.record_fault(iova=iova, size=size, write=write, reason=reason,
                                           device=device, detail=detail)

    def faults(self) -> List[Fault]:
        return self.fault_log.faults()

    def _fault(self, reason: str, addr: int, size: int, write: bool, device: Optional[str], detail: str) -> NoReturn:
        """Record the refusal of a DMA of ``size`` bytes at ``addr`` and raise it."""
        raise IommuFault(self.fault_log.record_fault(iova=addr, size=size, write=write, reason=reason,
                                                     device=device, detail=detail))
