"""The NVM command set's I/O commands (NVMe 1.4, 6): Flush, Write, Read, Write Zeroes, Dataset Management.

Data moves between the host's PRP buffers and the backing file: a Read is
one ``pread`` and one DMA write per contiguous IOVA range, a Write one DMA
read per range and one ``pwritev``.  A refused DMA is a Data Transfer Error
(the IOMMU logs the fault); the file is untouched by a Write whose buffer
could not be read.  An I/O error of the file is Unrecovered Read Error or
Write Fault, and is logged.
"""

from __future__ import annotations

import logging

from . import spec
from .queues import map_prps, read_from_host, write_to_host

log = logging.getLogger(__name__)

_DSM_RANGE = spec.DSM_RANGE


class NvmCommands:
    def __init__(self, ctrl):
        self.ctrl = ctrl
        self.engine = ctrl.engine
        self.handlers = {
            spec.NVM_FLUSH: self.flush,
            spec.NVM_WRITE: self.write,
            spec.NVM_READ: self.read,
            spec.NVM_WRITE_ZEROES: self.write_zeroes,
            spec.NVM_DSM: self.dsm,
        }

    def _range(self, cmd, data: bool):
        """(status, namespace, slba, nlb, segments) of a Read/Write/Write Zeroes."""
        ctrl = self.ctrl
        ns = ctrl.namespace(cmd[3])
        if ns is None:
            return spec.INVALID_NAMESPACE | spec.DNR, None, 0, 0, None
        slba = cmd[8] | (cmd[9] << 32)
        nlb = (cmd[10] & 0xFFFF) + 1
        length = nlb << ns.lba_shift
        if data and ctrl.max_transfer and length > ctrl.max_transfer:
            return spec.INVALID_FIELD | spec.DNR, None, 0, 0, None
        if slba + nlb > ns.nlbas:
            return spec.LBA_OUT_OF_RANGE | spec.DNR, None, 0, 0, None
        if not data:
            return spec.SUCCESS, ns, slba, nlb, None
        if cmd[1] >> spec.FLAGS_PSDT_SHIFT:
            return spec.INVALID_FIELD | spec.DNR, None, 0, 0, None   # SGLS is 0: PRPs only
        status, segments = map_prps(ctrl.dma, cmd[6], cmd[7], length, ctrl.page_size)
        return status, ns, slba, nlb, segments

    def read(self, sq, cmd):
        status, ns, slba, nlb, segments = self._range(cmd, True)
        if status:
            return status
        length = nlb << ns.lba_shift
        try:
            data = ns.backing.read(ns.offset(slba), length)
        except OSError as e:
            log.warning("%s: reading LBAs %d+%d of namespace %d failed: %s", self.ctrl.name, slba, nlb, ns.nsid,
                        e.strerror)
            return spec.UNRECOVERED_READ_ERROR
        self.engine.moved += length
        if not write_to_host(self.ctrl.dma, segments, data):
            return spec.DATA_TRANSFER_ERROR
        ns.bytes_read += length
        ns.read_commands += 1
        return spec.SUCCESS

    def write(self, sq, cmd):
        status, ns, slba, nlb, segments = self._range(cmd, True)
        if status:
            return status
        length = nlb << ns.lba_shift
        self.engine.moved += length
        data = read_from_host(self.ctrl.dma, segments, length)
        if data is None:
            return spec.DATA_TRANSFER_ERROR
        sync = bool(cmd[10] & spec.RW_FUA) or not self.ctrl.features.write_cache
        try:
            ns.backing.write(ns.offset(slba), [data], sync)
        except OSError as e:
            log.warning("%s: writing LBAs %d+%d of namespace %d failed: %s", self.ctrl.name, slba, nlb, ns.nsid,
                        e.strerror)
            return spec.WRITE_FAULT
        ns.bytes_written += length
        ns.write_commands += 1
        return spec.SUCCESS

    def flush(self, sq, cmd):
        nsid = cmd[3]
        if nsid != spec.NSID_BROADCAST and self.ctrl.namespace(nsid) is None:
            return spec.INVALID_NAMESPACE | spec.DNR
        try:
            self.ctrl.flush_all()           # one file holds every namespace
        except OSError as e:
            log.warning("%s: flush failed: %s", self.ctrl.name, e.strerror)
            return spec.INTERNAL_ERROR
        return spec.SUCCESS

    def write_zeroes(self, sq, cmd):
        status, ns, slba, nlb, _ = self._range(cmd, False)
        if status:
            return status
        offset, length = ns.offset(slba), nlb << ns.lba_shift
        self.engine.moved += length
        try:
            if cmd[10] & spec.WZ_DEAC:
                ns.backing.deallocate(offset, length)
            else:
                ns.backing.zero(offset, length)
        except OSError as e:
            log.warning("%s: zeroing LBAs %d+%d of namespace %d failed: %s", self.ctrl.name, slba, nlb, ns.nsid,
                        e.strerror)
            return spec.WRITE_FAULT
        return spec.SUCCESS

    def dsm(self, sq, cmd):
        ctrl = self.ctrl
        ns = ctrl.namespace(cmd[3])
        if ns is None:
            return spec.INVALID_NAMESPACE | spec.DNR
        if not cmd[9] & spec.DSM_AD:
            return spec.SUCCESS             # only hints (integral read/write): nothing to do
        count = (cmd[8] & 0xFF) + 1
        status, data = ctrl.from_host(cmd, count * _DSM_RANGE.size)
        if status:
            return status
        ranges = [_DSM_RANGE.unpack_from(data, i * _DSM_RANGE.size) for i in range(count)]
        for _, nlb, slba in ranges:
            if slba + nlb > ns.nlbas:
                return spec.LBA_OUT_OF_RANGE | spec.DNR
        try:
            for _, nlb, slba in ranges:
                if nlb:
                    ns.backing.deallocate(ns.offset(slba), nlb << ns.lba_shift)
        except OSError as e:
            log.warning("%s: deallocating in namespace %d failed: %s", ctrl.name, ns.nsid, e.strerror)
            return spec.WRITE_FAULT
        return spec.SUCCESS
