"""The host-side cost of one 4 KiB NVMe Read, in-process, against a bare 4 KiB DMA write measured alongside.

    nvme_read.py [N] [ROUNDS]        (default 5000 commands a round, 7 rounds)

The model runs inline (as with ``io_thread = false``) behind vfio-pci, with a
fake IOMMU (one mapped window): a round places N Read commands one at a
time, each rung with its own SQ tail doorbell write on the device (what a
trapped guest MMIO becomes), and times the doorbell write, which fetches the
command, reads the file, moves the 4 KiB, posts the completion and signals
MSI-X.  The CQ head doorbell is not timed.  A second target submits 32
commands per doorbell (the batched path).  The baseline is ``dma.write`` of
4 KiB through the same DmaPort and IOMMU.  Rounds of the targets alternate,
and each reports its median round, so a load that comes and goes falls on
all of them alike.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cuse_vfio.devices.nvme import spec  # noqa: E402
from devices_fakes import region_offset  # noqa: E402
from nvme_host import ready_host, sqe  # noqa: E402


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    host = ready_host(queue_size=1024, size="64M")
    try:
        q = host.queues[1]
        buf = host.alloc(4096)
        data = bytes(4096)
        sq_db, cq_db = region_offset(0, spec.REG_DBS + 8), region_offset(0, spec.REG_DBS + 12)
        write, dma = host.vdev.write, host.fn.dma

        def submit(count, batch):
            total = 0.0
            for _ in range(count // batch):
                for i in range(batch):
                    host.write(q.sq_base + q.tail * 64, sqe(spec.NVM_READ, i, nsid=1, prp1=buf, cdw10=i, cdw12=7))
                    q.tail = (q.tail + 1) % q.size
                t0 = time.perf_counter()
                write(q.tail.to_bytes(4, "little"), sq_db)
                total += time.perf_counter() - t0
                q.cq_head = (q.cq_head + batch) % q.cq_size
                write(q.cq_head.to_bytes(4, "little"), cq_db)
            return total / count

        def baseline(count):
            t0 = time.perf_counter()
            for _ in range(count):
                dma.write(buf, data)
            return (time.perf_counter() - t0) / count

        targets = {"dma.write 4 KiB": baseline, "read, 1 per doorbell": lambda c: submit(c, 1),
                   "read, 32 per doorbell": lambda c: submit(c, 32)}
        for fn in targets.values():
            fn(n // 10)
        results = {name: [] for name in targets}
        for _ in range(rounds):
            for name, fn in targets.items():
                results[name].append(fn(n))
        base = statistics.median(results["dma.write 4 KiB"])
        if host.fn.error_log.count or not host.fn.running:
            raise SystemExit("nvme_read.py: a benchmark command failed (see the error log page)")
        print(f"NVMe model, in-process (fake IOMMU, inline rounds): {n} commands a round, median of {rounds}")
        print(f"{'per command':<24} {'cost':>10} {'ratio':>8}")
        for name in targets:
            value = statistics.median(results[name])
            print(f"{name:<24} {value * 1e6:7.1f} µs {value / base:7.1f}x")
    finally:
        host.close()


if __name__ == "__main__":
    main()
