"""The last block on the tokens a loss reads (``model.prune_last_block``, ``token_selection``):
the [CLS] tokens and the selected patch tokens must come out as the full forward computes them
(outputs and gradients within float reassociation, drop path included), for less work: the
FLOPs saved are exactly the skipped tokens' output projection and MLP, and for groups of
[CLS] rows only also their queries and attention rows."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ssl_vit.build import build_datamodule, build_method
from ssl_vit.models.token_selection import SelectedRows, drop_path_rows
from ssl_vit.models.vision_transformer import VisionTransformer
from tests.methods.training_helpers import compose_train, first_training_batch
from tests.models.forward_comparison import assert_same_outputs_and_grads, outputs_and_grads, small_model


def _model(**arch) -> VisionTransformer:
    return small_model(**arch)


def _selected_outputs_and_grads(model, images, masks, patches, prune: bool):
    model.set_last_block_pruning(prune)
    return outputs_and_grads(model, lambda: model.forward_cls_and_patches(images, masks, patches),
                             "x_norm_clstoken", "x_norm_selected_patchtokens")


@pytest.mark.parametrize("arch,options", [
    ({}, {}),
    ({"num_register_tokens": 2, "ffn_layer": "swiglu"}, {}),
    ({"pos_embed": "rope"}, {}),
    ({}, {"pack_crops": True}),
    ({}, {"grad_checkpointing": True}),
], ids=["learned", "registers-swiglu", "rope", "packed", "checkpointed"])
def test_pruned_last_block_gives_the_full_forwards_tokens(arch, options):
    images = [torch.randn(6, 3, 16, 16), torch.randn(18, 3, 8, 8)]
    masks = [torch.rand(6, 16) < 0.4, None]
    model = _model(**arch)
    model.set_crop_packing(options.get("pack_crops", False))
    model.set_grad_checkpointing(options.get("grad_checkpointing", False))
    patches = [masks[0], None]  # DINOv2: the globals' masked patches, the locals' [CLS] only
    full, full_grads = _selected_outputs_and_grads(model, images, masks, patches, prune=False)
    pruned, pruned_grads = _selected_outputs_and_grads(model, images, masks, patches, prune=True)
    # The unpruned path is the plain forward, selected afterwards.
    torch.manual_seed(1)
    reference = model.forward_features(images, masks)
    assert torch.equal(full[0]["x_norm_selected_patchtokens"], reference[0]["x_norm_patchtokens"][masks[0]].detach())
    assert full[1]["x_norm_selected_patchtokens"].shape == (0, 32)
    assert_same_outputs_and_grads(full, full_grads, pruned, pruned_grads)


def test_forward_returns_the_same_cls_embedding_pruned():
    model = _model().eval()
    images = torch.randn(5, 3, 16, 16)
    full = model.forward_features(images)["x_norm_clstoken"]
    model.set_last_block_pruning(True)
    torch.testing.assert_close(model(images), full, rtol=0, atol=1e-5)
    (local,) = model([torch.randn(3, 3, 8, 8)])
    assert local.shape == (3, 32)


def test_the_flops_saved_are_the_skipped_tokens_projection_and_mlp():
    """Counted by torch's FLOP counter: the pruned forward skips, for every token not returned,
    the last block's output projection (2 D^2) and MLP (2 x 2 D H) and nothing else."""
    model = _model(drop_path_rate=0.0, num_register_tokens=1).eval()
    images = torch.randn(4, 3, 16, 16)
    patches = torch.zeros(4, 16, dtype=torch.bool)
    patches[0, :3] = patches[2, 5] = True
    counts = []
    for prune in (False, True):
        model.set_last_block_pruning(prune)
        with FlopCounterMode(display=False) as counter:
            model.forward_cls_and_patches(images, patches=patches)
        counts.append(counter.get_total_flops())
    tokens, kept, dim, hidden = 4 * (1 + 1 + 16), 4 + 4, 32, 128
    assert counts[0] - counts[1] == (tokens - kept) * (2 * dim * dim + 4 * dim * hidden)


