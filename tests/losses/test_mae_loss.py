"""MAE's masking and loss against independent, deliberately naive computations."""
from __future__ import annotations

import statistics

import pytest
import torch

from ssl_vit.losses.mae import mae_loss, patchify, unpatchify
from ssl_vit.methods.mae_masking import kept_patches, random_masking


def naive_patch_vector(image: torch.Tensor, i: int, j: int, p: int) -> list[float]:
    """Patch (i, j) as the paper lays it out: rows, then columns, then channels fastest."""
    return [float(image[ch, i * p + r, j * p + c]) for r in range(p) for c in range(p) for ch in range(image.shape[0])]


def naive_mae_loss(images, pred, mask, p, norm_pix):
    total, count = 0.0, 0
    rows, cols = images.shape[2] // p, images.shape[3] // p
    for b in range(images.shape[0]):
        for i in range(rows):
            for j in range(cols):
                index = i * cols + j
                if mask[b, index] != 1:
                    continue
                target = naive_patch_vector(images[b], i, j, p)
                if norm_pix:
                    mu, var = statistics.fmean(target), statistics.variance(target)  # unbiased
                    target = [(t - mu) / (var + 1e-6) ** 0.5 for t in target]
                err = [(float(pred[b, index, k]) - t) ** 2 for k, t in enumerate(target)]
                total += sum(err) / len(err)
                count += 1
    return total / count


def test_patchify_layout_is_row_column_channel_and_unpatchify_inverts_it():
    images = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                assert patches[b, i * 3 + j].tolist() == naive_patch_vector(images[b], i, j, 4)
    assert torch.equal(unpatchify(patches, 4, (2, 3)), images)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_matches_naive_loss_over_removed_patches(norm_pix):
    torch.manual_seed(0)
    images = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    pred = torch.randn(3, 4, 48, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 0]], dtype=torch.float64)
    got = mae_loss(images, pred, mask, 4, norm_pix_loss=norm_pix)
    assert got.item() == pytest.approx(naive_mae_loss(images, pred, mask, 4, norm_pix), rel=1e-6)
    # Kept patches do not count: changing their prediction leaves the loss as it is.
    changed = pred.clone()
    changed[mask == 0] += 100.0
    assert mae_loss(images, changed, mask, 4, norm_pix).item() == pytest.approx(got.item(), rel=1e-12)


def test_norm_pix_uses_the_unbiased_variance_plus_1e_6():
    # One constant patch: variance 0, so the target is (x - mean) / sqrt(1e-6) = 0 and a
    # prediction of 1 costs exactly 1; a two-valued patch tells the unbiased from the biased variance.
    images = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    images[0, 0, 0, 0] = 1.0  # 12 values: one 1, eleven 0
    mask = torch.ones(1, 1, dtype=torch.float64)
    target = patchify(images, 2)[0, 0]
    mean, unbiased = target.mean(), target.var(unbiased=True)
    expected_target = (target - mean) / (unbiased + 1e-6).sqrt()
    loss_at_truth = mae_loss(images, expected_target.view(1, 1, -1), mask, 2, norm_pix_loss=True)
    assert loss_at_truth.item() == pytest.approx(0.0, abs=1e-20)
    biased_target = (target - mean) / (target.var(unbiased=False) + 1e-6).sqrt()
    assert mae_loss(images, biased_target.view(1, 1, -1), mask, 2, norm_pix_loss=True).item() > 1e-4


def test_kept_count_truncates_and_mask_one_means_removed():
    # L = 10, ratio 0.75: int(2.5) = 2 patches kept.
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.05, 0.7, 0.3, 0.8, 0.6, 0.2, 0.4]])
    ids_keep, mask, ids_restore = random_masking(torch.zeros(1, 10, 4), 0.75, noise)
    assert ids_keep.tolist() == [[3, 1]]  # the two smallest noises, smallest first
    assert mask.tolist() == [[1, 0, 1, 0, 1, 1, 1, 1, 1, 1]]
    # Truncation, not rounding: 49 x 0.25 = 12.25 -> 12; 10 x 0.29 = 2.9 -> 2 (rounding: 3).
    assert [kept_patches(49, 0.75), kept_patches(36, 0.75), kept_patches(10, 0.71)] == [12, 9, 2]


def test_ids_restore_puts_kept_then_removed_tokens_back_in_patch_order():
    torch.manual_seed(1)
    batch, length = 4, 16
    noise = torch.rand(batch, length)
    ids_keep, mask, ids_restore = random_masking(torch.zeros(batch, length), 0.6, noise)
    for b in range(batch):
        order = sorted(range(length), key=lambda i: float(noise[b, i]))  # naive argsort
        keep = int(length * (1 - 0.6))
        assert ids_keep[b].tolist() == order[:keep]
        shuffled = order  # kept first, then removed, as the decoder concatenates them
        restored = [shuffled[int(r)] for r in ids_restore[b]]
        assert restored == list(range(length))
        assert [int(m) for m in mask[b]] == [0 if i in order[:keep] else 1 for i in range(length)]


def test_random_masking_without_noise_draws_a_different_mask_per_sample():
    torch.manual_seed(0)
    _, mask, _ = random_masking(torch.zeros(64, 49, 8), 0.75)
    assert (mask.sum(1) == 49 - 12).all()
    assert len({tuple(m.tolist()) for m in mask}) == 64


@pytest.mark.parametrize("ratio, message", [
    (0.0, r"method.mask_ratio=0.0; allowed: a number in \(0, 1\)"),
    (1.0, r"method.mask_ratio=1.0; allowed: a number in \(0, 1\)"),
    (-0.1, r"allowed: a number in \(0, 1\)"),
    (0.99, r"keeps int\(36 x \(1 - 0.99\)\) = 0 of the 36 patches"),
])
def test_mask_ratio_outside_range_or_keeping_nothing_is_refused(ratio, message):
    with pytest.raises(ValueError, match=message):
        random_masking(torch.zeros(2, 36), ratio)


def test_bad_noise_shape_is_refused():
    with pytest.raises(ValueError, match=r"noise must have shape \(B, L\) = \(2, 9\)"):
        random_masking(torch.zeros(2, 9), 0.5, torch.rand(2, 8))
