"""Multi-crop collation with DINOv2's stratified, shuffled block masking.

Expected values (strata, counts, weights, indices, combinatorial probabilities) are recomputed
here with naive loops, independently of the implementation.
"""
import math
import pickle

import numpy as np
import pytest
import torch

from ssl_vit.data.collate import MultiCropCollator
from ssl_vit.data.masking import BlockMaskGenerator

GRID = (8, 8)
N = 64


def _const(i, j):
    """Identifiable value of crop j of image i."""
    return float(100 * i + j)


def _batch(b, n_local=2, gsize=32, lsize=16, labels=None):
    samples = []
    for i in range(b):
        crops = [torch.full((3, gsize, gsize), _const(i, j)) for j in range(2)]
        crops += [torch.full((3, lsize, lsize), _const(i, 2 + j)) for j in range(n_local)]
        samples.append((crops, i if labels is None else labels[i]))
    return samples


def _naive_strata(n, lo=0.1, hi=0.5):
    edges = [lo + (hi - lo) * k / n for k in range(n + 1)]
    return [(edges[k], edges[k + 1]) for k in range(n)]


class ExactGenerator:
    """Test double: records each requested target and masks exactly that many random patches."""

    num_patches = N

    def __init__(self):
        self.targets = []

    def __call__(self, target, rng):
        self.targets.append(target)
        m = np.zeros(N, dtype=bool)
        m[rng.choice(N, size=target, replace=False)] = True
        return torch.from_numpy(m.reshape(GRID))


def test_crop_major_stacking_and_labels():
    b, n_local = 3, 4
    coll = MultiCropCollator(BlockMaskGenerator(GRID), seed=0)
    out = coll(_batch(b, n_local=n_local, labels=[5, None, torch.tensor(2)]))
    assert out["global_crops"].shape == (2 * b, 3, 32, 32)
    assert out["local_crops"].shape == (n_local * b, 3, 16, 16)
    for k in range(2):
        for i in range(b):
            assert torch.all(out["global_crops"][k * b + i] == _const(i, k))
    for l in range(n_local):
        for i in range(b):
            assert torch.all(out["local_crops"][l * b + i] == _const(i, 2 + l))
    assert out["labels"].dtype == torch.long
    assert out["labels"].tolist() == [5, -1, 2]
    assert out["masks"].shape == (2 * b, N) and out["masks"].dtype == torch.bool


def test_no_local_crops_gives_empty_tensor():
    out = MultiCropCollator(BlockMaskGenerator(GRID), seed=0)(_batch(2, n_local=0))
    assert out["local_crops"].numel() == 0 and out["local_crops"].shape[0] == 0
    assert out["global_crops"].shape == (4, 3, 32, 32)


@pytest.mark.parametrize("b", [1, 3, 8])
def test_exactly_floor_half_of_global_crops_masked(b):
    coll = MultiCropCollator(BlockMaskGenerator(GRID), seed=b)
    expected = math.floor(0.5 * 2 * b)  # 1, 3, 8
    batch = _batch(b, n_local=0)
    for _ in range(40):
        out = coll(batch)
        n_masked = int(out["masks"].any(dim=1).sum())
        assert n_masked == expected
        assert int(out["n_masked_crops"]) == expected


def test_masked_crop_count_other_probability():
    # 0.3 * 10 = 3 crops (floor of a float product that is 3.0000000000000004)
    coll = MultiCropCollator(ExactGenerator(), mask_probability=0.3, seed=0)
    out = coll(_batch(5, n_local=0))
    assert int(out["masks"].any(dim=1).sum()) == 3
    coll0 = MultiCropCollator(BlockMaskGenerator(GRID), mask_probability=0.0, seed=0)
    out = coll0(_batch(4, n_local=0))
    assert not out["masks"].any()
    assert out["mask_weights"].numel() == 0 and out["masked_indices"].numel() == 0
    assert int(out["n_masked_patches"]) == 0


@pytest.mark.parametrize("b", [1, 3, 4])
def test_one_target_per_stratum(b):
    gen = ExactGenerator()
    coll = MultiCropCollator(gen, seed=1)
    n = math.floor(0.5 * 2 * b)
    strata = _naive_strata(n)
    sums = np.zeros(n)
    n_batches = 400
    for _ in range(n_batches):
        gen.targets.clear()
        out = coll(_batch(b, n_local=0))
        targets = sorted(gen.targets)
        counts = sorted(out["masks"].sum(dim=1).tolist())[-n:]
        assert counts == targets  # exact generator: the masks carry the targets
        for k, (lo, hi) in enumerate(strata):
            assert int(N * lo) <= targets[k] <= int(N * hi), (k, targets, strata)
        sums += targets
    means = sums / n_batches
    for k, (lo, hi) in enumerate(strata):
        # E[int(N * U(lo, hi))] = N * (lo + hi) / 2 - about 0.5
        expected = N * (lo + hi) / 2 - 0.5
        assert abs(means[k] - expected) < 0.6, (k, means[k], expected)


def test_real_masks_follow_strata():
    b = 4
    coll = MultiCropCollator(BlockMaskGenerator(GRID), seed=2)
    n = math.floor(0.5 * 2 * b)
    strata = _naive_strata(n)
    sums = np.zeros(n)
    n_batches = 300
    for _ in range(n_batches):
        counts = sorted(coll(_batch(b, n_local=0))["masks"].sum(dim=1).tolist())
        assert counts[: 2 * b - n] == [0] * (2 * b - n)
        masked = counts[2 * b - n :]
        for k, (lo, hi) in enumerate(strata):
            # the k-th smallest mask can exceed neither its own stratum's cap...
            assert masked[k] <= int(N * hi)
        sums += masked
    means = sums / n_batches
    for k, (lo, hi) in enumerate(strata):
        mid = N * (lo + hi) / 2 - 0.5
        # ...and on average lands near the middle of its stratum (block masks can fall a bit short)
        assert int(N * lo) - 1 <= means[k] <= int(N * hi), (k, means[k])
        assert means[k] >= 0.9 * mid, (k, means[k], mid)


