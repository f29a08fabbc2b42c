"""Activation checkpointing: the same outputs and gradients (drop path included), with the
blocks run again in the backward pass."""
from __future__ import annotations

import torch

from ssl_vit.build import build_datamodule, build_method
from ssl_vit.models.vision_transformer import VisionTransformer
from tests.methods.training_helpers import compose_train


def _model() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4, drop_path_rate=0.3)


def _grads(model: VisionTransformer, images: list[torch.Tensor], masks) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    torch.manual_seed(1)  # the same drop-path draws in both runs
    outs = model.forward_features(images, masks)
    loss = sum((o["x_norm_clstoken"] ** 2).sum() + o["x_norm_patchtokens"].mean() for o in outs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_blocks_give_the_same_gradients_and_run_twice():
    images = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 8, 8)]
    masks = [torch.rand(4, 16) < 0.3, None]
    plain = _model().train()
    loss, grads = _grads(plain, images, masks)

    checkpointed = _model().train()
    checkpointed.set_grad_checkpointing(True)
    calls = []
    checkpointed.blocks[1].forward_list = _counting(checkpointed.blocks[1].forward_list, calls)
    loss_ckpt, grads_ckpt = _grads(checkpointed, images, masks)
    assert len(calls) == 2  # once forward, once more in the backward pass
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    calls.clear()
    with torch.no_grad():  # no gradients recorded: nothing to checkpoint
        checkpointed.forward_features(images, masks)
    assert len(calls) == 1


def _counting(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return wrapped


def test_the_config_key_turns_it_on_for_every_backbone_of_the_method():
    cfg = compose_train(["data=synthetic", "data.options.num_samples=64", "data.val_size=16", "model.depth=1",
                         "model.activation_checkpointing=true"])
    method = build_method(cfg, build_datamodule(cfg))
    backbones = [m for m in method.modules() if isinstance(m, VisionTransformer)]
    assert len(backbones) == 2 and all(b.grad_checkpointing for b in backbones)
    assert "activation_checkpointing" not in method.hparams["arch"]  # not part of the architecture
