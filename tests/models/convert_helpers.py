"""What the converter tests share: tiny timm models with non-trivial weights and output comparisons."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

from ssl_vit.models import VisionTransformer  # noqa: E402

TOL = 1e-5


# ---------------------------------------------------------------- helpers
def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


@torch.no_grad()
def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Make token tables, LayerScale and norms non-trivial (inits are ~0 / 1e-5 / 1)."""
    for name, p in model.named_parameters():
        if name.endswith(("cls_token", "reg_token", "register_tokens", "mask_token", "pos_embed", "gamma")):
            p.copy_(torch.randn_like(p) * 0.1)
        elif "norm" in name:
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_timm(**kwargs) -> TimmViT:
    args = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, num_classes=10, dynamic_img_size=True)
    args.update(kwargs)
    torch.manual_seed(0)
    return randomise(TimmViT(**args))


@torch.no_grad()
def assert_matches_timm(backbone: VisionTransformer, model: TimmViT, images: torch.Tensor) -> None:
    ref = model.forward_features(images)  # all tokens, after the final norm
    out = backbone.forward_features(images)
    prefix, regs = model.num_prefix_tokens, model.num_reg_tokens
    assert max_abs(out["x_norm_clstoken"], ref[:, 0]) <= TOL
    assert max_abs(out["x_norm_regtokens"], ref[:, 1 : 1 + regs]) <= TOL
    assert max_abs(out["x_norm_patchtokens"], ref[:, prefix:]) <= TOL


@torch.no_grad()
def assert_same_outputs(a: VisionTransformer, b: VisionTransformer, images: torch.Tensor) -> None:
    out_a, out_b = a.forward_features(images), b.forward_features(images)
    for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
        assert max_abs(out_a[key], out_b[key]) <= TOL, key


def add_prefix(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def dino_backbone_dict(model: TimmViT) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
