"""The admin command set (NVMe 1.4, 5) and asynchronous events (5.2).

Supported: Delete/Create I/O Submission Queue, Get Log Page (Error
Information, SMART / Health Information, Firmware Slot Information), Delete/
Create I/O Completion Queue, Identify (CNS 00h, 01h, 02h, 03h, and 05h/06h
for the NVM command set), Abort, Set/Get Features, Asynchronous Event
Request.  Any other opcode is Invalid Command Opcode (Keep Alive included:
KAS is 0).
"""

from __future__ import annotations

import collections
import logging
from typing import Deque, Optional, Set, Tuple

from . import identify, spec
from .queues import CompletionQueue

log = logging.getLogger(__name__)

#: MQES: the largest I/O queue, 0's based (QEMU's default: 2048 entries)
MQES = 0x7FF
#: events queued while no Asynchronous Event Request is outstanding (QEMU's aer_max_queued)
AEN_QUEUE_MAX = 64


class AsyncEvents:
    """Outstanding Asynchronous Event Requests and the events waiting for one.

    After an event of a type is reported, further events of that type are
    masked until the host reads the log page it names with RAE cleared.
    """

    def __init__(self, engine, limit: int):
        self.engine = engine
        self.limit = limit
        self.reset()

    def reset(self) -> None:
        self.outstanding: Deque[tuple] = collections.deque()   # (sq, cmd) of parked requests
        self.events: Deque[Tuple[int, int, int]] = collections.deque()        # (type, info, log page)
        self.masked: Set[int] = set()

    def request(self, sq, cmd):
        if len(self.outstanding) >= self.limit:
            return spec.AER_LIMIT_EXCEEDED
        sq.inflight -= 1                         # parked: it holds no submission queue slot
        self.outstanding.append((sq, cmd))
        self.deliver()
        return None

    def post(self, event_type: int, info: int, log_page: int) -> None:
        if len(self.events) >= AEN_QUEUE_MAX:
            log.info("asynchronous event (type %d, info 0x%02x) dropped: %d already queued", event_type, info,
                     AEN_QUEUE_MAX)
            return
        self.events.append((event_type, info, log_page))
        self.deliver()

    def deliver(self) -> None:
        while self.outstanding:
            event = next((e for e in self.events if e[0] not in self.masked), None)
            if event is None:
                return
            self.events.remove(event)
            self.masked.add(event[0])
            sq, cmd = self.outstanding.popleft()
            sq.inflight += 1
            self.engine.complete(sq, cmd, spec.SUCCESS, event[0] | (event[1] << 8) | (event[2] << 16))
            self.engine.post(sq.cq)

    def log_read(self, log_page: int) -> None:
        """The host read ``log_page`` without Retain Asynchronous Event: its event type is reported again."""
        for event_type, page in spec.AER_LOG_OF_TYPE.items():
            if page == log_page:
                self.masked.discard(event_type)
        self.deliver()

    def abort(self, cid: int) -> bool:
        for item in self.outstanding:
            if item[1][2] == cid:
                self.outstanding.remove(item)
                sq, cmd = item
                sq.inflight += 1
                self.engine.complete(sq, cmd, spec.ABORT_REQUESTED)
                return True
        return False


