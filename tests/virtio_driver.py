"""A virtio-net driver for the tests, doing what Linux's virtio_pci + virtio_net and DPDK's PMD do.

It reaches the device only as a VFIO client would: registers through the
device fd's regions (``Regs``) and rings in memory the device reaches by DMA
(``Memory``).  ``legacy=True`` drives the I/O BAR (DPDK's way here), otherwise
the modern capabilities in BAR4 (Linux's way).
"""

import struct

from cuse_vfio.devices.pci import capability_offsets

OFFSET_SHIFT = 40
CONFIG_REGION = 7

# status bits
ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 0x40, 0x80
# feature bits
F_CSUM, F_MAC, F_MRG_RXBUF, F_STATUS, F_CTRL_VQ, F_CTRL_RX, F_CTRL_VLAN = 0, 5, 15, 16, 17, 18, 19
F_GUEST_ANNOUNCE, F_MQ, F_CTRL_MAC_ADDR = 21, 22, 23
F_ANY_LAYOUT, F_INDIRECT, F_EVENT_IDX, F_VERSION_1 = 27, 28, 29, 32
NET_FEATURES = [F_MAC, F_STATUS, F_CTRL_VQ, F_CTRL_RX, F_CTRL_VLAN, F_GUEST_ANNOUNCE, F_CTRL_MAC_ADDR]
NO_VECTOR = 0xFFFF
DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT = 1, 2, 4

# the modern common config
DFSELECT, DF, GFSELECT, GF, MSIX_CONFIG, NUMQ, STATUS, GENERATION = 0, 4, 8, 12, 16, 18, 20, 21
Q_SELECT, Q_SIZE, Q_MSIX, Q_ENABLE, Q_NOFF, Q_DESC, Q_AVAIL, Q_USED = 22, 24, 26, 28, 30, 32, 40, 48
# the legacy header
L_HOST_FEATURES, L_GUEST_FEATURES, L_PFN, L_NUM, L_SEL, L_NOTIFY, L_STATUS, L_ISR = 0, 4, 8, 12, 14, 16, 18, 19
L_CONFIG_VECTOR, L_QUEUE_VECTOR = 20, 22


def bits(*numbers):
    value = 0
    for n in numbers:
        value |= 1 << n
    return value


class Regs:
    """Region access through a device fd: ``read(size, offset)`` / ``write(data, offset)`` like pread/pwrite."""

    def __init__(self, pread, pwrite):
        self._pread = pread
        self._pwrite = pwrite

    def bar_read(self, bar, off, size):
        return int.from_bytes(self._pread(size, (bar << OFFSET_SHIFT) + off), "little")

    def bar_write(self, bar, off, size, value):
        self._pwrite(value.to_bytes(size, "little"), (bar << OFFSET_SHIFT) + off)

    def cfg_read(self, off, size):
        return self.bar_read(CONFIG_REGION, off, size)

    def cfg_write(self, off, size, value):
        self.bar_write(CONFIG_REGION, off, size, value)

    @classmethod
    def of(cls, vdev):
        return cls(vdev.read, vdev.write)


