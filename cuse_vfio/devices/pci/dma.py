"""DMA from a function: the bus-master-checked port to the container's IOMMU, and its fault."""

from __future__ import annotations

import collections
import errno
import logging
from typing import TYPE_CHECKING, Deque, Dict, NoReturn, Optional, Sequence, Tuple

from ...errors import VfioError

if TYPE_CHECKING:
    from ...core.ops import DmaSpace
    from .device import PciDevice

log = logging.getLogger(__name__)

class DmaFault(VfioError):
    """A DMA the device attempted did not happen (nothing was transferred)."""

    def __init__(self, reason: str, iova: int, size: int, write: bool, device: str):
        super().__init__(errno.EIO, f"{device}: DMA {'write' if write else 'read'} of {size} bytes "
                                    f"at iova 0x{iova:x} blocked: {reason}")
        self.reason = reason
        self.iova = iova
        self.size = size
        self.write = write
        self.device = device

# -- DMA -------------------------------------------------------------------------
class DmaPort:
    """The only way a model reaches memory: by IOVA, through the container's IOMMU.

    The DmaSpace itself is never handed to the model: vfio-pci attaches it with
    :meth:`_attach`, and every transfer first checks the function's bus-master
    bit, as a PCI function may not issue requests while it is clear.
    """

    MAX_FAULTS = 256

    def __init__(self, device: "PciDevice"):
        self.__device = device
        self.__space: Optional[DmaSpace] = None
        self.__sink: Optional[object] = None
        #: the faults this function saw, newest last (also reported to the DmaSpace when it keeps a log)
        self.faults: Deque[Dict[str, object]] = collections.deque(maxlen=self.MAX_FAULTS)

    def _attach(self, space) -> None:
        self.__space = space

    def _record_faults_to(self, sink) -> None:
        """Where a fault goes when no DMA space is attached (the container was released):
        the machine's fault log, so such a DMA is in --fault-log like every other fault."""
        self.__sink = sink

    def read(self, iova: int, size: int) -> bytes:
        return self.__transfer(iova, size, None)

    def write(self, iova: int, data: bytes) -> None:
        self.__transfer(iova, len(data), bytes(data))

    def readv(self, segments: Sequence[Tuple[int, int]]) -> bytes:
        """A scatter list [(iova, length), ...] read in one go: the bytes, joined (see ``DmaSpace.dma_readv``)."""
        return self.__transfer_list(segments, None)

    def writev(self, segments: Sequence[Tuple[int, int]], data) -> None:
        """``data`` written over a scatter list in order; what precedes a refused entry stays written."""
        self.__transfer_list(segments, data)

    def __transfer_list(self, segments: Sequence[Tuple[int, int]], data):
        device = self.__device
        write = data is not None
        if not segments:
            return None if write else b""
        if not device.bus_master_enabled():
            self.__fault("bus-master-disabled", segments[0][0], sum(n for _, n in segments), write)
        space = self.__space
        if space is None:
            self.__fault("no-iommu-domain", segments[0][0], sum(n for _, n in segments), write)
        vectored = getattr(space, "dma_writev" if write else "dma_readv", None)
        if vectored is None:  # a DmaSpace without scatter lists: one transfer per entry
            if write:
                view, pos = memoryview(data), 0
                for iova, n in segments:
                    self.__transfer(iova, n, bytes(view[pos:pos + n]))  # (the slow path: no scatter list)
                    pos += n
                return None
            return b"".join(self.__transfer(iova, n, None) for iova, n in segments)
        try:
            if write:
                vectored(segments, data, device=device.name)
                return None
            return vectored(segments, device=device.name)
        except VfioError as e:
            self.faults.append({"iova": getattr(e, "iova", segments[0][0]), "size": getattr(e, "size", 0),
                                "write": write, "reason": getattr(e, "reason", e.strerror), "device": device.name})
            raise

    def __transfer(self, iova: int, size: int, data: Optional[bytes]):
        device = self.__device
        write = data is not None
        if not device.bus_master_enabled():
            self.__fault("bus-master-disabled", iova, size, write)
        space = self.__space
        if space is None:
            self.__fault("no-iommu-domain", iova, size, write)
        try:
            if data is not None:
                space.dma_write(iova, data, device=device.name)
                return None
            return space.dma_read(iova, size, device=device.name)
        except VfioError as e:
            self.faults.append({"iova": iova, "size": size, "write": write,
                                "reason": getattr(e, "reason", e.strerror), "device": device.name})
            raise

    def __fault(self, reason: str, iova: int, size: int, write: bool) -> NoReturn:
        device = self.__device
        record = {"iova": iova, "size": size, "write": write, "reason": reason, "device": device.name}
        self.faults.append(record)
        recorder = getattr(self.__space if self.__space is not None else self.__sink, "record_fault", None)
        if recorder is not None:
            try:
                recorder(iova=iova, size=size, write=write, reason=reason, device=device.name)
            except Exception:
                log.exception("the DmaSpace failed to record a fault")
        log.info("%s: DMA %s of %d bytes at iova 0x%x blocked: %s", device.name,
                 "write" if write else "read", size, iova, reason)
        raise DmaFault(reason, iova, size, write, device.name)