def test_cls_only_groups_skip_the_other_queries_too():
    """Where only the [CLS] rows are wanted, the last block also skips every other token's query
    projection (2 D^2) and attention row (4 T D with the explicit kernel, which the counter sees)."""
    model = _model(drop_path_rate=0.0, num_register_tokens=1).eval()
    model.set_attention_kernel("explicit")
    images = torch.randn(4, 3, 16, 16)
    counts = []
    for prune in (False, True):
        model.set_last_block_pruning(prune)
        with FlopCounterMode(display=False) as counter:
            model.forward_cls_and_patches(images)
        counts.append(counter.get_total_flops())
    batch, tokens, dim, hidden = 4, 1 + 1 + 16, 32, 128
    skipped = batch * (tokens - 1)
    assert counts[0] - counts[1] == skipped * (2 * dim * dim + 4 * dim * hidden + 2 * dim * dim + 4 * tokens * dim)


@pytest.mark.parametrize("kernel", ["sdpa", "explicit"])
@pytest.mark.parametrize("arch", [{}, {"pos_embed": "rope", "num_register_tokens": 2}], ids=["learned", "rope"])
def test_the_cls_query_alone_equals_the_full_attentions_first_row(kernel, arch):
    model = _model(**arch)
    attn = model.blocks[-1].attn
    attn.kernel = kernel
    x = torch.randn(3, 1 + model.num_register_tokens + 16, 32, requires_grad=True)
    rope = model.rope_tables((4, 4))
    full = attn.attend(attn.qkv(x), 3, x.shape[1], rope)[:, 0]
    (grad_full,) = torch.autograd.grad(full.square().sum(), x)
    alone = attn.attend_first_token(x, rope)
    (grad_alone,) = torch.autograd.grad(alone.square().sum(), x)
    torch.testing.assert_close(alone, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_alone, grad_full, rtol=1e-4, atol=1e-6)


def test_selected_rows_and_their_drop_path():
    patches = torch.tensor([[False, True, False], [True, False, True]])
    selection = SelectedRows.of(batch=2, tokens=5, prefix=2, patches=patches, device=torch.device("cpu"))
    # [CLS] rows 0 and 5, then sample 0 patch 1 (row 3) and sample 1 patches 0, 2 (rows 7, 9).
    assert selection.rows.tolist() == [0, 5, 3, 7, 9]
    assert selection.samples.tolist() == [0, 1, 0, 1, 1]
    x = torch.arange(2 * 5 * 1.0).reshape(2, 5, 1)
    assert selection.take(x).flatten().tolist() == [0.0, 5.0, 3.0, 7.0, 9.0]
    cls_only = SelectedRows.of(batch=3, tokens=4, prefix=1, patches=None, device=torch.device("cpu"))
    assert cls_only.rows.tolist() == [0, 4, 8]
    # Drop path: one draw per group, as DropPath draws (B, 1, 1) on the whole group.
    torch.manual_seed(7)
    expected = torch.empty(2, 1, 1).bernoulli_(0.5).flatten()
    torch.manual_seed(7)
    dropped = drop_path_rows(torch.ones(5, 3), [selection], 0.5, training=True)
    assert dropped[:, 0].tolist() == (expected[selection.samples] * 2).tolist()
    assert torch.equal(drop_path_rows(torch.ones(5, 3), [selection], 0.5, training=False), torch.ones(5, 3))


