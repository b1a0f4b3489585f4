"""The calls one interrupt of edu behind vfio-pci costs, in-process: a count load cannot move.

    irq_calls.py

edu's raise-IRQ and ack writes arrive as pwrites of the device fd
(``VfioPciDevice.write``), INTx's unmask as its SET_IRQS ioctl; the MSI or
INTx trigger is a real non-blocking eventfd (as QEMU's and DPDK's are),
fetched as the transport fetches a client's (``ClientEventfd``) and read
after each raise.  Counted: the Python function calls and the calls into C
(builtins, methods of C types) of each step, from the device fd's entry
point, and apart from that inside edu's register write (``Edu.mmio_write``)
or vfio-pci's ``Interrupts.set_irqs``: the interrupt's own work, without the
region access around it (the BAR path, measured by the table's BAR pwrite).
"""

import os
import sys
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from devices_fakes import FakeArg, cfg_write, fds, irq_set  # noqa: E402

from cuse_vfio.devices.edu import REG_IRQ_ACK, REG_IRQ_RAISE, Edu  # noqa: E402
from cuse_vfio.devices.vfio_pci import VfioPciDevice  # noqa: E402
from cuse_vfio.memory import fetch_fd  # noqa: E402
from cuse_vfio.transport.eventfd import ClientEventfd, EventfdPoller  # noqa: E402
from cuse_vfio.uapi import (  # noqa: E402
    VFIO_DEVICE_SET_IRQS,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX,
)

#: where the interrupt's own work starts
INNER = {"mmio_write", "set_irqs"}


class Caller:
    """The client behind the ioctls: its eventfds are fetched as the transport fetches them."""

    pid = os.getpid()
    memory = None

    def __init__(self, poller: EventfdPoller):
        self.poller = poller

    def get_eventfd(self, fd: int) -> ClientEventfd:
        return ClientEventfd(fetch_fd(self.pid, fd), self.poller)


def count(fn, *args) -> Counter:
    """Calls made by ``fn(*args)``: all of them, and those inside an ``INNER`` function."""
    n: Counter = Counter()
    inner = [0]

    def profile(frame, event, arg):
        if event == "call":
            n["py"] += 1
            if inner[0] or frame.f_code.co_name in INNER:
                inner[0] += 1
                n["inner py"] += 1
        elif event == "return" and inner[0]:
            inner[0] -= 1
        elif event == "c_call" and arg is not sys.setprofile:
            n["c"] += 1
            n["inner c"] += 1 if inner[0] else 0

    sys.setprofile(profile)
    fn(*args)
    sys.setprofile(None)
    return n


def main() -> None:
    poller = EventfdPoller()
    print("Calls per interrupt of edu behind vfio-pci, in-process (device-fd access | edu's or SET_IRQS's own)")
    print(f"{'step':32} {'Python':>7} {'C':>5} | {'Python':>7} {'C':>5}")
    try:
        for index, name in ((VFIO_PCI_MSI_IRQ_INDEX, "MSI"), (VFIO_PCI_INTX_IRQ_INDEX, "INTx")):
            vdev = VfioPciDevice(Edu(manual_time=True))
            vdev.open()
            cfg_write(vdev, 4, 2, 0x2)  # memory decoding on
            caller = Caller(poller)
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            vdev.ioctl(VFIO_DEVICE_SET_IRQS, FakeArg(irq_set(
                flags=VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, index=index, count=1,
                data=fds(efd)), caller))
            one = (1).to_bytes(4, "little")
            unmask = irq_set(flags=VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK, index=index, count=1)
            steps = [("raise-IRQ write", vdev.write, one, REG_IRQ_RAISE)]
            if index == VFIO_PCI_INTX_IRQ_INDEX:
                steps += [("ack write", vdev.write, one, REG_IRQ_ACK),
                          ("unmask (SET_IRQS)", lambda: vdev.ioctl(VFIO_DEVICE_SET_IRQS, FakeArg(unmask, caller)))]
            total: Counter = Counter()
            for _ in range(2):  # the first round warms up (caches, the eventfd guard thread)
                total = Counter()
                lines = []
                for label, fn, *args in steps:
                    n = count(fn, *args)
                    if label.startswith("raise") and os.eventfd_read(efd) != 1:
                        raise SystemExit(f"irq_calls: the {name} raise did not signal its eventfd once")
                    total += n
                    lines.append(f"  {name + ' ' + label:30} {n['py']:7} {n['c']:5} | "
                                 f"{n['inner py']:7} {n['inner c']:5}")
            print("\n".join(lines))
            if len(steps) > 1:
                print(f"  {name + ' whole cycle':30} {total['py']:7} {total['c']:5} | "
                      f"{total['inner py']:7} {total['inner c']:5}")
            vdev.release()  # the last close: interrupts off, eventfds let go
            os.close(efd)
    finally:
        poller.stop()


if __name__ == "__main__":
    main()
