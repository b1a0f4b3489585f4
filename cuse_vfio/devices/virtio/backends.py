"""Where a virtio-net device's frames go and come from: loopback, a TAP device, and a pcap record.

A backend has ``attach(device)``, ``transmit(frame)`` (called with the
device lock held, one Ethernet frame the driver sent), ``rx_ready()`` (the
driver gave receive buffers; called with the lock held) and ``close()``.
It hands received frames to the device with ``device.receive_from_backend(frame)``,
which returns False while the receive ring has no room; the backend then
keeps the frame and waits for ``rx_ready``, as QEMU's net queue does.

* :class:`Loopback`: every transmitted frame is received back at once; with no
  receive buffer it is dropped and counted (``rx_dropped_no_buffer``).
* :class:`TapBackend`: an existing TAP interface (``ip tuntap add dev NAME mode
  tap``), attached with TUNSETIFF ``IFF_TAP | IFF_NO_PI``; transmitted frames
  are written to it, a thread reads it and hands frames to the device.
* :class:`PcapWriter`: classic pcap (link type Ethernet) of every frame the
  driver transmits and every frame it is given, flushed after each batch.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Dict, Optional

if TYPE_CHECKING:
    from .net import VirtioNet

log = logging.getLogger(__name__)

# include/uapi/linux/if_tun.h
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16

#: the largest frame read from a TAP (QEMU's NET_BUFSIZE is 4096 + 65536)
TAP_READ_SIZE = 69632

PCAP_MAGIC = 0xA1B2C3D4
PCAP_SNAPLEN = 262144
LINKTYPE_ETHERNET = 1


class BackendError(ValueError):
    """A backend cannot be set up; the message names it and the fix."""


class PcapWriter:
    """Frames to a classic pcap file (microsecond timestamps, Ethernet)."""

    def __init__(self, path: str):
        try:
            self._file = open(path, "wb")
        except OSError as e:
            raise BackendError(f"cannot write the pcap file {path}: {e.strerror}") from None
        self.path = path
        self._file.write(struct.pack("<IHHiIII", PCAP_MAGIC, 2, 4, 0, 0, PCAP_SNAPLEN, LINKTYPE_ETHERNET))
        self._file.flush()

    def record(self, frame: bytes) -> None:
        now = time.time()
        sec = int(now)
        kept = frame[:PCAP_SNAPLEN]
        self._file.write(struct.pack("<IIII", sec, int((now - sec) * 1e6), len(kept), len(frame)))
        self._file.write(kept)

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class Loopback:
    """Each transmitted frame comes back on the receive queue, or is dropped when it has no buffer."""

    kind = "loopback"

    def __init__(self) -> None:
        self.device: Optional[VirtioNet] = None

    def attach(self, device) -> None:
        self.device = device

    def transmit(self, frame: bytes) -> None:
        device = self.device
        if device is not None:  # a closed loopback drops what is still sent
            device.loop_back(frame)

    def rx_ready(self) -> None:
        pass  # nothing is ever held back

    def close(self) -> None:
        self.device = None


def open_tap(name: str) -> int:
    """An fd attached to the existing TAP ``name`` (non-blocking), or a BackendError saying why not."""
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name:
        raise BackendError(f"{name!r} is not a network interface name (1 to {IFNAMSIZ - 1} bytes, no '/')")
    # TUNSETIFF would create a missing interface: the device only attaches to one the user made.
    # (Asked in this thread's network namespace, which is where TUNSETIFF looks.)
    try:
        socket.if_nametoindex(name)
    except OSError:
        raise BackendError(f"TAP interface {name} does not exist: create it first "
                           f"(ip tuntap add dev {name} mode tap)") from None
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise BackendError("/dev/net/tun is missing: load the tun module (modprobe tun)") from None
        raise BackendError(f"cannot open /dev/net/tun: {e.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError as e:
        os.close(fd)
        reasons: Dict[Optional[int], str] = {
            errno.EBUSY: f"TAP interface {name} is busy: another program has it open",
            errno.EPERM: f"no permission to attach to TAP interface {name}: run as root, or create it "
                         f"for this user (ip tuntap add dev {name} mode tap user USER)",
            errno.EINVAL: f"{name} is not a single-queue TAP interface (another kind of interface, "
                          f"a TUN device, or a TAP created multi_queue)",
        }
        raise BackendError(reasons.get(e.errno, f"cannot attach to TAP interface {name}: {e.strerror}")) from None
    return fd


class TapBackend:
    """An existing TAP interface: frames written on transmit, read by a thread and received."""

    kind = "tap"

    def __init__(self, name: str):
        self.name = name
        self.fd = open_tap(name)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stop = False
        self._waiting = False
        self._thread: Optional[threading.Thread] = None
        self.device: Optional[VirtioNet] = None
        self._write_failed = False

    def attach(self, device) -> None:
        self.device = device
        self._thread = threading.Thread(target=self._run, name=f"tap-{self.name}", daemon=True)
        self._thread.start()

    def transmit(self, frame: bytes) -> None:
        try:
            os.write(self.fd, frame)
            self._write_failed = False
        except OSError as e:
            assert self.device is not None  # only an attached device transmits
            self.device.stats["tx_dropped_backend"] += 1
            if not self._write_failed:  # once per run of failures, not once per frame
                log.warning("%s: writing a frame to TAP %s failed (%s): frames are dropped until it works "
                            "(is the interface up?)", self.device.name, self.name, e.strerror)
            self._write_failed = True

    def rx_ready(self) -> None:
        if self._waiting:
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # a wake-up is already pending

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 64):
                pass
        except BlockingIOError:
            pass

    def _run(self) -> None:
        device = self.device
        assert device is not None  # attach() set it before starting this thread
        held: Optional[bytes] = None
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        poller.register(self.fd, select.POLLIN)
        while not self._stop:
            if held is None:
                poller.modify(self.fd, select.POLLIN)
                try:
                    held = os.read(self.fd, TAP_READ_SIZE)
                except BlockingIOError:
                    poller.poll()
                    self._drain_wake()
                    continue
                except OSError as e:
                    log.error("%s: reading TAP %s failed (%s): no more frames from it",
                              device.name, self.name, e.strerror)
                    return
            self._waiting = True
            if device.receive_from_backend(held):
                held = None
                self._waiting = False
                continue
            # the ring is full: stop reading the TAP (its own queue holds on) until buffers come
            poller.modify(self.fd, 0)
            poller.poll()
            self._drain_wake()

    def close(self) -> None:
        self._stop = True
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)
        for fd in (self.fd, self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.fd = self._wake_r = self._wake_w = -1
