"""Block masking (iBOT / DINOv2): the official law (default) and the bounded law (option).

Expected values are worked out independently in the tests (enumerating shapes by hand, bounding
boxes of the mask, a naive port of the official rule written here with plain Python ``random``
and lists) or are fixed figures measured with the released DINOv2 ``MaskingGenerator``; none is
read back from the implementation.
"""
import math
import random

import numpy as np
import pytest
import torch

from ssl_vit.data.collate import MultiCropCollator
from ssl_vit.data.masking import BlockMaskGenerator

MIN_ASPECT, MAX_ASPECT = 0.3, 1 / 0.3
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
# Measured with the released DINOv2 MaskingGenerator (max_num_patches = 0.5 * N, min 4, aspect
# 0.3 .. 1/0.3), over 3,000 masks per ratio on 14x14 and 16x16 grids, target int(N * ratio): it
# hits the target exactly in 89-93% of masks and falls short by about 0.1 patch on average. The
# thresholds leave room for sampling noise (the standard error of a 3,000-mask rate near 0.9 is
# about 0.0055, of a mean shortfall about 0.006).
OFFICIAL_MIN_EXACT_RATE = 0.86
OFFICIAL_MAX_MEAN_SHORTFALL = 0.15
# Two means agree when they differ by at most Z_TOL standard errors of their difference.
Z_TOL = 4.5


def _naive_official_mask(rows, cols, target, rnd, min_p=4, max_p=None, tries=10):
    """The official DINOv2 rule, written as plainly as possible.

    ``rnd`` needs ``uniform(a, b)`` (``a + (b - a) * u``, also for ``b < a``) and
    ``randint(a, b)`` (both ends included), e.g. a ``random.Random``. Returns
    ``(mask as a list of lists, number of blocks)``.
    """
    if max_p is None:
        max_p = int(0.5 * rows * cols)
    log_lo, log_hi = math.log(MIN_ASPECT), math.log(MAX_ASPECT)
    mask = [[False] * cols for _ in range(rows)]
    count = blocks = 0
    while count < target:
        budget = min(target - count, max_p)
        added = 0
        for _ in range(tries):
            area = rnd.uniform(min_p, budget)
            aspect = math.exp(rnd.uniform(log_lo, log_hi))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < cols and h < rows:
                top = rnd.randint(0, rows - h)
                left = rnd.randint(0, cols - w)
                cells = [(i, j) for i in range(top, top + h) for j in range(left, left + w)]
                new = sum(1 for i, j in cells if not mask[i][j])
                if 0 < new <= budget:
                    for i, j in cells:
                        mask[i][j] = True
                    added = new
                    break
        if added == 0:
            break
        count += added
        blocks += 1
    return mask, blocks


def _border_count(mask):
    """Masked cells in the first / last row or column (``mask``: list of lists or array)."""
    rows, cols = len(mask), len(mask[0])
    return sum(
        bool(mask[i][j])
        for i in range(rows)
        for j in range(cols)
        if i in (0, rows - 1) or j in (0, cols - 1)
    )


