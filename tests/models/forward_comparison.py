"""Shared by the tests that compare two forward paths of the backbone (packing, last-block
pruning): a small model with drop path, one forward + backward with fixed drop-path draws, and
the equality check of outputs and gradients."""
from __future__ import annotations

import torch

from ssl_vit.models.vision_transformer import VisionTransformer


def small_model(**arch) -> VisionTransformer:
    torch.manual_seed(0)
    options = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4, drop_path_rate=0.3,
                   init_values=0.1)
    options.update(arch)
    return VisionTransformer(**options).train()


def outputs_and_grads(model: VisionTransformer, forward, cls_key: str, patch_key: str):
    """``forward()``'s list of output dicts (detached) and the parameters' gradients of a loss
    over the [CLS] and patch outputs; drop path draws from a fixed seed."""
    model.zero_grad()
    torch.manual_seed(1)  # the same drop-path draws in both runs
    outs = forward()
    loss = sum((o[cls_key] ** 2).sum() + o[patch_key].sin().sum() for o in outs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [{k: v.detach() for k, v in o.items()} for o in outs], grads


def assert_same_outputs_and_grads(outs, grads, other_outs, other_grads) -> None:
    """Outputs within 1e-5 (same keys and shapes); each gradient within 1e-5 of its largest
    element. Gradients are sums of many terms whose rounding scales with the terms, so an
    element-wise relative bound fails on the elements that cancel (seen: 1.8e-5 over a
    rtol 1e-4 / atol 1e-5 bound on one RoPE seed of ten; the largest error relative to the
    tensor's largest element over those seeds was 1.1e-6)."""
    for out, other in zip(outs, other_outs):
        assert out.keys() == other.keys()
        for key in out:
            assert out[key].shape == other[key].shape, key
            torch.testing.assert_close(other[key], out[key], rtol=0, atol=1e-5, msg=key)
    assert grads.keys() == other_grads.keys()
    for name in grads:
        scale = grads[name].abs().max().item()
        error = (other_grads[name] - grads[name]).abs().max().item()
        assert error <= 1e-5 * scale + 1e-8, f"{name}: gradients differ by {error:.2e} (largest element {scale:.2e})"
