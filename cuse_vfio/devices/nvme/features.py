"""Get Features / Set Features (NVMe 1.4, 5.14 / 5.21): the controller's feature values.

Nothing is saveable (Set Features with SV is Feature Identifier Not
Saveable, Get Features of the saved value gives the default), no feature is
namespace specific, and a controller reset returns every value to its
default.  Interrupt Coalescing is accepted and reported but completions are
not aggregated (every round still interrupts).
"""

from __future__ import annotations

import struct
import time

from . import spec

_CHANGEABLE = {spec.FEAT_ARBITRATION, spec.FEAT_POWER_MGMT, spec.FEAT_TEMP_THRESHOLD, spec.FEAT_ERROR_RECOVERY,
               spec.FEAT_VOLATILE_WC, spec.FEAT_NUM_QUEUES, spec.FEAT_IRQ_COALESCE, spec.FEAT_IRQ_CONFIG,
               spec.FEAT_WRITE_ATOMICITY, spec.FEAT_ASYNC_EVENT, spec.FEAT_TIMESTAMP}
#: Asynchronous Event Configuration bits this controller can report: the SMART critical warnings
AEC_SUPPORTED = 0xFF


class Features:
    def __init__(self, ctrl, *, max_queues: int, vectors: int, wctemp: int):
        self.ctrl = ctrl
        self.max_queues = max_queues
        self.vectors = vectors
        self.wctemp = wctemp
        self.defaults()

    def defaults(self) -> None:
        self.arbitration = 0x7            # AB = 111b: no burst limit
        self.power_state = 0
        self.temp_over = self.wctemp
        self.temp_under = 0
        self.error_recovery = 0
        self.write_cache = True
        self.nsqa = self.ncqa = self.max_queues   # queues allocated (1's based)
        self.coalescing = 0
        self.no_coalescing = {0}          # vectors with Coalescing Disable set (the admin vector)
        self.disable_normal = 0
        self.async_config = 0
        self.timestamp = 0                # host's milliseconds at ``timestamp_at``
        self.timestamp_at = time.monotonic()
        self.timestamp_origin = 0         # 0: since reset, 1: set by the host

    # -- Get Features -----------------------------------------------------------------
    def get(self, sq, cmd):
        fid = cmd[8] & 0xFF
        sel = (cmd[8] >> 8) & 0x7
        dw11 = cmd[9]
        if fid not in _CHANGEABLE:
            return spec.INVALID_FIELD | spec.DNR
        if sel == spec.SEL_CAPABILITIES:
            return spec.SUCCESS, spec.FEAT_CAP_CHANGEABLE
        if sel > spec.SEL_CAPABILITIES:
            return spec.INVALID_FIELD | spec.DNR
        current = self if sel == spec.SEL_CURRENT else Features(None, max_queues=self.max_queues,
                                                                  vectors=self.vectors, wctemp=self.wctemp)
        if fid == spec.FEAT_TEMP_THRESHOLD:
            return current._get_temperature(dw11)
        if fid == spec.FEAT_IRQ_CONFIG:
            vector = dw11 & 0xFFFF
            if vector >= self.vectors:
                return spec.INVALID_FIELD | spec.DNR
            return spec.SUCCESS, vector | ((vector in current.no_coalescing) << 16)
        if fid == spec.FEAT_TIMESTAMP:
            return self.ctrl.to_host(cmd, struct.pack("<Q", current.timestamp_value()))
        value = {
            spec.FEAT_ARBITRATION: current.arbitration,
            spec.FEAT_POWER_MGMT: current.power_state,
            spec.FEAT_ERROR_RECOVERY: current.error_recovery,
            spec.FEAT_VOLATILE_WC: int(current.write_cache),
            spec.FEAT_NUM_QUEUES: (current.nsqa - 1) | ((current.ncqa - 1) << 16),
            spec.FEAT_IRQ_COALESCE: current.coalescing,
            spec.FEAT_WRITE_ATOMICITY: current.disable_normal,
            spec.FEAT_ASYNC_EVENT: current.async_config,
        }[fid]
        return spec.SUCCESS, value

    def _get_temperature(self, dw11: int):
        tmpsel, thsel = (dw11 >> 16) & 0xF, (dw11 >> 20) & 0x3
        if thsel > 1 or 9 <= tmpsel:
            return spec.INVALID_FIELD | spec.DNR
        if tmpsel != 0:                   # only the composite temperature is implemented
            return spec.SUCCESS, 0
        return spec.SUCCESS, self.temp_under if thsel else self.temp_over

    def timestamp_value(self) -> int:
        now = self.timestamp + int((time.monotonic() - self.timestamp_at) * 1000)
        return (now & ((1 << 48) - 1)) | (self.timestamp_origin << 49)

    # -- Set Features -----------------------------------------------------------------
    def set(self, sq, cmd):
        fid = cmd[8] & 0xFF
        save = cmd[8] >> 31
        nsid, dw11 = cmd[3], cmd[9]
        if fid not in _CHANGEABLE:
            return spec.INVALID_FIELD | spec.DNR
        if save:
            return spec.FEATURE_NOT_SAVEABLE | spec.DNR
        if nsid not in (0, spec.NSID_BROADCAST):
            if self.ctrl.namespace(nsid) is None:
                return spec.INVALID_NAMESPACE | spec.DNR
            return spec.FEATURE_NOT_NS_SPECIFIC | spec.DNR
        setter = getattr(self, f"_set_{fid:02x}")
        return setter(dw11, cmd)

    def _set_01(self, dw11, cmd):
        self.arbitration = dw11 & 0xFFFFFF07
        return spec.SUCCESS

    def _set_02(self, dw11, cmd):
        if dw11 & 0x1F:                    # only power state 0 exists (NPSS = 0)
            return spec.INVALID_FIELD | spec.DNR
        self.power_state = dw11 & 0xFF
        return spec.SUCCESS

    def _set_04(self, dw11, cmd):
        value, tmpsel, thsel = dw11 & 0xFFFF, (dw11 >> 16) & 0xF, (dw11 >> 20) & 0x3
        if thsel > 1 or 9 <= tmpsel < 0xF:
            return spec.INVALID_FIELD | spec.DNR
        if tmpsel in (0, 0xF):
            if thsel:
                self.temp_under = value
            else:
                self.temp_over = value
            self.ctrl.check_temperature()
        return spec.SUCCESS

    def _set_05(self, dw11, cmd):
        if dw11 & (1 << 16):               # DULBE: no namespace reports deallocated block errors
            return spec.INVALID_FIELD | spec.DNR
        self.error_recovery = dw11 & 0xFFFF
        return spec.SUCCESS

    def _set_06(self, dw11, cmd):
        enable = bool(dw11 & 1)
        if self.write_cache and not enable:
            self.ctrl.flush_all()          # what the cache held reaches the media
        self.write_cache = enable
        return spec.SUCCESS

    def _set_07(self, dw11, cmd):
        nsqr, ncqr = dw11 & 0xFFFF, dw11 >> 16
        if nsqr == 0xFFFF or ncqr == 0xFFFF:
            return spec.INVALID_FIELD | spec.DNR
        if self.ctrl.io_queues_created:
            return spec.COMMAND_SEQUENCE_ERROR | spec.DNR
        self.nsqa = min(nsqr + 1, self.max_queues)
        self.ncqa = min(ncqr + 1, self.max_queues)
        return spec.SUCCESS, (self.nsqa - 1) | ((self.ncqa - 1) << 16)

    def _set_08(self, dw11, cmd):
        self.coalescing = dw11 & 0xFFFF
        return spec.SUCCESS

    def _set_09(self, dw11, cmd):
        vector = dw11 & 0xFFFF
        if vector >= self.vectors:
            return spec.INVALID_FIELD | spec.DNR
        if dw11 & (1 << 16):
            self.no_coalescing.add(vector)
        else:
            self.no_coalescing.discard(vector)
        return spec.SUCCESS

    def _set_0a(self, dw11, cmd):
        self.disable_normal = dw11 & 1
        return spec.SUCCESS

    def _set_0b(self, dw11, cmd):
        self.async_config = dw11 & AEC_SUPPORTED
        return spec.SUCCESS

    def _set_0e(self, dw11, cmd):
        status, data = self.ctrl.from_host(cmd, 8)
        if status:
            return status
        self.timestamp = struct.unpack("<Q", data)[0] & ((1 << 48) - 1)
        self.timestamp_at = time.monotonic()
        self.timestamp_origin = 1
        return spec.SUCCESS
