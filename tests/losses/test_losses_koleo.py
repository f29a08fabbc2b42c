"""KoLeo: naive O(n^2) reference, eps placement, self exclusion, batch of one."""
import math

import pytest
import torch

import loss_naive_refs as ref
from ssl_vit.losses import koleo_loss


@pytest.mark.parametrize("n,D,seed", [(2, 3, 0), (5, 4, 1), (9, 16, 2)])
def test_matches_naive_quadratic_loop(n, D, seed):
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    assert koleo_loss(x).item() == pytest.approx(ref.koleo(ref.to_lists(x)), rel=1e-12)
    # float32 and half inputs are computed in float32
    assert koleo_loss(x.float()).item() == pytest.approx(ref.koleo(ref.to_lists(x)), rel=1e-5, abs=1e-6)
    assert koleo_loss(x.half()).dtype == torch.float32


def test_hand_value_three_points_self_excluded():
    """(1,0), (0,1), (-1,0) (scaled, normalisation removes it): every point's nearest other
    point by cosine is at distance sqrt(2), so the loss is -log(sqrt 2) up to the 1e-8 terms.
    Were the point itself not excluded, the distance would be ~1e-8 and the loss ~+18."""
    x = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0]], dtype=torch.float64)
    assert koleo_loss(x).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-7)


def test_eps_inside_the_distance_and_before_the_log():
    """Two identical rows in D = 4: x - x_nn = 0, so the distance is ||0 + 1e-8|| =
    sqrt(4) * 1e-8 = 2e-8 and the loss is -log(2e-8 + 1e-8) = -log(3e-8) = 17.321... .
    (eps only before the log: -log(1e-8) = 18.42; eps only inside: -log(2e-8) = 17.73.)"""
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 2, dtype=torch.float64)
    assert koleo_loss(x).item() == pytest.approx(-math.log(3e-8), rel=1e-9)
    assert koleo_loss(x).item() == pytest.approx(ref.koleo(ref.to_lists(x)), rel=1e-9)


def test_normalisation_makes_it_scale_invariant():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert koleo_loss(x * 7.5).item() == pytest.approx(koleo_loss(x).item(), rel=1e-12)


def test_batch_of_one_returns_a_differentiable_zero():
    x = torch.randn(1, 8, requires_grad=True)
    loss = koleo_loss(x)
    assert loss.item() == 0.0 and loss.requires_grad and loss.dim() == 0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_gradients_are_finite_and_flow_to_all_rows():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(4)).requires_grad_()
    koleo_loss(x).backward()
    assert torch.isfinite(x.grad).all() and (x.grad.abs().sum(-1) > 0).all()
