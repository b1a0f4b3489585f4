"""The dma_entry_limit of mappings (65535) keeps map, unmap and translate fast."""

import time

import pytest

from cuse_vfio.iommu import IommuFault
from cuse_vfio.uapi import VFIO_DMA_UNMAP_FLAG_ALL
from test_iommu_common import PAGE, RW, Client, fails

LIMIT = 65535


def per_op(fn, n):
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n


def test_65535_mappings_then_enospc_and_lookups_stay_fast():
    c = Client()
    iommu = c.iommu
    buf = c.buffer(2 * PAGE)
    space = iommu.dma_space
    # every other page, so no two mappings are adjacent
    started = time.perf_counter()
    for i in range(LIMIT):
        iommu.map(0x100000 + 2 * i * PAGE, PAGE, buf, RW, c.p)
    fill = time.perf_counter() - started
    assert len(iommu.mappings()) == LIMIT and iommu.dma_avail == 0
    # the 65536th through the ioctl: ENOSPC
    fails("ENOSPC", c.map, 0x100000 + 2 * LIMIT * PAGE, PAGE, vaddr=buf)

    last = 0x100000 + 2 * (LIMIT - 1) * PAGE
    space.dma_write(last + 8, b"last")
    assert c.memory.read(buf + 8, 4) == b"last"
    with pytest.raises(IommuFault):
        space.dma_read(last + PAGE, 1)          # the hole after the last mapping

    # unmap a few in the middle through the ioctl, and map them again
    for k in (1, LIMIT // 2, LIMIT - 2):
        assert c.unmap(0x100000 + 2 * k * PAGE, PAGE) == PAGE
    assert iommu.dma_avail == 3
    for k in (1, LIMIT // 2, LIMIT - 2):
        c.map(0x100000 + 2 * k * PAGE, PAGE, vaddr=buf)
    assert c.unmap(0, 0, flags=VFIO_DMA_UNMAP_FLAG_ALL) == LIMIT * PAGE
    assert iommu.dma_avail == LIMIT
    # "a few seconds at most" for everything above, filling included
    assert fill < 10


def test_per_operation_cost_does_not_grow_with_the_number_of_mappings(capsys):
    costs = {}
    for n in (10, LIMIT - 100):
        c = Client()
        iommu, buf = c.iommu, c.buffer(PAGE)
        for i in range(n):
            iommu.map(0x100000 + 2 * i * PAGE, PAGE, buf, RW, c.p)
        space = iommu.dma_space
        top = 0x100000 + 2 * n * PAGE
        mid = 0x100000 + 2 * (n // 2) * PAGE
        costs[n] = {
            "translate": per_op(lambda i: space.translate(mid + (i % 64) * 8, 8), 2000),
            "dma_read": per_op(lambda i: space.dma_read(mid + (i % 64) * 8, 8), 2000),
            "map+unmap (ioctl)": per_op(lambda i: (c.map(top + 2 * (i % 50) * PAGE, PAGE, vaddr=buf),
                                                   c.unmap(top + 2 * (i % 50) * PAGE, PAGE)), 500),
            "map+unmap (in the middle)": per_op(lambda i: (iommu.unmap(mid, PAGE),
                                                           iommu.map(mid, PAGE, buf, RW, c.p)), 500),
        }
    with capsys.disabled():
        for n, ops in costs.items():
            print(f"\n  n={n:5d}: " + ", ".join(f"{op} {cost * 1e6:.1f} us" for op, cost in ops.items()), end="")
        print()
    for op in costs[10]:
        # O(log n): a 6500x larger table may cost a little more, never 10x
        assert costs[LIMIT - 100][op] < 10 * costs[10][op] + 20e-6, (op, costs)
