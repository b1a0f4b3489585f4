"""scripts/bench's DPDK table: testpmd's forwarding rate on the emulated NIC beside DPDK's own ring.

    python tests/bench/dpdk_report.py FLOOR.json EMULATED.json [PROFILED.json]

Each file is what ``tests/testpmd_driver.py rate`` printed (the second and third
under ``cuse-vfio run`` with ``--server-pid parent``, the third with
``--profile``: py-spy's raw output for the server over a window of its own (profiling
slows the server, so the rate comes from the unprofiled run), sampled only
while a thread holds the GIL: the server's Python work, not the time it
spends in the kernel (the FUSE reply, process_vm_readv).  Each sample is
charged to the innermost cuse-vfio frame of its stack (the standard library
and C below it count for that frame), grouped by the part of cuse-vfio the
frame belongs to.
"""

from __future__ import annotations

import collections
import json
import re
import sys
from typing import Dict, List, Optional, Tuple

#: where a cuse-vfio frame's file is -> what that part of the server does per packet
PARTS = (
    ("cuse_vfio/devices/virtio/virtqueue.py", "virtqueues: descriptors, rings, used entries"),
    ("cuse_vfio/devices/virtio/net.py", "virtio-net: frames, headers, receive filter"),
    ("cuse_vfio/devices/virtio/backends.py", "loopback backend"),
    ("cuse_vfio/devices/virtio/", "virtio PCI transport: registers, notify, interrupts"),
    ("cuse_vfio/iommu/", "IOMMU (type1): translating every DMA"),
    ("cuse_vfio/memory/", "client memory: the copier, shared windows"),
    ("cuse_vfio/devices/pci.py", "PCI framework: the DMA port (bus mastering checked in config space)"),
    ("cuse_vfio/devices/vfio_pci.py", "vfio-pci: the region access (split, guarded, routed to the BAR)"),
    ("cuse_vfio/devices/", "other device code"),
    ("cuse_vfio/dispatch/", "dispatch"),
    ("cuse_vfio/core/", "VFIO core"),
    ("cuse_vfio/transport/", "FUSE transport: the C loop's request into Python and back"),
    ("cuse_vfio/", "other cuse-vfio code"),
)
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?):(?P<line>\d+)\)$")


def load(path: str) -> dict:
    with open(path) as f:
        report = json.loads(f.read().strip().splitlines()[-1])
    if "error" in report:
        raise SystemExit(f"dpdk_report: {path}: {report['error']}")
    return report


def profile(path: str) -> Tuple[int, Dict[str, int], Dict[str, int]]:
    """(samples, samples by part, samples by innermost cuse-vfio function)."""
    total, parts, functions = 0, collections.Counter(), collections.Counter()
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            inner = None
            for text in reversed(stack.split(";")):
                m = FRAME.match(text)
                if m and "cuse_vfio/" in m.group("file"):
                    inner = m
                    break
            if inner is None:
                parts["outside cuse-vfio (threads starting, the interpreter)"] += n
                continue
            where = inner.group("file")[inner.group("file").index("cuse_vfio/"):]
            parts[next(label for prefix, label in PARTS if where.startswith(prefix))] += n
            functions[f"{inner.group('function')} ({where})"] += n
    return total, parts, functions


def main(argv: List[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    floor, emulated = load(argv[0]), load(argv[1])
    profiled: Optional[dict] = load(argv[2]) if len(argv) == 3 else None
    fpps = floor["rx"] / floor["seconds"]
    epps = emulated["rx"] / emulated["seconds"]
    print(f"{'testpmd io forwarding, port 0':38} {'frames/s':>14} {'µs/frame':>10}")
    print(f"{'DPDK software ring (net_ring0)':38} {fpps:14,.0f} {1e6 / fpps:10.4f}")
    print(f"{'cuse-vfio virtio-net (loopback)':38} {epps:14,.0f} {1e6 / epps:10.2f}")
    print(f"ratio: the emulated NIC forwards {epps / fpps:.2e} of the ring's rate ({fpps / epps:,.0f}x fewer frames)")
    server, pmd = emulated["server_cpu"] / emulated["rx"], emulated["testpmd_cpu"] / emulated["rx"]
    print(f"CPU per frame on the emulated NIC: cuse-vfio {server * 1e6:.1f} µs, testpmd {pmd * 1e6:.2f} µs: "
          f"the emulator's share {server / (server + pmd):.1%} "
          f"({emulated['rx']:,} frames in {emulated['seconds']:.1f} s; TX {emulated['tx']:,})")
    if profiled:
        spy = profiled["profile"]
        total, parts, functions = profile(spy["file"])
        if not total:
            print(f"no samples in {spy['file']}")
            return 0
        print(f"where cuse-vfio's Python time goes: py-spy at {spy['rate']} samples/s for {spy['seconds']} s, "
              f"the {total} samples that held the GIL:")
        for label, n in parts.most_common():
            print(f"  {n / total:6.1%}  {label}")
        print("  the busiest functions (innermost cuse-vfio frame):")
        for name, n in functions.most_common(8):
            print(f"  {n / total:6.1%}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