@pytest.mark.parametrize("prune", [True, False])
def test_bad_patch_selection_names_the_expected_shape(prune):
    model = _model()
    model.set_last_block_pruning(prune)
    with pytest.raises(ValueError, match=r"patches must be a bool tensor of shape \(B, N\) = \(2, 16\) or integer "
                                         r"indices of shape \(M,\) in \[0, 32\), got a bool tensor of shape \(2, 9\)"):
        model.forward_cls_and_patches(torch.randn(2, 3, 16, 16), patches=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="got torch.int64 of shape"):
        model.forward_cls_and_patches(torch.randn(2, 3, 16, 16), patches=torch.ones(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="got torch.float32 of shape"):
        model.forward_cls_and_patches(torch.randn(2, 3, 16, 16), patches=torch.ones(3))
    # The range of indices is asserted on the device, without reading them on the host.
    with pytest.raises(RuntimeError, match=r"in \[0, 32\): an index is out of range"):
        model.forward_cls_and_patches(torch.randn(2, 3, 16, 16), patches=torch.tensor([3, 32]))
    with pytest.raises(RuntimeError, match="an index is out of range"):
        model.forward_cls_and_patches(torch.randn(2, 3, 16, 16), patches=torch.tensor([-1]))


@pytest.mark.parametrize("prune", [True, False])
def test_flat_patch_indices_select_as_the_mask_does(prune):
    """DINOv2 passes the collate's host-computed indices of the masked patches instead of the
    mask (no host synchronisation on an accelerator): the same tokens, bit for bit."""
    model = _model()
    model.set_last_block_pruning(prune)
    images = [torch.randn(6, 3, 16, 16), torch.randn(18, 3, 8, 8)]
    mask = torch.rand(6, 16) < 0.4
    mask[2] = False  # a crop without masked patches
    indices = mask.reshape(-1).nonzero().reshape(-1)
    torch.manual_seed(0)
    by_mask = model.forward_cls_and_patches(images, [mask, None], [mask, None])
    for dtype in (torch.int64, torch.int32):
        torch.manual_seed(0)
        by_index = model.forward_cls_and_patches(images, [mask, None], [indices.to(dtype), None])
        for a, b in zip(by_mask, by_index):
            assert torch.equal(a["x_norm_clstoken"], b["x_norm_clstoken"])
            assert torch.equal(a["x_norm_selected_patchtokens"], b["x_norm_selected_patchtokens"])
    assert by_mask[0]["x_norm_selected_patchtokens"].shape == (int(mask.sum()), 32)
    # Indices in another order select the tokens in that order.
    torch.manual_seed(0)
    in_order = model.forward_cls_and_patches(images[0], mask, indices)["x_norm_selected_patchtokens"]
    torch.manual_seed(0)
    flipped = model.forward_cls_and_patches(images[0], mask, indices.flip(0))["x_norm_selected_patchtokens"]
    torch.testing.assert_close(flipped, in_order.flip(0), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="2 image batches, 2 masks and 1 patch"):
        model.forward_cls_and_patches([torch.randn(2, 3, 16, 16)] * 2, [None, None], [None])


@pytest.mark.parametrize("method", ["dinov2", "dino"])
def test_the_config_key_prunes_every_backbone_and_the_step_is_unchanged(method):
    base = ["data=synthetic", "data.options.num_samples=64", "data.val_size=16", "model.depth=2",
            "data.batch_size=8", "trainer.precision=32", f"method={method}", "model.drop_path_rate=0.2"]
    losses, grads = [], []
    for prune in (False, True):
        cfg = compose_train(base + [f"model.prune_last_block={str(prune).lower()}"])
        datamodule = build_datamodule(cfg)
        torch.manual_seed(0)
        module = build_method(cfg, datamodule)
        backbones = [m for m in module.modules() if isinstance(m, VisionTransformer)]
        assert len(backbones) == 2 and all(b.prune_last_block == prune for b in backbones)
        assert "prune_last_block" not in module.hparams["arch"]  # a training option, not architecture
        module.log = module.log_dict = lambda *args, **kwargs: None
        datamodule.setup("fit")
        batch = first_training_batch(datamodule)
        torch.manual_seed(1)
        loss = module.training_step(batch, 0)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in module.student.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
