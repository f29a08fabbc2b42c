"""Stochastic depth by DINOv2's subset law (``model.drop_path_law``, models/stochastic_depth.py):
each residual branch reaches a random subset of exactly k = max(int(B(1-p)), 1) samples of a
group, scaled by B / k, and is computed on those samples only. Checked against a plain
reference (the branch on every sample, added at the same drawn indices), across every forward
path of the backbone, by the work it skips, and by which law each method trains with."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ssl_vit.build import build_datamodule, build_method
from ssl_vit.models.block import Block
from ssl_vit.models.stochastic_depth import kept_subset
from ssl_vit.models.vision_transformer import VisionTransformer
from tests.methods.training_helpers import TINY, compose_train
from tests.models.forward_comparison import assert_same_outputs_and_grads, outputs_and_grads, small_model


@pytest.mark.parametrize("batch,drop_prob,kept", [(10, 0.3, 7), (16, 0.5, 8), (10, 0.95, 1), (3, 0.1, 2)])
def test_the_subset_has_a_fixed_size_and_distinct_samples(batch, drop_prob, kept):
    torch.manual_seed(0)
    counts = torch.zeros(batch)
    for _ in range(2000):
        indices, scale = kept_subset(batch, drop_prob, torch.device("cpu"))
        assert indices.shape == (kept,) and indices.unique().numel() == kept
        assert scale == batch / kept
        counts[indices] += 1
    # Every sample is kept with probability k / B (binomial, 2000 draws: within 5 standard deviations).
    p = kept / batch
    assert torch.all((counts / 2000 - p).abs() <= 5 * (p * (1 - p) / 2000) ** 0.5 + 1e-9)


def _reference_block(block: Block, x: torch.Tensor) -> torch.Tensor:
    """The law written out: both branches on every sample, added (scaled) at the drawn indices."""
    batch = x.shape[0]
    kept = max(int(batch * (1 - block.drop_path1.drop_prob)), 1)
    first = torch.randperm(batch)[:kept]
    attn = block.ls1(block.attn(block.norm1(x)))
    y = x + torch.zeros_like(x).index_copy(0, first, attn[first] * (batch / kept))
    second = torch.randperm(batch)[:kept]
    mlp = block.ls2(block.mlp(block.norm2(y)))
    return y + torch.zeros_like(y).index_copy(0, second, mlp[second] * (batch / kept))


def test_a_block_adds_each_branch_to_its_subset_only():
    torch.manual_seed(0)
    block = Block(32, 4, init_values=0.1, drop_path=0.4).train()
    block.drop_path_law = "subset"
    x = torch.randn(10, 5, 32, requires_grad=True)
    torch.manual_seed(3)
    out = block(x)
    torch.manual_seed(3)
    expected = _reference_block(block, x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    (grad,) = torch.autograd.grad(out.sin().sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.sin().sum(), x)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)
    # 4 of the 10 samples miss each branch: a sample that missed both passes through unchanged.
    torch.manual_seed(3)
    first, second = torch.randperm(10)[:6], torch.randperm(10)[:6]
    untouched = sorted(set(range(10)) - set(first.tolist()) - set(second.tolist()))
    assert untouched and torch.equal(out[untouched], x[untouched])
    block.eval()  # without training, no drop path: both branches on every sample, unscaled
    y = x + block.ls1(block.attn(block.norm1(x)))
    torch.testing.assert_close(block(x), y + block.ls2(block.mlp(block.norm2(y))), rtol=0, atol=1e-6)


@pytest.mark.parametrize("path", ["packed", "pruned", "checkpointed", "packed-pruned"])
def test_every_forward_path_draws_the_same_subsets(path):
    """Multi-crop with masks: the per-group path (branches on the kept samples) against packed
    crops and the pruned last block (the same draws as per-sample factors) and checkpointing
    (the recomputation redraws the same subsets)."""
    images = [torch.randn(6, 3, 16, 16), torch.randn(18, 3, 8, 8)]
    masks = [torch.rand(6, 16) < 0.4, None]
    model = small_model(drop_path_rate=0.5, drop_path_uniform=True)
    model.set_drop_path_law("subset")

    def run(pack=False, prune=False, checkpointed=False):
        model.set_crop_packing(pack)
        model.set_last_block_pruning(prune)
        model.set_grad_checkpointing(checkpointed)
        return outputs_and_grads(model, lambda: model.forward_cls_and_patches(images, masks, [masks[0], None]),
                                 "x_norm_clstoken", "x_norm_selected_patchtokens")

    reference = run()
    other = run(pack="packed" in path, prune="pruned" in path, checkpointed=path == "checkpointed")
    assert_same_outputs_and_grads(*reference, *other)


def _block_flops(law: str, drop_prob: float) -> int:
    torch.manual_seed(0)
    block = Block(64, 4, drop_path=drop_prob).train()
    block.drop_path_law = law
    x = torch.randn(16, 10, 64, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        block(x).sum().backward()
    return counter.get_total_flops()


def test_the_subset_law_computes_the_branches_on_the_kept_samples_only():
    full = _block_flops("bernoulli", 0.5)
    assert _block_flops("subset", 0.0) == full
    assert _block_flops("subset", 0.5) == full // 2  # 8 of 16 samples: half of every product
    assert _block_flops("subset", 0.25) == full * 12 // 16


@pytest.mark.parametrize("method,law", [("dinov2", "subset"), ("dino", "bernoulli"), ("dinov2", "bernoulli"),
                                        ("dino", "subset")])
def test_each_method_trains_with_its_official_law_unless_told(method, law):
    official = {"dinov2": "subset", "dino": "bernoulli"}[method]
    override = [] if law == official else [f"model.drop_path_law={law}"]
    cfg = compose_train(TINY + [f"method={method}", "model.drop_path_rate=0.1"] + override)
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    built = build_method(cfg, datamodule)
    backbones = [m for m in built.modules() if isinstance(m, VisionTransformer)]
    assert len(backbones) == 2 and {b.drop_path_law for m in backbones for b in m.blocks} == {law}


def test_a_bad_law_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"drop path law must be one of \('bernoulli', 'subset'\), got 'all'"):
        small_model().set_drop_path_law("all")
