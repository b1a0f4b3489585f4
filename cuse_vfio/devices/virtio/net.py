"""virtio-net (virtio 1.x, 5.1) on the transitional PCI transport: 1af4:1000, subsystem 1.

Queues: 0 receive, 1 transmit, 2 control (no multiqueue).  Features offered:
MAC, STATUS, CTRL_VQ, CTRL_RX, CTRL_VLAN, GUEST_ANNOUNCE, CTRL_MAC_ADDR,
MRG_RXBUF, plus the transport's RING_INDIRECT_DESC, RING_EVENT_IDX,
VERSION_1 (modern) and ANY_LAYOUT (legacy).  No checksum or segmentation
offload is offered, so every header the device writes says "no checksum
needed, not GSO", and it never has to finish a checksum.  Config space:
``mac`` then ``status`` (8 bytes).

Options (topology keys): ``mac`` (default 52:54:00 then the function's bus,
device and function numbers), ``link`` ("up" or "down"), ``backend``
("loopback" or "tap"), ``tap`` (the TAP interface of the tap backend),
``pcap`` (a file that records every frame transmitted and received),
``queue_size`` (receive and transmit rings, a power of two up to 1024, default
256; the control ring has 64 entries), ``reset`` (offer a function reset, the
virtio reset, so every open starts clean; default true; QEMU's virtio-net-pci
on q35's root bus has none, ``reset = false`` is that), ``manual_time``.

How the work runs: everything runs under ``self.lock``.  A notify of the
transmit queue (a doorbell write, or DRIVER_OK) moves every available frame
to the backend before the write returns, at most one ring's worth per
notify (the rest is deferred with ``call_later``); the loopback backend
receives each one at once.  A notify of the receive queue tells the backend
buffers came back; frames from a TAP are received by its thread, which takes
the lock.  Used rings are published (and interrupts sent) once per batch.
Receive buffers are offered without notifications (VRING_USED_F_NO_NOTIFY)
while the ring has some and with them once it ran dry, as QEMU's
``virtio_net_has_buffers``; transmit notifications are always wanted.

Receive filtering is QEMU's ``receive_filter``: promiscuous after a reset;
otherwise broadcast, the device MAC, the MAC table (64 entries, overflow
accepts all of a kind), all-multicast, and with CTRL_VLAN only the VLANs the
driver added.
"""

from __future__ import annotations

import collections
import logging
import re
import struct
from typing import Counter, List, Optional

from ..registry import register_model
from .backends import BackendError, Loopback, PcapWriter, TapBackend
from .pci import VIRTIO_F_VERSION_1, VirtioPciFunction
from .virtqueue import Chain, SplitVirtqueue, VirtqueueError

log = logging.getLogger(__name__)

VIRTIO_ID_NET = 1

# -- include/uapi/linux/virtio_net.h ---------------------------------------------------------
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_CTRL_RX_EXTRA = 20
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23

VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2

VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0

VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1
VIRTIO_NET_CTRL_RX = 0
VIRTIO_NET_CTRL_RX_PROMISC = 0
VIRTIO_NET_CTRL_RX_ALLMULTI = 1
VIRTIO_NET_CTRL_MAC = 1
VIRTIO_NET_CTRL_MAC_TABLE_SET = 0
VIRTIO_NET_CTRL_MAC_ADDR_SET = 1
VIRTIO_NET_CTRL_VLAN = 2
VIRTIO_NET_CTRL_VLAN_ADD = 0
VIRTIO_NET_CTRL_VLAN_DEL = 1
VIRTIO_NET_CTRL_ANNOUNCE = 3
VIRTIO_NET_CTRL_ANNOUNCE_ACK = 0

OFFERED = (1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS | 1 << VIRTIO_NET_F_CTRL_VQ
           | 1 << VIRTIO_NET_F_CTRL_RX | 1 << VIRTIO_NET_F_CTRL_VLAN | 1 << VIRTIO_NET_F_GUEST_ANNOUNCE
           | 1 << VIRTIO_NET_F_CTRL_MAC_ADDR | 1 << VIRTIO_NET_F_MRG_RXBUF)
#: features that mean nothing without the control queue (virtio 1.x, 5.1.3.1)
NEEDS_CTRL_VQ = {VIRTIO_NET_F_CTRL_RX: "CTRL_RX", VIRTIO_NET_F_CTRL_VLAN: "CTRL_VLAN",
                 VIRTIO_NET_F_GUEST_ANNOUNCE: "GUEST_ANNOUNCE", VIRTIO_NET_F_MQ: "MQ",
                 VIRTIO_NET_F_CTRL_MAC_ADDR: "CTRL_MAC_ADDR", VIRTIO_NET_F_CTRL_RX_EXTRA: "CTRL_RX_EXTRA"}