class Memory:
    """The driver's DMA memory: one window at ``base``, handed out by a bump allocator."""

    def __init__(self, base, size, read, write):
        self.base = base
        self.end = base + size
        self._next = base
        self.read = read          # read(iova, n) -> bytes
        self.write = write        # write(iova, data)

    @classmethod
    def over(cls, window, base):
        """Memory over a bytearray the fake IOMMU maps at ``base``."""
        def read(iova, n):
            return bytes(window[iova - base:iova - base + n])

        def write(iova, data):
            window[iova - base:iova - base + len(data)] = data
        return cls(base, len(window), read, write)

    def alloc(self, size, align=16):
        addr = -(-self._next // align) * align
        if addr + size > self.end:
            raise MemoryError("the test's DMA window is full")
        self._next = addr + size
        self.write(addr, bytes(size))
        return addr

    def u16(self, iova):
        return struct.unpack("<H", self.read(iova, 2))[0]

    def put_u16(self, iova, value):
        self.write(iova, struct.pack("<H", value))


class DriverQueue:
    """The driver's side of one split virtqueue."""

    def __init__(self, mem, index, size, legacy):
        self.mem, self.index, self.size = mem, index, size
        if legacy:
            avail_end = 16 * size + 6 + 2 * size
            used_off = -(-avail_end // 4096) * 4096
            self.desc = mem.alloc(used_off + 6 + 8 * size, 4096)
            self.avail = self.desc + 16 * size
            self.used = self.desc + used_off
        else:
            self.desc = mem.alloc(16 * size, 16)
            self.avail = mem.alloc(6 + 2 * size, 2)
            self.used = mem.alloc(6 + 8 * size, 4)
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self.writable = {}       # head -> [(iova, len)] the device may write
        self.chains = {}         # head -> descriptor indexes, to free them

    def _put_desc(self, table, i, addr, length, flags, nxt=0):
        self.mem.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def add(self, out=(), ins=(), indirect=False):
        """Offer a chain: ``out`` byte strings the device reads, ``ins`` sizes it writes."""
        segs = [(self.mem.alloc(max(len(d), 1)), len(d), 0) for d in out]
        for (addr, _, _), data in zip(segs, out):
            self.mem.write(addr, data)
        writable = [(self.mem.alloc(n), n) for n in ins]
        segs += [(addr, n, DESC_F_WRITE) for addr, n in writable]
        if indirect:
            table = self.mem.alloc(16 * len(segs))
            for i, (addr, n, flags) in enumerate(segs):
                last = i == len(segs) - 1
                self._put_desc(table, i, addr, n, flags | (0 if last else DESC_F_NEXT), i + 1 if not last else 0)
            segs = [(table, 16 * len(segs), DESC_F_INDIRECT)]
        used = [self.free.pop(0) for _ in segs]
        for i, (addr, n, flags) in enumerate(segs):
            last = i == len(segs) - 1
            self._put_desc(self.desc, used[i], addr, n, flags | (0 if last else DESC_F_NEXT),
                           used[i + 1] if not last else 0)
        head = used[0]
        self.chains[head] = used
        self.writable[head] = writable
        self.offer(head)
        return head

    def offer(self, head):
        """Put ``head`` in the available ring (not yet published)."""
        self.mem.put_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def publish(self):
        self.mem.put_u16(self.avail + 2, self.avail_idx)

    def used_idx(self):
        return self.mem.u16(self.used + 2)

    def take_used(self):
        """The used entries since the last look: [(head, len)]; their descriptors go back to the free list."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            pos = self.last_used % self.size
            head, length = struct.unpack("<II", self.mem.read(self.used + 4 + 8 * pos, 8))
            out.append((head, length))
            self.free.extend(self.chains.pop(head, [head]))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def written(self, head, length):
        """The first ``length`` bytes the device wrote into chain ``head``."""
        data = b""
        for addr, n in self.writable.get(head, []):
            take = min(n, length - len(data))
            data += self.mem.read(addr, take)
        return data

    # what the driver tells the device (and reads back)
    def set_avail_flags(self, flags):
        self.mem.put_u16(self.avail, flags)

    def set_used_event(self, value):
        self.mem.put_u16(self.avail + 4 + 2 * self.size, value)

    def used_flags(self):
        return self.mem.u16(self.used)

    def avail_event(self):
        return self.mem.u16(self.used + 4 + 8 * self.size)


class VirtioNetDriver:
    """Brings the device up and moves frames, on the legacy or the modern interface."""

    def __init__(self, regs, mem, legacy=False):
        self.regs, self.mem, self.legacy = regs, mem, legacy
        self.queues = {}
        self.features = 0
        self.caps = self._find_caps()

    # -- discovery (what vp_modern_probe / virtio_read_caps do) ---------------------------------
    def _find_caps(self):
        caps = {}
        for pos, cap_id in capability_offsets(self.regs.cfg_read).items():
            if cap_id == 0x09:
                cfg_type = self.regs.cfg_read(pos + 3, 1)
                caps[cfg_type] = (pos, self.regs.cfg_read(pos + 4, 1), self.regs.cfg_read(pos + 8, 4),
                                  self.regs.cfg_read(pos + 12, 4))
            elif cap_id == 0x11:
                caps["msix"] = pos
        return caps

    def _common(self, off, size, value=None):
        _, bar, base, _ = self.caps[1]
        if value is None:
            return self.regs.bar_read(bar, base + off, size)
        self.regs.bar_write(bar, base + off, size, value)

    def _legacy(self, off, size, value=None):
        if value is None:
            return self.regs.bar_read(0, off, size)
        self.regs.bar_write(0, off, size, value)

    # -- status and features --------------------------------------------------------------------
    def status(self):
        return self._legacy(L_STATUS, 1) if self.legacy else self._common(STATUS, 1)

    def set_status(self, value):
        if self.legacy:
            self._legacy(L_STATUS, 1, value)
        else:
            self._common(STATUS, 1, value)

    def device_features(self):
        if self.legacy:
            return self._legacy(L_HOST_FEATURES, 4)
        self._common(DFSELECT, 4, 0)
        low = self._common(DF, 4)
        self._common(DFSELECT, 4, 1)
        return low | self._common(DF, 4) << 32

    def write_features(self, value):
        if self.legacy:
            self._legacy(L_GUEST_FEATURES, 4, value & 0xFFFFFFFF)
            return
        for sel in (0, 1):
            self._common(GFSELECT, 4, sel)
            self._common(GF, 4, (value >> (32 * sel)) & 0xFFFFFFFF)

    def negotiate(self, wanted):
        """Reset, ACK, DRIVER, features (FEATURES_OK on modern); True when the device took them."""
        self.set_status(0)
        self.set_status(ACK)
        self.set_status(ACK | DRIVER)
        self.features = wanted & self.device_features()
        self.write_features(self.features)
        if self.legacy:
            return True
        self.set_status(ACK | DRIVER | FEATURES_OK)
        return bool(self.status() & FEATURES_OK)

    # -- queues -----------------------------------------------------------------------------------------
    def select(self, index):
        if self.legacy:
            self._legacy(L_SEL, 2, index)
        else:
            self._common(Q_SELECT, 2, index)

    def queue_size(self, index):
        self.select(index)
        return self._legacy(L_NUM, 2) if self.legacy else self._common(Q_SIZE, 2)

    def setup_queue(self, index, size=None):
        dev_size = self.queue_size(index)
        size = size or dev_size
        q = DriverQueue(self.mem, index, size, self.legacy)
        self.select(index)
        if self.legacy:
            self._legacy(L_PFN, 4, q.desc >> 12)
        else:
            self._common(Q_SIZE, 2, size)
            for off, addr in ((Q_DESC, q.desc), (Q_AVAIL, q.avail), (Q_USED, q.used)):
                self._common(off, 4, addr & 0xFFFFFFFF)
                self._common(off + 4, 4, addr >> 32)
            self._common(Q_ENABLE, 2, 1)
        self.queues[index] = q
        return q

    def _set_vector(self, legacy_off, modern_off, vector):
        """Write an MSI-X vector register and read it back (NO_VECTOR: the device refused it)."""
        reg = self._legacy if self.legacy else self._common
        off = legacy_off if self.legacy else modern_off
        reg(off, 2, vector)
        return reg(off, 2)

    def set_queue_vector(self, index, vector):
        self.select(index)
        return self._set_vector(L_QUEUE_VECTOR, Q_MSIX, vector)

    def set_config_vector(self, vector):
        return self._set_vector(L_CONFIG_VECTOR, MSIX_CONFIG, vector)

    def notify(self, index):
        if self.legacy:
            self._legacy(L_NOTIFY, 2, index)
            return
        pos, bar, base, _ = self.caps[2]
        mult = self.regs.cfg_read(pos + 16, 4)
        self.select(index)
        self.regs.bar_write(bar, base + self._common(Q_NOFF, 2) * mult, 2, index)

    def isr(self):
        if self.legacy:
            return self._legacy(L_ISR, 1)
        _, bar, base, _ = self.caps[3]
        return self.regs.bar_read(bar, base, 1)

    def config(self, off, size):
        """Device config: after the legacy header (24 bytes while MSI-X is on), or the modern region."""
        if self.legacy:
            msix = self.regs.cfg_read(self.caps["msix"] + 2, 2) & 0x8000
            return self._legacy((24 if msix else 20) + off, size)
        _, bar, base, _ = self.caps[4]
        return self.regs.bar_read(bar, base + off, size)

    def mac(self):
        return bytes(self.config(i, 1) for i in range(6))

    def generation(self):
        return self._common(GENERATION, 1)

    # -- the whole bring-up ----------------------------------------------------------------------
    def bring_up(self, extra=(), rx_buffers=8, rx_size=1526, queue_size=None, ctrl=True):
        wanted = bits(*NET_FEATURES, *extra) | (0 if self.legacy else bits(F_VERSION_1))
        if not ctrl:
            wanted &= ~bits(F_CTRL_VQ, F_CTRL_RX, F_CTRL_VLAN, F_GUEST_ANNOUNCE, F_CTRL_MAC_ADDR)
        assert self.negotiate(wanted), "FEATURES_OK refused"
        self.setup_queue(0, queue_size)
        self.setup_queue(1, queue_size)
        if ctrl:
            self.setup_queue(2)
        self.post_rx(rx_buffers, rx_size)
        self.set_status(ACK | DRIVER | DRIVER_OK | (0 if self.legacy else FEATURES_OK))
        return self

    @property
    def hdr_len(self):
        return 12 if self.features & bits(F_MRG_RXBUF, F_VERSION_1) else 10

    def post_rx(self, count, size, notify=False):
        rx = self.queues[0]
        for _ in range(count):
            rx.add(ins=[size])
        rx.publish()
        if notify:
            self.notify(0)

    def send(self, frame, split=False, indirect=False, header=None, notify=True):
        header = bytes(self.hdr_len) if header is None else header
        parts = [header, frame[:20], frame[20:]] if split else [header, frame] if indirect else [header + frame]
        tx = self.queues[1]
        head = tx.add(out=[p for p in parts if p], indirect=indirect)
        tx.publish()
        if notify:
            self.notify(1)
        return head

    def received(self):
        """Frames in the used receive ring: [(header, frame)], mergeable buffers joined."""
        rx = self.queues[0]
        out = []
        used = rx.take_used()
        i = 0
        while i < len(used):
            head, length = used[i]
            data = rx.written(head, length)
            header, payload = data[:self.hdr_len], data[self.hdr_len:]
            count = struct.unpack_from("<H", header, 10)[0] if self.features & bits(F_MRG_RXBUF) else 1
            for head, length in used[i + 1:i + count]:
                payload += rx.written(head, length)
            out.append((header, payload))
            i += count
        return out

    def command(self, cls, cmd, data=b""):
        """A control-queue command, processed at the notify; the ack byte (None if not answered)."""
        ctrl = self.queues[2]
        head = ctrl.add(out=[bytes([cls, cmd]), data] if data else [bytes([cls, cmd])], ins=[1])
        ctrl.publish()
        self.notify(2)
        for used_head, length in ctrl.take_used():
            if used_head == head:
                return ctrl.written(head, length)[0] if length else None
        return None


def ether(dst, src, payload=b"x" * 50, ethertype=0x88B5):
    """An Ethernet frame (0x88b5: local experimental ethertype)."""
    return bytes(dst) + bytes(src) + struct.pack(">H", ethertype) + payload
