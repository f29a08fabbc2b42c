"""model.compile: every block compiled (forward and the multi-crop forward_list), the same
outputs and gradients as eager within float tolerance. Slow: compiling takes tens of seconds."""
from __future__ import annotations

import copy

import pytest
import torch

from ssl_vit.build import build_datamodule, build_method
from ssl_vit.models.vision_transformer import VisionTransformer
from tests.methods.training_helpers import compose_train


@pytest.mark.slow
def test_compiled_blocks_match_eager_in_single_and_multi_crop_calls():
    torch.manual_seed(0)
    eager = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=4)
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    images = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 8, 8)]
    masks = [torch.rand(4, 16) < 0.3, None]
    for model in (eager, compiled):
        outs = model.forward_features(images, masks) + [model.forward_features(images[0])]
        sum(o["x_norm_clstoken"].pow(2).sum() + o["x_norm_patchtokens"].mean() for o in outs).backward()
        model.outputs = [o["x_norm_clstoken"].detach() for o in outs]
    for a, b in zip(eager.outputs, compiled.outputs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    # The compiled kernels fuse and reorder float sums: gradients agree to ~1e-5 of their scale.
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            scale = float(p.grad.abs().max())
            assert q.grad is not None and float((q.grad - p.grad).abs().max()) <= 1e-4 * scale, name
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # the weights' names are unchanged


def test_the_config_key_compiles_every_backbone_of_the_method():
    cfg = compose_train(["data=synthetic", "data.options.num_samples=64", "data.val_size=16", "model.depth=1",
                         "model.compile=true"])
    method = build_method(cfg, build_datamodule(cfg))
    backbones = [m for m in method.modules() if isinstance(m, VisionTransformer)]
    assert len(backbones) == 2
    # compile_blocks replaced each block's forward and forward_list by compiled callables
    assert all("forward" in vars(b.blocks[0]) and "forward_list" in vars(b.blocks[0]) for b in backbones)
    assert "compile" not in method.hparams["arch"]