RX, TX, CTRL = 0, 1, 2
CTRL_QUEUE_SIZE = 64
CONFIG_SIZE = 8                   # mac[6], status
ETH_ALEN = 6
ETH_HLEN = 14
MAX_FRAME = 65536 + ETH_HLEN      # what a transmit chain may carry after its header
MAC_TABLE_ENTRIES = 64            # QEMU's
MAX_VLAN = 4096
CTRL_LIMIT = 65536               # the longest control command read (a MAC table of ~10900 entries)
BROADCAST = b"\xff" * ETH_ALEN
_MAC = re.compile(r"^([0-9a-fA-F]{2})(:[0-9a-fA-F]{2}){5}$")
_BDF = re.compile(r"^[0-9a-fA-F]{4}:([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])$")


def parse_mac(text: str) -> bytes:
    if not isinstance(text, str) or not _MAC.match(text):
        raise ValueError(f"mac {text!r} is not a MAC address like \"52:54:00:12:34:56\"")
    mac = bytes(int(part, 16) for part in text.split(":"))
    if mac[0] & 1:
        raise ValueError(f"mac {text} is a multicast address: a device needs a unicast one")
    return mac


def default_mac(name: Optional[str]) -> bytes:
    """52:54:00 (QEMU's prefix) and the bus, device, function of the BDF the device is named after."""
    m = _BDF.match(name or "")
    if m is None:
        return bytes.fromhex("525400123456")
    return bytes((0x52, 0x54, 0x00, int(m.group(1), 16), int(m.group(2), 16), int(m.group(3))))


def _parse_link(link) -> bool:
    if isinstance(link, bool):
        return link
    if link in ("up", "down"):
        return link == "up"
    raise ValueError(f"link {link!r} is neither \"up\" nor \"down\"")