def test_global_crops_of_one_image_masked_independently():
    b = 8
    coll = MultiCropCollator(BlockMaskGenerator(GRID), seed=3)
    n_batches = 300
    both = exactly_one = 0
    per_crop = torch.zeros(2 * b)
    batch = _batch(b, n_local=0)
    for _ in range(n_batches):
        masked = coll(batch)["masks"].any(dim=1)
        per_crop += masked.float()
        g0, g1 = masked[:b], masked[b:]  # crop-major: image i's crops are i and b + i
        both += int((g0 & g1).sum())
        exactly_one += int((g0 ^ g1).sum())
    # 8 of 16 crops masked uniformly at random: P(both crops of an image) = 8/16 * 7/15
    p_both = 8 / 16 * 7 / 15
    p_one = 2 * 8 / 16 * 8 / 15
    assert abs(both / (n_batches * b) - p_both) < 0.04
    assert abs(exactly_one / (n_batches * b) - p_one) < 0.05
    # every crop position is masked about half the time
    assert torch.all((per_crop / n_batches - 0.5).abs() < 0.12)

    # B = 1: one of the two crops is masked, each about half the time
    coll1 = MultiCropCollator(BlockMaskGenerator(GRID), seed=4)
    firsts = 0
    for _ in range(200):
        masked = coll1(_batch(1, n_local=0))["masks"].any(dim=1)
        assert int(masked.sum()) == 1
        firsts += int(masked[0])
    assert 70 <= firsts <= 130


@pytest.mark.parametrize("b", [1, 3, 8])
def test_mask_weights_and_indices(b):
    coll = MultiCropCollator(BlockMaskGenerator(GRID), seed=5)
    for _ in range(10):
        out = coll(_batch(b, n_local=1))
        masks = out["masks"]
        weights, indices = [], []
        for c in range(masks.shape[0]):  # naive loop over crops then patches
            cnt = int(masks[c].sum())
            for p in range(N):
                if masks[c, p]:
                    weights.append(1.0 / cnt)
                    indices.append(c * N + p)
        assert out["masked_indices"].tolist() == indices
        assert torch.allclose(out["mask_weights"], torch.tensor(weights, dtype=torch.float32))
        assert int(out["n_masked_patches"]) == len(indices)
        n_masked_images = int(masks.any(dim=1).sum())
        assert n_masked_images == math.floor(0.5 * 2 * b)
        assert abs(float(out["mask_weights"].sum()) - n_masked_images) < 1e-4
        # the indices address the masked tokens of the flattened (2B*N) patch tokens
        assert torch.all(masks.reshape(-1)[out["masked_indices"]])


def test_reproducible_with_seed_and_picklable():
    batch = _batch(3, n_local=1)
    a = MultiCropCollator(BlockMaskGenerator(GRID), seed=10)
    b = MultiCropCollator(BlockMaskGenerator(GRID), seed=10)
    c = MultiCropCollator(BlockMaskGenerator(GRID), seed=11)
    ma = [a(batch)["masks"] for _ in range(4)]
    mb = [b(batch)["masks"] for _ in range(4)]
    mc = [c(batch)["masks"] for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(ma, mb))
    assert not all(torch.equal(x, y) for x, y in zip(ma, mc))
    # a pickled copy (what DataLoader workers get) continues identically in the main process
    d = pickle.loads(pickle.dumps(a))
    assert torch.equal(a(batch)["masks"], d(batch)["masks"])

    torch.manual_seed(0)
    s1 = MultiCropCollator(BlockMaskGenerator(GRID))(batch)["masks"]
    torch.manual_seed(0)
    s2 = MultiCropCollator(BlockMaskGenerator(GRID))(batch)["masks"]
    assert torch.equal(s1, s2)


class _Crops(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return [torch.full((3, 8, 8), float(i)), torch.full((3, 8, 8), float(i))], i


def test_dataloader_workers_draw_different_reproducible_masks():
    def run():
        torch.manual_seed(123)
        loader = torch.utils.data.DataLoader(
            _Crops(), batch_size=2, num_workers=2,
            collate_fn=MultiCropCollator(BlockMaskGenerator(GRID), seed=0),
        )
        return [out["masks"] for out in loader]

    first, second = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    # batches 0 and 1 come from different workers; their masks must differ
    assert not torch.equal(first[0], first[1])


def test_bad_inputs():
    gen = BlockMaskGenerator(GRID)
    with pytest.raises(ValueError, match="mask_ratio_range"):
        MultiCropCollator(gen, mask_ratio_range=(0.5, 0.1))
    with pytest.raises(ValueError, match="mask_probability"):
        MultiCropCollator(gen, mask_probability=1.5)
    with pytest.raises(ValueError, match="n_global"):
        MultiCropCollator(gen, n_global=0)
    coll = MultiCropCollator(gen, seed=0)
    bad = _batch(2, n_local=1)
    bad[1] = (bad[1][0][:2], 1)
    with pytest.raises(ValueError, match="crops"):
        coll(bad)
    bad = _batch(2, n_local=0)
    bad[1][0][1] = torch.zeros(3, 16, 16)
    with pytest.raises(ValueError, match="shape"):
        coll(bad)
    with pytest.raises(ValueError, match="empty"):
        coll([])