class AdminCommands:
    def __init__(self, ctrl):
        self.ctrl = ctrl
        self.engine = ctrl.engine
        self.events = AsyncEvents(ctrl.engine, ctrl.identity.aerl + 1)
        self.handlers = {
            spec.ADMIN_DELETE_SQ: self.delete_sq,
            spec.ADMIN_CREATE_SQ: self.create_sq,
            spec.ADMIN_GET_LOG_PAGE: self.get_log_page,
            spec.ADMIN_DELETE_CQ: self.delete_cq,
            spec.ADMIN_CREATE_CQ: self.create_cq,
            spec.ADMIN_IDENTIFY: self.identify,
            spec.ADMIN_ABORT: self.abort,
            spec.ADMIN_SET_FEATURES: ctrl.features.set,
            spec.ADMIN_GET_FEATURES: ctrl.features.get,
            spec.ADMIN_ASYNC_EVENT: self.events.request,
        }

    # -- queue management (5.3 - 5.6) ------------------------------------------------------
    def create_cq(self, sq, cmd):
        ctrl = self.ctrl
        qid, qsize = cmd[8] & 0xFFFF, cmd[8] >> 16
        flags, vector = cmd[9] & 0xFFFF, cmd[9] >> 16
        base = cmd[6]
        if ctrl.cc_field(spec.CC_IOCQES_SHIFT, spec.CC_IOCQES_MASK) != spec.CQES:
            return spec.INVALID_QUEUE_SIZE | spec.DNR    # CC.IOCQES does not give 16-byte entries
        if not 0 < qid <= ctrl.features.ncqa or self.engine.cqs[qid] is not None:
            return spec.INVALID_QID | spec.DNR
        if not 0 < qsize <= MQES:
            return spec.INVALID_QUEUE_SIZE | spec.DNR
        if base & (ctrl.page_size - 1):
            return spec.PRP_OFFSET_INVALID | spec.DNR
        ien = bool(flags & spec.CQ_IRQ_ENABLED)
        if ien and vector >= ctrl.usable_vectors():
            return spec.INVALID_VECTOR | spec.DNR
        if not flags & spec.QUEUE_PHYS_CONTIG:
            return spec.INVALID_FIELD | spec.DNR         # CAP.CQR: queues must be physically contiguous
        self.engine.add_cq(qid, base, qsize + 1, ien, vector)
        ctrl.io_queues_created = True
        return spec.SUCCESS

    def create_sq(self, sq, cmd):
        ctrl = self.ctrl
        qid, qsize = cmd[8] & 0xFFFF, cmd[8] >> 16
        flags, cqid = cmd[9] & 0xFFFF, cmd[9] >> 16
        base = cmd[6]
        if ctrl.cc_field(spec.CC_IOSQES_SHIFT, spec.CC_IOSQES_MASK) != spec.SQES:
            return spec.INVALID_QUEUE_SIZE | spec.DNR    # CC.IOSQES does not give 64-byte entries
        if cqid == 0 or cqid >= len(self.engine.cqs) or self.engine.cqs[cqid] is None:
            return spec.CQ_INVALID | spec.DNR
        if not 0 < qid <= ctrl.features.nsqa or self.engine.sqs[qid] is not None:
            return spec.INVALID_QID | spec.DNR
        if not 0 < qsize <= MQES:
            return spec.INVALID_QUEUE_SIZE | spec.DNR
        if base & (ctrl.page_size - 1):
            return spec.PRP_OFFSET_INVALID | spec.DNR
        if not flags & spec.QUEUE_PHYS_CONTIG:
            return spec.INVALID_FIELD | spec.DNR
        self.engine.add_sq(qid, base, qsize + 1, cqid, (flags >> 1) & 0x3)
        return spec.SUCCESS

    def delete_sq(self, sq, cmd):
        qid = cmd[8] & 0xFFFF
        target = self.engine.sqs[qid] if 0 < qid < len(self.engine.sqs) else None
        if target is None:
            return spec.INVALID_QID | spec.DNR
        self.engine.delete_sq(target)
        return spec.SUCCESS

    def delete_cq(self, sq, cmd):
        qid = cmd[8] & 0xFFFF
        cq: Optional[CompletionQueue] = self.engine.cqs[qid] if 0 < qid < len(self.engine.cqs) else None
        if cq is None:
            return spec.INVALID_QID | spec.DNR
        if cq.sqs:
            return spec.INVALID_QUEUE_DELETION | spec.DNR  # an I/O SQ still completes here
        self.engine.delete_cq(cq)
        return spec.SUCCESS

    # -- Identify (5.15) ------------------------------------------------------------------
    def identify(self, sq, cmd):
        ctrl = self.ctrl
        cns, nsid, csi = cmd[8] & 0xFF, cmd[3], cmd[9] >> 24
        if cns == spec.CNS_CTRL:
            return ctrl.to_host(cmd, ctrl.identity.controller())
        if cns == spec.CNS_ACTIVE_NS_LIST:
            if nsid >= spec.NSID_BROADCAST - 1:
                return spec.INVALID_NAMESPACE | spec.DNR
            return ctrl.to_host(cmd, identify.active_namespace_list((ns.nsid for ns in ctrl.namespaces), nsid))
        if cns == spec.CNS_CS_CTRL:
            if csi != spec.CSI_NVM:
                return spec.INVALID_FIELD | spec.DNR
            return ctrl.to_host(cmd, ctrl.identity.nvm_controller())
        if cns not in (spec.CNS_NS, spec.CNS_NS_DESCRIPTORS, spec.CNS_CS_NS):
            return spec.INVALID_FIELD | spec.DNR
        if nsid == 0 or nsid == spec.NSID_BROADCAST or nsid > ctrl.identity.nn:
            return spec.INVALID_NAMESPACE | spec.DNR
        ns = ctrl.namespace(nsid)
        if cns == spec.CNS_NS:
            return ctrl.to_host(cmd, identify.identify_namespace(ns, ctrl.lba_formats))
        if cns == spec.CNS_NS_DESCRIPTORS:
            return ctrl.to_host(cmd, identify.namespace_descriptors(ns))
        if csi != spec.CSI_NVM:
            return spec.INVALID_FIELD | spec.DNR
        return ctrl.to_host(cmd, bytes(spec.IDENTIFY_SIZE))  # the NVM set adds nothing to Identify Namespace

    # -- Get Log Page (5.14) ----------------------------------------------------------------
    def get_log_page(self, sq, cmd):
        ctrl = self.ctrl
        dw10, dw11 = cmd[8], cmd[9]
        lid, rae = dw10 & 0xFF, (dw10 >> 15) & 1
        length = ((((dw11 & 0xFFFF) << 16) | (dw10 >> 16)) + 1) * 4
        offset = cmd[10] | (cmd[11] << 32)
        if lid == spec.LOG_ERROR:
            page = ctrl.error_log.page()
        elif lid == spec.LOG_SMART:
            nsid = cmd[3]
            if nsid in (0, spec.NSID_BROADCAST):
                namespaces = ctrl.namespaces
            else:
                ns = ctrl.namespace(nsid)
                if ns is None:
                    return spec.INVALID_NAMESPACE | spec.DNR
                namespaces = [ns]
            page = ctrl.health.smart_log(namespaces, ctrl.critical_warning(), ctrl.error_log.count)
        elif lid == spec.LOG_FW_SLOT:
            page = identify.firmware_slot_log(ctrl.identity.firmware)
        else:
            return spec.INVALID_LOG_PAGE | spec.DNR
        if offset & 3 or offset >= len(page):
            return spec.INVALID_FIELD | spec.DNR
        if ctrl.max_transfer and length > ctrl.max_transfer:
            return spec.INVALID_FIELD | spec.DNR
        status = ctrl.to_host(cmd, page[offset:offset + length].ljust(length, b"\0"))
        if status == spec.SUCCESS and not rae:
            self.events.log_read(lid)
        return status

    # -- Abort (5.1) ----------------------------------------------------------------------
    def abort(self, sq, cmd):
        sqid, cid = cmd[8] & 0xFFFF, cmd[8] >> 16
        if sqid >= len(self.engine.sqs) or self.engine.sqs[sqid] is None:
            return spec.INVALID_FIELD | spec.DNR
        if self.engine.abort(sqid, cid) or (sqid == 0 and self.events.abort(cid)):
            return spec.SUCCESS, 0      # DW0 bit 0 cleared: the command was aborted
        return spec.SUCCESS, 1          # not found (already completed, or never seen): not aborted
