"""DmaList (the dma_list rb-tree's stand-in) against a plain sorted list, with chunks split and emptied often."""

import random

import pytest

from cuse_vfio.iommu import DmaList, DmaMapping

U64 = (1 << 64) - 1


class TinyChunks(DmaList):
    LOAD = 2


def naive_find(dmas, start, size):
    # vfio_find_dma: overlap, or for size 0 "contains start without starting at it"
    end = (start + size) & U64
    hits = [d for d in dmas if d.iova < end and d.end > start]
    return hits[-1] if hits else None


@pytest.mark.parametrize("seed", range(5))
def test_matches_a_sorted_list(seed):
    rng = random.Random(seed)
    lst, model = TinyChunks(), []
    for step in range(3000):
        if model and rng.random() < 0.45:
            dma = rng.choice(model)
            lst.remove(dma)
            model.remove(dma)
        else:
            page = rng.randrange(0, 400)
            npages = rng.randrange(1, 4)
            iova, size = page * 0x1000, npages * 0x1000
            if naive_find(model, iova, size) is None:
                dma = DmaMapping(iova, size, 0, 3, None)
                lst.insert(dma)
                model.append(dma)
                model.sort(key=lambda d: d.iova)
        assert len(lst) == len(model)
        if step % 7:
            continue
        assert list(lst) == model
        for _ in range(5):
            x = rng.randrange(0, 410 * 0x1000)
            size = rng.choice([0, 1, 0x1000, 0x5000])
            assert lst.find(x, size) is naive_find(model, x, size)
            inside = [d for d in model if d.iova <= x < d.end]
            assert lst.containing(x) is (inside[0] if inside else None)
            assert list(lst.walk_from(x)) == [d for d in model if d.end > x]
            assert list(lst.walk_at_or_after(x)) == [d for d in model if d.iova >= x]
        for i, dma in enumerate(model):
            assert lst.successor(dma) is (model[i + 1] if i + 1 < len(model) else None)


def test_find_with_an_end_that_wraps_finds_nothing():
    lst = DmaList()
    lst.insert(DmaMapping(0x1000, 0x1000, 0, 3, None))
    assert lst.find((1 << 64) - 0x1000, 0x1000) is None
    assert lst.find(0x1800, 0) is lst.containing(0x1800)
    assert lst.find(0x1000, 0) is None     # size 0 at a mapping's first byte: the kernel's rb walk goes left


def test_remove_unknown_and_clear():
    lst = DmaList()
    a = DmaMapping(0x1000, 0x1000, 0, 3, None)
    with pytest.raises(KeyError):
        lst.remove(a)
    lst.insert(a)
    assert lst.clear() == [a] and len(lst) == 0 and list(lst) == []
