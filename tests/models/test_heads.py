"""The DINO head: shape, weight-normalised prototypes, bottleneck normalisation, init."""
import math

import pytest
import torch
import torch.nn.functional as F

from ssl_vit.models.heads import DINOHead


def make_head(norm_last_layer=True, **kw):
    torch.manual_seed(0)
    args = dict(in_dim=24, out_dim=40, hidden_dim=32, bottleneck_dim=16, nlayers=3)
    args.update(kw)
    return DINOHead(norm_last_layer=norm_last_layer, **args)


def naive_head(head: DINOHead, x: torch.Tensor) -> torch.Tensor:
    """A deliberately plain re-implementation with per-sample / per-prototype loops."""
    lin = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    v = head.last_layer.weight_v.detach()
    g = head.last_layer.weight_g.detach()
    out = torch.empty(x.shape[0], v.shape[0], dtype=torch.float64)
    for b in range(x.shape[0]):
        h = x[b].double()
        for i, layer in enumerate(lin):
            h = layer.weight.detach().double() @ h + layer.bias.detach().double()
            if i < len(lin) - 1:  # exact (erf) GELU
                h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
        h = h / max(math.sqrt(float((h * h).sum())), 1e-12)
        for k in range(v.shape[0]):
            row = v[k].double()
            w = g[k, 0].double() * row / math.sqrt(float((row * row).sum()))
            out[b, k] = (w * h).sum()
    return out


def test_output_shape_and_structure():
    head = make_head()
    assert head(torch.randn(5, 24)).shape == (5, 40)
    assert head(torch.randn(2, 3, 24)).shape == (2, 3, 40)  # patch tokens (iBOT)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert head.mlp[0].in_features == 24 and head.mlp[4].out_features == 16
    assert not hasattr(head.last_layer, "bias") or head.last_layer.bias is None
    # Defaults are the papers': hidden 2048, bottleneck 256, 3 layers.
    big = DINOHead(8, 10)
    assert big.mlp[0].out_features == 2048 and big.mlp[-1].out_features == 256
    assert big.last_layer.weight_v.shape == (10, 256)


def test_matches_naive_reimplementation():
    head = make_head(norm_last_layer=False)
    with torch.no_grad():  # a learnt, non-unit gain must be used as well
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    x = torch.randn(4, 24)
    torch.testing.assert_close(head(x).double(), naive_head(head, x), rtol=1e-5, atol=1e-6)


def test_last_layer_rows_unit_norm_and_gain_frozen_with_norm_last_layer():
    head = make_head(norm_last_layer=True)
    g = head.last_layer.weight_g
    assert g.shape == (40, 1) and not g.requires_grad
    assert torch.equal(g, torch.ones(40, 1))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(40))
    # Perturb the direction parameters (as an optimizer would): rows stay unit-norm.
    with torch.no_grad():
        head.last_layer.weight_v.mul_(torch.rand(40, 1) * 5 + 0.1).add_(torch.randn(40, 16))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(40))
    # A backward pass leaves the gain untouched and gives it no gradient.
    head(torch.randn(3, 24)).sum().backward()
    assert g.grad is None and head.last_layer.weight_v.grad is not None
    assert "weight_g" not in {n.split(".")[-1] for n, p in head.named_parameters() if p.requires_grad}


def test_gain_is_learnt_without_norm_last_layer():
    head = make_head(norm_last_layer=False)
    g = head.last_layer.weight_g
    assert g.requires_grad and torch.equal(g, torch.ones(40, 1))  # init 1 in both recipes
    head(torch.randn(3, 24)).pow(2).sum().backward()
    assert g.grad is not None and g.grad.abs().sum() > 0
    with torch.no_grad():
        g.mul_(3.0)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.full((40,), 3.0))


def test_bottleneck_is_l2_normalised():
    head = make_head()
    x = torch.randn(6, 24)
    z = head.bottleneck(x)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(6))
    # Scaling the input of the last layer's normalisation does not change the output.
    raw = head.mlp(x)
    out = head.last_layer(F.normalize(raw, dim=-1))
    out_scaled = head.last_layer(F.normalize(raw * 7.5, dim=-1))
    torch.testing.assert_close(out, out_scaled)
    torch.testing.assert_close(head(x), out)
    # With a bias-free last layer and unit-norm prototypes, every logit is a cosine in [-1, 1].
    assert head(x).abs().max() <= 1.0 + 1e-6


def test_init_trunc_normal_and_zero_bias():
    torch.manual_seed(0)
    head = DINOHead(64, 50, hidden_dim=512, bottleneck_dim=256)
    for m in head.mlp:
        if isinstance(m, torch.nn.Linear):
            assert torch.count_nonzero(m.bias) == 0
            assert m.weight.abs().max() <= 2.0 + 1e-6  # trunc_normal_ default bounds [-2, 2]
            assert abs(m.weight.std().item() - 0.02) < 0.002  # std 0.02 (truncation at 100 sigma)


def test_last_layer_parameters():
    head = make_head()
    params = head.last_layer_parameters()
    assert {id(p) for p in params} == {id(head.last_layer.weight_v), id(head.last_layer.weight_g)}
    assert set(head.last_layer_parameter_names()) == {"last_layer.weight_v", "last_layer.weight_g"}
    # State-dict names match the released checkpoints (torch.nn.utils.weight_norm naming).
    assert {"last_layer.weight_g", "last_layer.weight_v"} <= set(head.state_dict())


@pytest.mark.parametrize("nlayers", [1, 2, 4])
def test_other_depths(nlayers):
    head = make_head(nlayers=nlayers)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == nlayers
    assert head(torch.randn(2, 24)).shape == (2, 40)
