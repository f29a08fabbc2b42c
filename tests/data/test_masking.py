"""Block masking (iBOT / DINOv2): bounds of every rectangle and statistics of whole masks.

Expected values are worked out independently in the tests (enumerating shapes by hand, bounding
boxes of the mask), not read back from the implementation.
"""
import math

import numpy as np
import pytest
import torch

from ssl_vit.data.masking import BlockMaskGenerator

MIN_ASPECT, MAX_ASPECT = 0.3, 1 / 0.3


def _bounding_box(mask: np.ndarray):
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def _valid_shapes(rows, cols, area_lo, area_hi):
    """Naive enumeration of every h x w shape obeying the paper's bounds."""
    out = set()
    for h in range(1, rows + 1):
        for w in range(1, cols + 1):
            if area_lo <= h * w <= area_hi and MIN_ASPECT - 1e-9 <= h / w <= MAX_ASPECT + 1e-9:
                out.add((h, w))
    return out


def test_output_type_and_shape():
    gen = BlockMaskGenerator((6, 9), seed=0)
    m = gen(10)
    assert isinstance(m, torch.Tensor) and m.dtype == torch.bool and m.shape == (6, 9)
    assert gen.num_patches == 54 and gen.max_num_patches == 27  # default: half of all patches
    assert not gen(0).any()


@pytest.mark.parametrize("grid", [(8, 8), (7, 7), (4, 6), (16, 16)])
def test_never_more_than_target(grid):
    gen = BlockMaskGenerator(grid)
    rng = np.random.default_rng(1)
    n = grid[0] * grid[1]
    for target in range(0, n + 1):
        for _ in range(8 if n > 100 else 15):
            assert int(gen(target, rng=rng).sum()) <= target


@pytest.mark.parametrize("grid", [(8, 8), (16, 16)])
def test_mean_coverage_close_to_target(grid):
    gen = BlockMaskGenerator(grid)
    rng = np.random.default_rng(2)
    n = grid[0] * grid[1]
    total_target = total_got = 0
    for ratio in (0.1, 0.2, 0.3, 0.4, 0.5):
        target = int(n * ratio)
        counts = np.array([gen(target, rng=rng).sum() for _ in range(300)])
        assert counts.max() <= target
        # a little less sometimes, but close on average
        assert counts.mean() >= 0.92 * target, (ratio, counts.mean(), target)
        total_target += 300 * target
        total_got += counts.sum()
    assert total_got / total_target >= 0.96


@pytest.mark.parametrize("area", [4, 6, 8, 9, 12, 16, 32])
def test_single_rectangle_respects_size_and_aspect(area):
    # min = max = target = area: the first rectangle must cover exactly `area` patches, and then
    # nothing is missing, so every non-empty mask is one solid rectangle we can measure.
    gen = BlockMaskGenerator((8, 8), min_num_patches=area, max_num_patches=area)
    rng = np.random.default_rng(3)
    seen = set()
    n_nonempty = 0
    for _ in range(300):
        m = gen(area, rng=rng).numpy()
        if not m.any():
            continue
        n_nonempty += 1
        r0, r1, c0, c1 = _bounding_box(m)
        h, w = r1 - r0, c1 - c0
        assert m[r0:r1, c0:c1].all() and m.sum() == h * w  # one solid block
        assert h * w == area >= 4
        assert MIN_ASPECT - 1e-9 <= h / w <= MAX_ASPECT + 1e-9
        seen.add((h, w))
    assert n_nonempty >= 250
    # every allowed shape shows up (both orientations), no other one does
    assert seen == _valid_shapes(8, 8, area, area)


def test_target_four_gives_a_two_by_two_block():
    # 2x2 is the only shape of 4 patches with aspect in [0.3, 1/0.3] (1x4 has 0.25)
    gen = BlockMaskGenerator((8, 8))
    rng = np.random.default_rng(4)
    for _ in range(200):
        m = gen(4, rng=rng).numpy()
        if m.any():
            r0, r1, c0, c1 = _bounding_box(m)
            assert (r1 - r0, c1 - c0) == (2, 2) and m.sum() == 4


@pytest.mark.parametrize("grid", [(8, 8), (7, 7), (16, 16)])
def test_every_rectangle_within_bounds(grid):
    gen = BlockMaskGenerator(grid)
    rng = np.random.default_rng(5)
    n = grid[0] * grid[1]
    half = n // 2
    areas = []
    for target in list(range(4, n + 1, max(1, n // 16))) + [n]:
        for _ in range(10):
            mask, rects = gen.generate(target, rng=rng)
            union = np.zeros(grid, dtype=bool)
            for top, left, h, w in rects:
                assert 0 <= top and top + h <= grid[0] and 0 <= left and left + w <= grid[1]
                assert 4 <= h * w <= half
                assert MIN_ASPECT - 1e-9 <= h / w <= MAX_ASPECT + 1e-9
                union[top : top + h, left : left + w] = True
                areas.append(h * w)
            # the reported rectangles are exactly what was masked
            assert np.array_equal(union, mask)
            assert mask.sum() <= target
    # large targets do use large rectangles (up to half the grid), not only small ones
    assert max(areas) > half // 2


def test_reproducible_with_seed_and_generator():
    a = BlockMaskGenerator((8, 8), seed=7)
    b = BlockMaskGenerator((8, 8), seed=7)
    c = BlockMaskGenerator((8, 8), seed=8)
    ma = [a(20) for _ in range(5)]
    mb = [b(20) for _ in range(5)]
    mc = [c(20) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(ma, mb))
    assert not all(torch.equal(x, y) for x, y in zip(ma, mc))

    gen = BlockMaskGenerator((8, 8))
    r1 = [gen(20, rng=np.random.default_rng(11)) for _ in range(3)]
    r2 = [gen(20, rng=np.random.default_rng(11)) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(r1, r2))
    t1 = gen(20, rng=torch.Generator().manual_seed(3))
    t2 = gen(20, rng=torch.Generator().manual_seed(3))
    assert torch.equal(t1, t2)

    torch.manual_seed(0)
    s1 = [BlockMaskGenerator((8, 8))(20) for _ in range(3)]
    torch.manual_seed(0)
    s2 = [BlockMaskGenerator((8, 8))(20) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(s1, s2))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(grid=(0, 8)), "grid"),
        (dict(grid=(8, 8), min_num_patches=0), "min_num_patches"),
        (dict(grid=(8, 8), min_num_patches=10, max_num_patches=5), "max_num_patches"),
        (dict(grid=(8, 8), max_num_patches=65), "max_num_patches"),
        (dict(grid=(8, 8), min_aspect=-1.0), "min_aspect"),
        (dict(grid=(8, 8), min_aspect=2.0, max_aspect=1.0), "max_aspect"),
        (dict(grid=(8, 8), max_attempts=0), "max_attempts"),
        (dict(grid=(2, 2)), "max_num_patches"),  # half of 4 patches < 4
        (dict(grid=(1, 8), max_num_patches=8), "no rectangle"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BlockMaskGenerator(**kwargs)


def test_bad_target():
    with pytest.raises(ValueError, match="num_masking_patches"):
        BlockMaskGenerator((8, 8))(-1)
