"""The GPU's multi-crop path: each per-token layer (norms, projections, MLP) runs once on the
tokens of every crop size concatenated instead of once per crop size (``attention.tokenwise``).
It must compute what the CPU's group-by-group path computes; run here on the CPU by forcing it
(``attention.CONCATENATE_GROUPS``), outputs and gradients within 1e-5, drop path included."""
from __future__ import annotations

import pytest
import torch

from ssl_vit.models import attention
from ssl_vit.models.attention import tokenwise
from tests.models.forward_comparison import assert_same_outputs_and_grads, outputs_and_grads, small_model


def test_concatenated_groups_give_each_group_its_own_result(monkeypatch):
    layer = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 5))
    xs = [torch.randn(3, 7, 8), torch.randn(5, 2, 8), torch.randn(1, 4, 8)]
    calls = []
    counted = lambda x: calls.append(x.shape) or layer(x)  # noqa: E731
    per_group = tokenwise(counted, xs)
    assert calls == [x.shape for x in xs]
    monkeypatch.setattr(attention, "CONCATENATE_GROUPS", True)
    calls.clear()
    concatenated = tokenwise(counted, xs)
    assert calls == [torch.Size([3 * 7 + 5 * 2 + 4, 8])]  # one call on every token
    for a, b in zip(per_group, concatenated):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", [
    {},
    {"pos_embed": "rope", "num_register_tokens": 2, "ffn_layer": "swiglu"},
], ids=["learned", "rope-registers-swiglu"])
@pytest.mark.parametrize("law", ["bernoulli", "subset"])
def test_the_gpu_path_equals_the_cpu_path(arch, law, monkeypatch):
    images = [torch.randn(6, 3, 16, 16), torch.randn(12, 3, 8, 8)]
    masks = [torch.rand(6, 16) < 0.4, None]
    model = small_model(**arch)
    model.set_drop_path_law(law)

    def run():
        return outputs_and_grads(model, lambda: model.forward_features(images, masks), "x_norm_clstoken",
                                 "x_norm_patchtokens")

    monkeypatch.setattr(attention, "CONCATENATE_GROUPS", False)
    outs, grads = run()
    monkeypatch.setattr(attention, "CONCATENATE_GROUPS", True)
    gpu_outs, gpu_grads = run()
    assert_same_outputs_and_grads(outs, grads, gpu_outs, gpu_grads)