@register_model("virtio-net")
class VirtioNet(VirtioPciFunction):
    device_id = 0x1000             # transitional virtio-net
    subsystem_id = VIRTIO_ID_NET
    class_code = 0x020000          # network controller, Ethernet
    #: the current MAC address, set by reset_device
    mac: bytes

    def __init__(self, name=None, *, mac: Optional[str] = None, link="up", backend: str = "loopback",
                 tap: Optional[str] = None, pcap: Optional[str] = None, queue_size: int = 256, **options):
        self.perm_mac = parse_mac(mac) if mac is not None else default_mac(name)
        self.link_up = _parse_link(link)
        if not isinstance(queue_size, int) or queue_size & (queue_size - 1) or not 2 <= queue_size <= 1024:
            raise ValueError(f"queue_size {queue_size!r} is not a power of two from 2 to 1024")
        if backend not in ("loopback", "tap"):
            raise ValueError(f"backend {backend!r} is neither \"loopback\" nor \"tap\"")
        if (backend == "tap") != (tap is not None):
            raise ValueError("the tap backend needs tap = \"NAME\" (an existing TAP interface), "
                             "and only it takes a tap")
        super().__init__(name, queue_sizes=[queue_size, queue_size, CTRL_QUEUE_SIZE], **options)
        self.stats: Counter[str] = collections.Counter()
        self.pcap = None
        try:
            self.pcap = PcapWriter(pcap) if pcap is not None else None
            self.backend = TapBackend(tap) if tap is not None else Loopback()  # (tap is given iff backend is "tap")
        except BackendError:
            if self.pcap is not None:
                self.pcap.close()
            raise
        self._rx_dirty = False
        self.reset_device()
        self.update_device_config()
        self.backend.attach(self)

    # -- the transport's questions ---------------------------------------------------------------
    def device_features(self) -> int:
        return OFFERED

    def validate_features(self, features: int) -> Optional[str]:
        if not features >> VIRTIO_NET_F_CTRL_VQ & 1:
            for bit, name in NEEDS_CTRL_VQ.items():
                if features >> bit & 1:
                    return f"VIRTIO_NET_F_{name} needs VIRTIO_NET_F_CTRL_VQ"
        return None

    def config_size(self) -> int:
        return CONFIG_SIZE

    def device_config(self) -> bytes:
        status = (VIRTIO_NET_S_LINK_UP if self.link_up else 0) | self.announce_status
        return self.mac + struct.pack("<H", status)

    def write_config(self, offset: int, data: bytes, legacy: bool) -> None:
        # virtio_net_set_config: a legacy driver without CTRL_MAC_ADDR sets the MAC by writing it
        if not legacy or self.has_feature(VIRTIO_NET_F_CTRL_MAC_ADDR) or offset >= ETH_ALEN:
            return
        mac = bytearray(self.mac)
        end = min(ETH_ALEN, offset + len(data))
        mac[offset:end] = data[:end - offset]
        self.mac = bytes(mac)

    def features_changed(self) -> None:
        """``virtio_net_set_features``: header size, mergeable buffers, the VLAN filter's default."""
        self.mergeable = self.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        self.hdr_len = 12 if self.mergeable or self.has_feature(VIRTIO_F_VERSION_1) else 10
        fill = 0 if self.has_feature(VIRTIO_NET_F_CTRL_VLAN) else 0xFF
        self.vlans = bytearray([fill]) * (MAX_VLAN // 8)

    def reset_device(self) -> None:
        """``virtio_net_reset``: promiscuous, empty filters, the permanent MAC, no announcement."""
        self.mac = self.perm_mac
        self.promisc = True
        self.allmulti = False
        self.mac_table: List[bytes] = []
        self.first_multi = 0
        self.uni_overflow = self.multi_overflow = False
        self.announce_status = 0
        self.features_changed()

    def queue_notified(self, queue: SplitVirtqueue) -> None:
        if queue.index == TX:
            self._flush_tx(queue)
        elif queue.index == RX:
            self.backend.rx_ready()
        else:
            self._handle_ctrl(queue)

    # -- link and announcements --------------------------------------------------------------------
    def set_link(self, up: bool) -> None:
        """The cable: a change updates config status and interrupts the driver (config change)."""
        with self.lock:
            if bool(up) != self.link_up:
                self.link_up = bool(up)
                self.config_changed()

    def announce(self) -> bool:
        """Ask the driver to announce itself (VIRTIO_NET_S_ANNOUNCE); needs GUEST_ANNOUNCE and CTRL_VQ."""
        with self.lock:
            if not (self.driver_ok and self.has_feature(VIRTIO_NET_F_GUEST_ANNOUNCE)
                    and self.has_feature(VIRTIO_NET_F_CTRL_VQ)):
                return False
            self.announce_status = VIRTIO_NET_S_ANNOUNCE
            self.config_changed()
            return True

    # -- transmit ----------------------------------------------------------------------------------
    def _flush_tx(self, queue: SplitVirtqueue) -> None:
        """``virtio_net_flush_tx``: each available chain is a header and a frame, sent to the backend."""
        hdr_len = self.hdr_len
        done = 0
        while done < queue.size:
            chain = queue.pop()
            if chain is None:
                break
            data = queue.read_chain(chain, hdr_len + MAX_FRAME)
            if len(data) < hdr_len:
                raise VirtqueueError(f"queue {queue.index}: a transmit buffer of {len(data)} bytes "
                                     f"is shorter than the {hdr_len}-byte virtio-net header")
            queue.fill(chain, 0)
            done += 1
            self._transmit(data, hdr_len)
        if queue.flush():
            self.notify_queue(queue)
        self.finish_rx()
        if done >= queue.size and queue.available():
            self.call_later(0, lambda: self.kick(TX))  # QEMU's tx_burst: the rest in the next round

    def _transmit(self, data: bytes, hdr_len: int) -> None:
        flags, gso_type = data[0], data[1]
        frame = data[hdr_len:]
        if self.pcap is not None:
            self.pcap.record(frame)
        stats = self.stats
        if gso_type != VIRTIO_NET_HDR_GSO_NONE:
            stats["tx_dropped_gso"] += 1
            log.warning("%s: a transmit header asks for segmentation (gso_type %d), which was not offered: "
                        "frame dropped", self.name, gso_type)
            return
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            stats["tx_csum_not_offered"] += 1  # checksum offload was not offered: sent as it is
        if len(frame) < ETH_HLEN or not self.link_up:
            stats["tx_dropped" if self.link_up else "tx_dropped_link_down"] += 1
            return
        stats["tx_packets"] += 1
        stats["tx_bytes"] += len(frame)
        self.backend.transmit(frame)

    # -- receive -----------------------------------------------------------------------------------
    def loop_back(self, frame: bytes) -> None:
        """A frame from the loopback backend (lock held): received, or dropped when there is no buffer."""
        if not self.receive(frame):
            self.stats["rx_dropped_no_buffer"] += 1

    def receive_from_backend(self, frame: bytes) -> bool:
        """A frame from a backend thread; False: no room yet, hold it and retry at ``rx_ready``."""
        with self.lock:
            try:
                return self.receive(frame)
            finally:
                self.finish_rx()

    def receive(self, frame: bytes) -> bool:
        """``virtio_net_receive``: filter, then into receive buffers; False only when they lack room."""
        rx = self.queues[RX]
        if not self.usable(rx) or not self.link_up:
            self.stats["rx_dropped_not_ready"] += 1
            return True
        if len(frame) < ETH_HLEN or not self._accepts(frame):
            self.stats["rx_filtered"] += 1
            return True
        result = self.run_queue_work(self._receive_into, rx, frame)
        return result is not False

    def _receive_into(self, rx: SplitVirtqueue, frame: bytes) -> bool:
        if not self._place(rx, frame):
            rx.set_notification(True)  # tell us when buffers come, then look once more (a race)
            if not self._place(rx, frame):
                return False
        rx.set_notification(False)
        self.stats["rx_packets"] += 1
        self.stats["rx_bytes"] += len(frame)
        if self.pcap is not None:
            self.pcap.record(frame)
        self._rx_dirty = True
        return True

    def _place(self, rx: SplitVirtqueue, frame: bytes) -> bool:
        """Pop enough buffers for header + frame and write them; give them back if they are too few."""
        hdr_len = self.hdr_len
        total = hdr_len + len(frame)
        chains: List[Chain] = []
        room = 0
        while room < total:
            chain = rx.pop()
            if chain is None:
                for popped in reversed(chains):
                    rx.unpop(popped)
                return False
            size = chain.write_len
            if not size:
                raise VirtqueueError(f"queue {rx.index}: the receive chain at {chain.head} has no "
                                     f"device-writable buffer")
            if not chains and size < hdr_len:
                raise VirtqueueError(f"queue {rx.index}: a receive buffer of {size} bytes cannot hold "
                                     f"the {hdr_len}-byte virtio-net header")
            chains.append(chain)
            room += size
            if not self.mergeable and room < total:
                # QEMU: a frame that does not fit one buffer without MRG_RXBUF is dropped
                rx.unpop(chain)
                self.stats["rx_dropped_too_big"] += 1
                return True
        header = struct.pack("<BBHHHH", 0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0)
        if hdr_len == 12:
            header += struct.pack("<H", len(chains) if self.mergeable else 0)
        data = memoryview(header + frame)
        pos = 0
        for chain in chains:
            written = rx.write_chain(chain, data[pos:])
            rx.fill(chain, written)
            pos += written
        return True

    def finish_rx(self) -> None:
        """Publish what the receive queue got in this batch, interrupt if wanted, flush the pcap."""
        if self._rx_dirty:
            self._rx_dirty = False
            rx = self.queues[RX]
            if self.run_queue_work(rx.flush):
                self.notify_queue(rx)
        if self.pcap is not None:
            self.pcap.flush()

    def _accepts(self, frame: bytes) -> bool:
        """QEMU's ``receive_filter``."""
        if self.promisc:
            return True
        if frame[12:14] == b"\x81\x00":
            vid = struct.unpack_from(">H", frame, 14)[0] & 0xFFF
            if not self.vlans[vid >> 3] >> (vid & 7) & 1:
                return False
        dest = frame[:ETH_ALEN]
        if dest[0] & 1:
            if dest == BROADCAST:
                return True
            if self.allmulti or self.multi_overflow:
                return True
            return dest in self.mac_table[self.first_multi:]
        if self.uni_overflow or dest == self.mac:
            return True
        return dest in self.mac_table[:self.first_multi]

    # -- control queue -----------------------------------------------------------------------------
    def _handle_ctrl(self, queue: SplitVirtqueue) -> None:
        """``virtio_net_handle_ctrl``: class, command, data in; one ack byte out, per chain."""
        while True:
            chain = queue.pop()
            if chain is None:
                break
            out = queue.read_chain(chain, CTRL_LIMIT)
            if len(out) < 2 or chain.write_len < 1:
                raise VirtqueueError(f"queue {queue.index}: a control command without its class and command "
                                     f"or without room for the ack")
            ack = self.control(out[0], out[1], out[2:])
            queue.write_chain(chain, bytes([ack]))
            queue.fill(chain, 1)
            if queue.flush():
                self.notify_queue(queue)

    def control(self, cls: int, cmd: int, data: bytes) -> int:
        """One control command; VIRTIO_NET_OK or VIRTIO_NET_ERR (logged with the reason)."""
        handler = self._CONTROL.get(cls)
        reason = handler(self, cmd, data) if handler is not None else f"unknown class {cls}"
        if reason is None:
            return VIRTIO_NET_OK
        log.info("%s: control command class %d command %d refused: %s", self.name, cls, cmd, reason)
        return VIRTIO_NET_ERR

    def _ctrl_rx(self, cmd: int, data: bytes) -> Optional[str]:
        if not self.has_feature(VIRTIO_NET_F_CTRL_RX):
            return "VIRTIO_NET_F_CTRL_RX was not negotiated"
        if cmd not in (VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_CTRL_RX_ALLMULTI):
            return "only PROMISC and ALLMULTI (no VIRTIO_NET_F_CTRL_RX_EXTRA)"
        if len(data) < 1:
            return "no on/off byte"
        if cmd == VIRTIO_NET_CTRL_RX_PROMISC:
            self.promisc = bool(data[0])
        else:
            self.allmulti = bool(data[0])
        return None

    def _ctrl_mac(self, cmd: int, data: bytes) -> Optional[str]:
        if cmd == VIRTIO_NET_CTRL_MAC_ADDR_SET:
            if not self.has_feature(VIRTIO_NET_F_CTRL_MAC_ADDR):
                return "VIRTIO_NET_F_CTRL_MAC_ADDR was not negotiated"
            if len(data) != ETH_ALEN:
                return f"MAC_ADDR_SET carries {len(data)} bytes, not 6"
            self.mac = bytes(data)
            self.update_device_config()  # virtio_net_handle_mac: the config shows it, no config interrupt
            return None
        if cmd != VIRTIO_NET_CTRL_MAC_TABLE_SET:
            return f"unknown MAC command {cmd}"
        if not self.has_feature(VIRTIO_NET_F_CTRL_RX):
            return "MAC_TABLE_SET needs VIRTIO_NET_F_CTRL_RX"
        tables = []
        pos = 0
        for kind in ("unicast", "multicast"):
            if len(data) < pos + 4:
                return f"the {kind} table has no entry count"
            entries = struct.unpack_from("<I", data, pos)[0]
            pos += 4
            end = pos + entries * ETH_ALEN
            if end > len(data) or (kind == "multicast" and end != len(data)):
                return f"the {kind} table says {entries} entries, which is not what the command carries"
            tables.append([bytes(data[p:p + ETH_ALEN]) for p in range(pos, end, ETH_ALEN)])
            pos = end
        unicast, multicast = tables
        self.uni_overflow = len(unicast) > MAC_TABLE_ENTRIES
        unicast = [] if self.uni_overflow else unicast
        self.multi_overflow = len(multicast) > MAC_TABLE_ENTRIES - len(unicast)
        self.mac_table = unicast + ([] if self.multi_overflow else multicast)
        self.first_multi = len(unicast)
        return None

    def _ctrl_vlan(self, cmd: int, data: bytes) -> Optional[str]:
        if not self.has_feature(VIRTIO_NET_F_CTRL_VLAN):
            return "VIRTIO_NET_F_CTRL_VLAN was not negotiated"
        if len(data) < 2:
            return "no VLAN id"
        vid = struct.unpack_from("<H", data)[0]
        if vid >= MAX_VLAN:
            return f"VLAN id {vid} is beyond {MAX_VLAN - 1}"
        if cmd == VIRTIO_NET_CTRL_VLAN_ADD:
            self.vlans[vid >> 3] |= 1 << (vid & 7)
        elif cmd == VIRTIO_NET_CTRL_VLAN_DEL:
            self.vlans[vid >> 3] &= ~(1 << (vid & 7)) & 0xFF
        else:
            return f"unknown VLAN command {cmd}"
        return None

    def _ctrl_announce(self, cmd: int, data: bytes) -> Optional[str]:
        if cmd != VIRTIO_NET_CTRL_ANNOUNCE_ACK:
            return f"unknown announce command {cmd}"
        if not self.announce_status & VIRTIO_NET_S_ANNOUNCE:
            return "no announcement was asked for"
        self.announce_status = 0
        self.update_device_config()
        self.generation = (self.generation + 1) & 0xFF  # status changed; no interrupt for the driver's own ack
        return None

    _CONTROL = {VIRTIO_NET_CTRL_RX: _ctrl_rx, VIRTIO_NET_CTRL_MAC: _ctrl_mac,
                VIRTIO_NET_CTRL_VLAN: _ctrl_vlan, VIRTIO_NET_CTRL_ANNOUNCE: _ctrl_announce}

    # -- life ------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        self.backend.close()
        if self.pcap is not None:
            self.pcap.close()
        super().shutdown()
