"""Packed multi-crop forward (``model.pack_crops``): the tokens of every crop size as one matrix
through the blocks, attention block-diagonal. It must compute what the unpacked forward computes:
outputs and gradients within float reassociation (1e-5 in fp32), drop path included."""
from __future__ import annotations

import pytest
import torch

from ssl_vit.build import build_datamodule, build_method
from ssl_vit.models.packing import PackedLayout, drop_path_packed
from ssl_vit.models.vision_transformer import VisionTransformer
from tests.methods.training_helpers import compose_train, first_training_batch
from tests.models.forward_comparison import assert_same_outputs_and_grads, outputs_and_grads, small_model


def _model(**arch) -> VisionTransformer:
    return small_model(**arch)


def _outputs_and_grads(model: VisionTransformer, images, masks):
    return outputs_and_grads(model, lambda: model.forward_features(images, masks), "x_norm_clstoken",
                             "x_norm_patchtokens")


@pytest.mark.parametrize("arch", [
    {},
    {"num_register_tokens": 2, "ffn_layer": "swiglu"},
    {"pos_embed": "rope"},
    {"pos_embed": "sincos", "drop_path_rate": 0.0},
], ids=["learned", "registers-swiglu", "rope", "sincos-no-drop-path"])
def test_packed_forward_equals_unpacked(arch):
    images = [torch.randn(6, 3, 16, 16), torch.randn(18, 3, 8, 8), torch.randn(6, 3, 12, 12)]
    masks = [torch.rand(6, 16) < 0.4, None, None]
    model = _model(**arch)
    outs, grads = _outputs_and_grads(model, images, masks)
    model.set_crop_packing(True)
    packed_outs, packed_grads = _outputs_and_grads(model, images, masks)
    assert_same_outputs_and_grads(outs, grads, packed_outs, packed_grads)


def test_packed_drop_path_drops_whole_sequences_as_the_unpacked_one_does():
    """With drop path 0.5 the two forwards agree only if the same samples are dropped; and a
    packed branch is dropped row-block by row-block, one sequence at a time."""
    layout = PackedLayout(((3, 4), (5, 2)))
    branch = torch.ones(layout.sizes[0] + layout.sizes[1], 8)
    torch.manual_seed(3)
    dropped = drop_path_packed(branch, layout, 0.5, training=True)
    per_sequence = [g.reshape(b, -1) for g, (b, _) in zip(layout.unpack(dropped), layout.groups)]
    for rows in per_sequence:
        assert set(rows.unique().tolist()) <= {0.0, 2.0}
        assert torch.all(rows.min(dim=1).values == rows.max(dim=1).values)  # all tokens alike
    assert 0 < sum(int((rows[:, 0] == 0).sum()) for rows in per_sequence) < 8
    assert torch.equal(drop_path_packed(branch, layout, 0.5, training=False), branch)


def test_layout_packs_and_unpacks_without_copies():
    xs = [torch.randn(2, 5, 4), torch.randn(3, 2, 4)]
    layout = PackedLayout.of(xs)
    packed = layout.pack(xs)
    assert packed.shape == (16, 4)
    back = layout.unpack(packed)
    assert all(torch.equal(a, b) for a, b in zip(back, xs))
    assert back[1].data_ptr() == packed[10:].data_ptr()  # a view into the packed matrix
    per_token = layout.per_token([torch.arange(2), torch.arange(10, 13)])
    assert per_token.tolist() == [0] * 5 + [1] * 5 + [10, 10, 11, 11, 12, 12]


def test_the_config_key_packs_every_backbone_and_the_step_loss_is_unchanged():
    base = ["data=synthetic", "data.options.num_samples=64", "data.val_size=16", "model.depth=2",
            "data.batch_size=8", "trainer.precision=32"]
    losses = []
    for packed in (False, True):
        cfg = compose_train(base + [f"model.pack_crops={str(packed).lower()}"])
        datamodule = build_datamodule(cfg)
        torch.manual_seed(0)
        method = build_method(cfg, datamodule)
        backbones = [m for m in method.modules() if isinstance(m, VisionTransformer)]
        assert len(backbones) == 2 and all(b.pack_crops == packed for b in backbones)
        assert "pack_crops" not in method.hparams["arch"]  # a training option, not architecture
        datamodule.setup("fit")
        batch = first_training_batch(datamodule)
        torch.manual_seed(1)
        losses.append(method.training_step(batch, 0).detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-5)


def test_attention_kernels_agree_and_the_config_key_chooses_one():
    """model.attention: the explicit softmax(qk^T)v and torch's SDPA compute the same attention."""
    images = [torch.randn(4, 3, 16, 16), torch.randn(8, 3, 8, 8)]
    model = _model(drop_path_rate=0.0)
    model.set_attention_kernel("explicit")
    outs, grads = _outputs_and_grads(model, images, None)
    model.set_attention_kernel("sdpa")
    sdpa_outs, sdpa_grads = _outputs_and_grads(model, images, None)
    for out, other in zip(outs, sdpa_outs):
        for key in out:
            torch.testing.assert_close(other[key], out[key], rtol=0, atol=1e-5, msg=key)
    for name in grads:
        torch.testing.assert_close(sdpa_grads[name], grads[name], rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="attention kernel must be one of"):
        model.set_attention_kernel("flash")
    cfg = compose_train(["data=synthetic", "data.options.num_samples=64", "data.val_size=16", "model.depth=1",
                         "model.attention=sdpa"])
    method = build_method(cfg, build_datamodule(cfg))
    kernels = {m.kernel for m in method.modules() if type(m).__name__ == "Attention"}
    assert kernels == {"sdpa"}


def test_packed_blocks_checkpoint_like_unpacked_ones():
    """Activation checkpointing recomputes packed blocks with the same drop-path draws."""
    images = [torch.randn(4, 3, 16, 16), torch.randn(8, 3, 8, 8)]
    model = _model()
    model.set_crop_packing(True)
    outs, grads = _outputs_and_grads(model, images, None)
    model.set_grad_checkpointing(True)
    outs_ckpt, grads_ckpt = _outputs_and_grads(model, images, None)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(outs, outs_ckpt) for k in a)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_auto_attention_is_explicit_only_for_low_precision_on_the_cpu():
    """``auto``: the explicit softmax(qk^T)v where it measured faster (bf16 / fp16 on the CPU),
    torch's SDPA otherwise (fp32 on the CPU measured 10-20% faster with SDPA)."""
    from ssl_vit.models.attention import Attention

    attn = Attention(32, 4)
    assert attn.kernel == "auto"
    assert attn.use_explicit(torch.zeros(1, dtype=torch.bfloat16))
    assert attn.use_explicit(torch.zeros(1, dtype=torch.float16))
    assert not attn.use_explicit(torch.zeros(1))
    attn.kernel = "explicit"
    assert attn.use_explicit(torch.zeros(1))
    attn.kernel = "sdpa"
    assert not attn.use_explicit(torch.zeros(1, dtype=torch.bfloat16))