def _agree(a, b, z=Z_TOL):
    """``|mean(a) - mean(b)| <= z`` standard errors of the difference of the two means."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    return abs(a.mean() - b.mean()) <= z * se + 1e-12, (a.mean(), b.mean(), se)


def _hit_stats(gen, side, n_masks, rng):
    """Per ratio: (target, exact-hit rate, mean shortfall, max count) over ``n_masks`` masks."""
    out = []
    for ratio in RATIOS:
        target = int(side * side * ratio)
        counts = np.array([int(gen(target, rng=rng).sum()) for _ in range(n_masks)])
        out.append((target, (counts == target).mean(), (target - counts).mean(), counts.max()))
    return out


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
    assert gen.law == "official" and gen.max_attempts == 10  # the released DINOv2 law by default
    assert not gen(0).any()


@pytest.mark.parametrize("law", ["official", "bounded"])
@pytest.mark.parametrize("grid", [(8, 8), (7, 7), (4, 6), (16, 16)])
def test_never_more_than_target(grid, law):
    gen = BlockMaskGenerator(grid, law=law)
    rng = np.random.default_rng(1)
    n = grid[0] * grid[1]
    for target in range(0, n + 1):
        for _ in range(8 if n > 100 else 15):
            assert int(gen(target, rng=rng).sum()) <= target


@pytest.mark.parametrize("law", ["official", "bounded"])
@pytest.mark.parametrize("grid", [(8, 8), (16, 16)])
def test_mean_coverage_close_to_target(grid, law):
    gen = BlockMaskGenerator(grid, law=law)
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
def test_bounded_single_rectangle_respects_size_and_aspect(area):
    # min = max = target = area: the first rectangle must cover exactly `area` patches, and then
    # nothing is missing, so every non-empty mask is one solid rectangle we can measure.
    gen = BlockMaskGenerator((8, 8), min_num_patches=area, max_num_patches=area, law="bounded")
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


def test_bounded_target_four_gives_a_two_by_two_block():
    # 2x2 is the only shape of 4 patches with aspect in [0.3, 1/0.3] (1x4 has 0.25)
    gen = BlockMaskGenerator((8, 8), law="bounded")
    rng = np.random.default_rng(4)
    for _ in range(200):
        m = gen(4, rng=rng).numpy()
        if m.any():
            r0, r1, c0, c1 = _bounding_box(m)
            assert (r1 - r0, c1 - c0) == (2, 2) and m.sum() == 4


@pytest.mark.parametrize("grid", [(8, 8), (7, 7), (16, 16)])
def test_bounded_every_rectangle_within_bounds(grid):
    gen = BlockMaskGenerator(grid, law="bounded")
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


@pytest.mark.parametrize("law", ["official", "bounded"])
def test_reproducible_with_seed_and_generator(law):
    a = BlockMaskGenerator((8, 8), seed=7, law=law)
    b = BlockMaskGenerator((8, 8), seed=7, law=law)
    c = BlockMaskGenerator((8, 8), seed=8, law=law)
    ma = [a(20) for _ in range(5)]
    mb = [b(20) for _ in range(5)]
    mc = [c(20) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(ma, mb))
    assert not all(torch.equal(x, y) for x, y in zip(ma, mc))

    gen = BlockMaskGenerator((8, 8), law=law)
    r1 = [gen(20, rng=np.random.default_rng(11)) for _ in range(3)]
    r2 = [gen(20, rng=np.random.default_rng(11)) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(r1, r2))
    t1 = gen(20, rng=torch.Generator().manual_seed(3))
    t2 = gen(20, rng=torch.Generator().manual_seed(3))
    assert torch.equal(t1, t2)

    torch.manual_seed(0)
    s1 = [BlockMaskGenerator((8, 8), law=law)(20) for _ in range(3)]
    torch.manual_seed(0)
    s2 = [BlockMaskGenerator((8, 8), law=law)(20) for _ in range(3)]
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
        (dict(grid=(1, 8), max_num_patches=8), "no rectangle"),  # official: h < rows = 1
        (dict(grid=(8, 1), max_num_patches=8, law="bounded"), "no rectangle"),
        (dict(grid=(8, 8), law="dinov2"), r"law must be one of .*'official'.*'bounded'.*'dinov2'"),
        (dict(grid=(8, 8), law=None), "law"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BlockMaskGenerator(**kwargs)


def test_bad_target():
    with pytest.raises(ValueError, match="num_masking_patches"):
        BlockMaskGenerator((8, 8))(-1)


# ---------------------------------------------------------------- the official law (default)
@pytest.mark.parametrize("side", [14, 16])
def test_default_hits_target_like_released_dinov2(side):
    """Fixed expectations from the released generator: 3,000 masks per ratio, default settings."""
    gen = BlockMaskGenerator(side)  # the default law, no option passed
    for target, exact, shortfall, top in _hit_stats(gen, side, 3000, np.random.default_rng(side)):
        assert top <= target
        assert exact >= OFFICIAL_MIN_EXACT_RATE, (side, target, exact)
        assert shortfall <= OFFICIAL_MAX_MEAN_SHORTFALL, (side, target, shortfall)


@pytest.mark.parametrize("side", [14, 16])
def test_bounded_law_misses_the_official_figures(side):
    """Control: the bounded law (the old default) fails the thresholds above at every ratio, by a
    wide margin (it hits its target in 30-67% of masks and falls short by 0.4-0.9 patch), so a
    regression to it would be caught; 300 masks per ratio are plenty for that."""
    gen = BlockMaskGenerator(side, law="bounded")
    for target, exact, shortfall, top in _hit_stats(gen, side, 300, np.random.default_rng(side)):
        assert top <= target
        assert exact < OFFICIAL_MIN_EXACT_RATE - 0.1, (side, target, exact)
        assert shortfall > OFFICIAL_MAX_MEAN_SHORTFALL + 0.1, (side, target, shortfall)


@pytest.mark.parametrize("side", [6, 16])
def test_default_agrees_with_naive_official_port(side):
    """Same law as the naive port (plain ``random``, lists): per ratio, the mean masked count, the
    mean number of masked border cells (sensitive to the strict ``h < rows, w < cols`` rule and
    the corner law) and the mean number of blocks per mask (sensitive to the area law) agree
    within Z_TOL = 4.5 standard errors of their difference (estimated from the two samples; a
    false alarm would have odds of about 1e-5 per comparison). The bounded law, as a control,
    does not agree."""
    n_masks = 800
    gen = BlockMaskGenerator(side)
    bounded = BlockMaskGenerator(side, law="bounded")
    rng, rnd = np.random.default_rng(100 + side), random.Random(200 + side)
    bounded_disagrees = 0
    for ratio in (0.1, 0.3, 0.5):
        target = int(side * side * ratio)
        ours = {"count": [], "border": [], "blocks": []}
        naive = {"count": [], "border": [], "blocks": []}
        for _ in range(n_masks):
            mask, rects = gen.generate(target, rng=rng)
            ours["count"].append(int(mask.sum()))
            ours["border"].append(_border_count(mask))
            ours["blocks"].append(len(rects))
            m, blocks = _naive_official_mask(side, side, target, rnd)
            naive["count"].append(sum(map(sum, m)))
            naive["border"].append(_border_count(m))
            naive["blocks"].append(blocks)
        for key in ours:
            ok, info = _agree(ours[key], naive[key])
            assert ok, (side, ratio, key, info)
        mask_counts = [int(bounded(target, rng=rng).sum()) for _ in range(n_masks)]
        bounded_disagrees += not _agree(mask_counts, naive["count"])[0]
    assert bounded_disagrees >= 2


class _SharedUniforms:
    """``random``-like source fed by ``numpy.random.default_rng(seed).random()`` numbers in order:
    ``uniform(a, b) = a + (b - a) * u`` and ``randint(a, b) = a + floor(u * (b - a + 1))``."""

    def __init__(self, seed):
        self._rng = np.random.default_rng(seed)
        self._buf = []

    def _next(self):
        if not self._buf:
            self._buf = self._rng.random(1000).tolist()[::-1]
        return self._buf.pop()

    def uniform(self, a, b):
        return a + (b - a) * self._next()

    def randint(self, a, b):
        return a + int(self._next() * (b - a + 1))


@pytest.mark.parametrize("grid", [(6, 6), (7, 12), (16, 16)])
def test_default_equals_naive_port_on_the_same_uniforms(grid):
    """The default law takes U[0, 1) numbers from the Generator in order (area, aspect, then top
    and left when the shape fits), as documented: fed the same numbers, the naive port draws the
    very same masks, for every target."""
    rows, cols = grid
    gen = BlockMaskGenerator(grid)
    n = rows * cols
    for target in list(range(0, n + 1, max(1, n // 40))) + [n]:
        for k in range(4):
            seed = 1000 * target + k
            mask, rects = gen.generate(target, rng=np.random.default_rng(seed))
            expected, blocks = _naive_official_mask(rows, cols, target, _SharedUniforms(seed))
            assert mask.tolist() == expected, (grid, target, k)
            assert len(rects) == blocks


@pytest.mark.parametrize("grid", [(6, 6), (7, 12), (16, 16)])
def test_official_blocks(grid):
    """The official law's blocks: windows strictly inside the grid whose union is the mask, each
    adding 1 .. min(missing, max_num_patches) new patches; unlike the bounded law, blocks of 1-3
    patches (finishing a mask) and rounded shapes outside the aspect bounds (1 x 4) do occur."""
    rows, cols = grid
    gen = BlockMaskGenerator(grid)
    rng = np.random.default_rng(7)
    n = rows * cols
    small = off_aspect = 0
    for target in range(1, n + 1, max(1, n // 24)):
        for _ in range(12):
            mask, rects = gen.generate(target, rng=rng)
            union = np.zeros(grid, dtype=bool)
            count = 0
            for top, left, h, w in rects:
                assert 1 <= h < rows and 1 <= w < cols
                assert 0 <= top <= rows - h and 0 <= left <= cols - w
                before = int(union.sum())
                union[top : top + h, left : left + w] = True
                new = int(union.sum()) - before
                assert 0 < new <= min(target - count, gen.max_num_patches)
                count += new
                small += h * w < 4
                off_aspect += not (MIN_ASPECT - 1e-9 <= h / w <= MAX_ASPECT + 1e-9)
            assert np.array_equal(union, mask) and count == int(mask.sum()) <= target
    assert small > 0 and off_aspect > 0


def test_collated_batch_masks_as_many_patches_as_naive_port():
    """64 global crops at 16x16 (32 samples x 2), default ratios 0.1-0.5, mask probability 0.5:
    32 crops masked with stratified targets. The mean of ``n_masked_patches`` over 100 batches
    matches the naive port of the same pipeline (stratified targets + naive official masks,
    about 2439 patches a batch: 32 * (256 * 0.3 - 0.5 for the floor - ~0.09 short)) within
    Z_TOL = 4.5 standard errors of the difference (a batch's total varies by ~5 patches, mostly
    from the targets, so the tolerance is ~3.5 patches); the bounded law, ~15 patches fewer a
    batch (0.4-0.9 short per crop), falls outside it."""
    n_batches, side, n_crops = 100, 16, 64
    batch = [([torch.zeros(1, 1, 1), torch.zeros(1, 1, 1)], 0) for _ in range(n_crops // 2)]
    coll = MultiCropCollator(BlockMaskGenerator(side), seed=0)
    ours = [int(coll(batch)["n_masked_patches"]) for _ in range(n_batches)]
    assert coll.num_masked_crops(n_crops) == 32

    rnd = random.Random(1)
    n, lo, hi, k = side * side, 0.1, 0.5, 32
    edges = [lo + (hi - lo) * i / k for i in range(k + 1)]
    naive = []
    for _ in range(n_batches):
        total = 0
        for i in range(k):
            target = int(n * rnd.uniform(edges[i], edges[i + 1]))
            total += sum(map(sum, _naive_official_mask(side, side, target, rnd)[0]))
        naive.append(total)
    ok, info = _agree(ours, naive)
    assert ok, info
    assert 2420 < np.mean(naive) < 2450

    coll_b = MultiCropCollator(BlockMaskGenerator(side, law="bounded"), seed=0)
    bounded = [int(coll_b(batch)["n_masked_patches"]) for _ in range(n_batches)]
    assert not _agree(bounded, naive)[0] and np.mean(bounded) < np.mean(naive)
