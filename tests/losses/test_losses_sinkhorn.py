"""Sinkhorn-Knopp: naive reference with exactly 3 iterations, fp32, rows sum to 1, no center."""
import pytest
import torch

import loss_naive_refs as ref
from ssl_vit.losses import DINOLoss, IBOTPatchLoss, sinkhorn_knopp


def _logits(B=6, K=5, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, K, generator=gen) * scale


def test_matches_naive_reference_with_three_iterations():
    x, temp = _logits(), 0.1
    expected = torch.tensor(ref.sinkhorn(ref.to_lists(x), temp, n_iterations=3), dtype=torch.float32)
    got = sinkhorn_knopp(x, temp)
    assert got.shape == x.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n_iterations", [2, 4])
def test_two_or_four_iterations_differ_from_the_three_iteration_reference(n_iterations):
    x, temp = _logits(seed=1), 0.1
    expected3 = torch.tensor(ref.sinkhorn(ref.to_lists(x), temp, n_iterations=3), dtype=torch.float32)
    expected_n = torch.tensor(ref.sinkhorn(ref.to_lists(x), temp, n_iterations=n_iterations), dtype=torch.float32)
    got_n = sinkhorn_knopp(x, temp, n_iterations=n_iterations)
    torch.testing.assert_close(got_n, expected_n, rtol=1e-5, atol=1e-7)  # the knob does what it says
    # and the difference to 3 iterations is far above float32 noise
    assert (got_n - expected3).abs().max().item() > 1e-3
    assert (sinkhorn_knopp(x, temp) - expected3).abs().max().item() < 1e-5  # the default is 3


def test_each_sample_row_sums_to_one():
    got = sinkhorn_knopp(_logits(B=7, K=11, seed=2), 0.05)
    torch.testing.assert_close(got.sum(dim=-1), torch.ones(7), rtol=0, atol=1e-6)
    assert (got >= 0).all()


def test_computed_in_fp32_even_for_half_inputs():
    """Logits up to ~3 at temperature 0.04: exp(75) overflows float16 (max 65504) but not
    float32; the result must be finite, float32, and equal to the reference on the same values."""
    x = (_logits(seed=3).clamp(-3, 3)).half()
    assert torch.isinf(torch.exp(x / 0.04)).any()  # in half precision it would overflow
    got = sinkhorn_knopp(x, 0.04)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    expected = torch.tensor(ref.sinkhorn(ref.to_lists(x.float()), 0.04), dtype=torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_explicit_total_count_equals_implicit_one_on_a_single_process():
    x = _logits(seed=4)
    torch.testing.assert_close(sinkhorn_knopp(x, 0.1, n_masked_tokens=x.shape[0]), sinkhorn_knopp(x, 0.1))
    torch.testing.assert_close(
        sinkhorn_knopp(x, 0.1, n_masked_tokens=torch.tensor([x.shape[0]])), sinkhorn_knopp(x, 0.1)
    )


def test_no_center_is_used():
    x, temp = _logits(seed=5), 0.07
    plain = sinkhorn_knopp(x, temp)
    for loss in (DINOLoss(x.shape[1]), IBOTPatchLoss(x.shape[1])):
        loss.center.copy_(torch.randn(1, x.shape[1]) * 5)
        center_before = loss.center.clone()
        if isinstance(loss, DINOLoss):
            got = loss.sinkhorn_teacher(x, temp)
        else:
            got = loss.sinkhorn_teacher(x, temp, x.shape[0])
        assert torch.equal(got, plain)
        assert torch.equal(loss.center, center_before)


def test_no_gradient_flows():
    x = _logits(seed=6).requires_grad_()
    assert not sinkhorn_knopp(x, 0.1).requires_grad
