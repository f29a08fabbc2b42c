"""IBOTPatchLoss: per-image mean over masked patches, / number of global crops, own center."""
import math

import pytest
import torch

import loss_naive_refs as ref
from ssl_vit.losses import DINOLoss, IBOTPatchLoss, masked_token_weights


def _setup(seed=0, n_images=4, N=6, K=5):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(n_images, N, K, generator=gen, dtype=torch.float64)
    t = torch.softmax(torch.randn(n_images, N, K, generator=gen, dtype=torch.float64) / 0.3, -1)
    masks = torch.zeros(n_images, N, dtype=torch.bool)
    masks[0, [1, 4]] = True  # 2 masked patches
    masks[2, [0, 2, 3, 5]] = True  # 4 masked patches
    masks[3, 3] = True  # 1 masked patch; image 1 has none
    return s, t, masks


def test_forward_masked_matches_naive_per_image_loop():
    s, t, masks = _setup()
    expected = ref.ibot_masked_loss(ref.to_lists(s), ref.to_lists(t), masks.tolist())
    got = IBOTPatchLoss(s.shape[-1]).forward_masked(s[masks], t[masks], masks)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_hand_computed_value_and_unmasked_images_count_as_zero():
    """K = 2, student logits 0 (uniform prediction): every masked token has CE = log 2
    whatever the one-hot target. Image 0 has 3 masked tokens (mean log 2), image 1 none,
    so with 2 global crops the loss is (log 2 + 0) / 2; appending two more unmasked images
    (4 global crops) halves it: the divisor is the number of global crops, not of masked ones."""
    loss = IBOTPatchLoss(2)
    masks = torch.tensor([[True, True, True, False], [False] * 4])
    s = torch.zeros(3, 2, dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    assert loss.forward_masked(s, t, masks).item() == pytest.approx(math.log(2) / 2, rel=1e-12)
    masks4 = torch.cat([masks, torch.zeros(2, 4, dtype=torch.bool)])
    assert loss.forward_masked(s, t, masks4).item() == pytest.approx(math.log(2) / 4, rel=1e-12)


def test_per_image_mean_not_per_token_mean():
    """Image 0: one masked token with CE a; image 1: three tokens with CE b each.
    Per image: (a + b) / 2. A per-token mean would give (a + 3b) / 4."""
    T = 0.1
    loss = IBOTPatchLoss(2)
    masks = torch.tensor([[True, False, False], [True, True, True]])
    s = torch.tensor([[0.1, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0]] * 4, dtype=torch.float64)
    a = math.log(1 + math.exp(-0.1 / T))  # -log(e / (e + 1))
    b = math.log(2)
    assert loss.forward_masked(s, t, masks).item() == pytest.approx((a + b) / 2, rel=1e-12)


def test_token_weights_and_padding():
    s, t, masks = _setup(seed=1)
    loss = IBOTPatchLoss(s.shape[-1])
    base = loss.forward_masked(s[masks], t[masks], masks)
    w = masked_token_weights(masks)
    expected_w = []
    for row in masks.tolist():  # per token: 1 / (masked patches of its image)
        expected_w += [1.0 / sum(row)] * sum(row) if any(row) else []
    torch.testing.assert_close(w, torch.tensor(expected_w, dtype=torch.float32))
    assert loss.forward_masked(s[masks], t[masks], masks, masks_weight=w).item() == pytest.approx(base.item(), rel=1e-7)
    # rows beyond n_masked_patches (padding up to an upper bound) are ignored
    M = int(masks.sum())
    pad_s = torch.cat([s[masks], torch.randn(3, s.shape[-1], dtype=s.dtype) * 100])
    pad_t = torch.cat([t[masks], torch.rand(3, s.shape[-1], dtype=s.dtype)])
    assert loss.forward_masked(pad_s, pad_t, masks, n_masked_patches=M).item() == pytest.approx(base.item(), rel=1e-12)


def test_forward_all_matches_naive_mean_over_tokens_then_images():
    s, t, _ = _setup(seed=2)
    expected = ref.ibot_all_loss(ref.to_lists(s), ref.to_lists(t))
    assert IBOTPatchLoss(s.shape[-1]).forward_all(s, t).item() == pytest.approx(expected, rel=1e-12)


def test_own_center_softmax_and_ema_over_masked_tokens():
    gen = torch.Generator().manual_seed(3)
    K, temp = 4, 0.07
    ibot, dino = IBOTPatchLoss(K), DINOLoss(K)
    assert ibot.center.shape == (1, K) and ibot.center is not dino.center
    masked = torch.randn(7, K, generator=gen) * 2
    c0 = torch.randn(1, K, generator=gen)
    ibot.center.copy_(c0)
    probs = ibot.softmax_center_teacher(masked, temp)
    expected = ref.centered_softmax(ref.to_lists(masked), ref.to_lists(c0)[0], temp)
    torch.testing.assert_close(probs, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    # (B, N, K) input broadcasts against the (1, K) center as well
    torch.testing.assert_close(ibot.softmax_center_teacher(masked.reshape(1, 7, K), temp)[0], probs)

    ibot.update_center(masked)
    expected_c = ref.center_ema(ref.to_lists(c0)[0], [ref.to_lists(masked)], momentum=0.9)
    torch.testing.assert_close(ibot.center, torch.tensor([expected_c], dtype=torch.float32))
    assert torch.equal(dino.center, torch.zeros(1, K))  # untouched


def test_update_center_with_no_masked_tokens_keeps_center():
    ibot = IBOTPatchLoss(3)
    ibot.center.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    ibot.update_center(torch.zeros(0, 3))
    torch.testing.assert_close(ibot.center, torch.tensor([[1.0, 2.0, 3.0]]))


def test_gradients_reach_masked_student_tokens_only_through_loss():
    s, t, masks = _setup(seed=4)
    s = s.float().requires_grad_()
    loss = IBOTPatchLoss(s.shape[-1]).forward_masked(s[masks], t.float()[masks], masks)
    loss.backward()
    assert torch.all(s.grad[~masks] == 0) and torch.all(s.grad[masks].abs().sum(-1) > 0)
