"""This backbone in timm's ``VisionTransformer`` key layout, and the timm model that holds it.

``to_timm(backbone)`` returns ``(state_dict, model_name, kwargs)`` such that

    model = timm.create_model(model_name, pretrained=False, **kwargs)
    model.load_state_dict(state_dict)

computes what ``backbone`` computes at its native input size (``arch["img_size"]``):
``model(images)`` is ``backbone(images)`` (the normalised [CLS] token) and
``model.forward_features(images)`` the normalised tokens. How the differences are bridged:

* positions: without registers timm's layout is ours (a [CLS] row, then the patch grid). With
  registers timm either adds positions to the registers or (``no_embed_class``) to no prefix
  token at all, while ours positions [CLS] but not the registers; so the export uses
  ``no_embed_class`` and folds [CLS]'s fixed position row into the cls token. A fixed 2-D sin-cos
  table is written out as timm's (learned) table at the native grid;
* SwiGLU: timm's ``SwiGLUPacked`` (gate first, as our ``w12``) with ``mlp_ratio`` giving twice
  the hidden width, under the model name that selects it (``vit_giant_patch14_dinov2``);
* the mask token (used only by masked training) has no place in timm and is left out.

2-D RoPE is refused: timm's RoPE ViTs are EVA-style models (``vit_*_rope_*``) that place the
rotation frequencies and coordinates differently from this backbone's axial RoPE (integer patch
coordinates, ``rope_theta``, rotate-half within each axis's half of a head), so no timm model
computes what it computes. Final norms other than LayerNorm(eps=1e-6) are refused too.
"""
from __future__ import annotations

from typing import Any

import torch

from ssl_vit.models.vision_transformer import VisionTransformer

TIMM_EPS = 1e-6  # timm's ViT LayerNorm
SWIGLU_MODEL = "vit_giant_patch14_dinov2"  # its entry point sets mlp_layer=SwiGLUPacked, act_layer=SiLU
MLP_MODEL = "vit_base_patch16_224"


def timm_refusal(arch: dict[str, Any]) -> str | None:
    """Why a backbone of ``arch`` cannot be written as a timm model, or None."""
    if arch.get("pos_embed") == "rope":
        return ("model.pos_embed='rope' has no timm equivalent: timm's RoPE ViTs (EVA-style vit_*_rope_*) "
                "rotate with other frequencies and coordinates than this backbone's axial 2-D RoPE")
    if float(arch.get("norm_eps", TIMM_EPS)) != TIMM_EPS:
        return f"norm_eps={arch['norm_eps']}: timm's ViT uses LayerNorm(eps={TIMM_EPS})"
    return None


def to_timm(backbone: VisionTransformer) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """``(state dict in timm's keys, timm model name, its keyword arguments)``; see the module docstring."""
    arch = dict(backbone.arch)
    refusal = timm_refusal(arch)
    if refusal:
        raise ValueError(f"cannot export to timm's layout: {refusal}")
    ours = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    ours.pop("mask_token", None)
    grid = backbone.base_grid
    num_reg = backbone.num_register_tokens
    positions = backbone.patch_positions(grid).detach().clone()  # (1, N, D), learned or sin-cos
    cls_row = ours.pop("pos_embed")[:, :1] if "pos_embed" in ours else torch.zeros_like(ours["cls_token"])
    state: dict[str, torch.Tensor] = {}
    if num_reg:
        state["cls_token"] = ours.pop("cls_token") + cls_row  # [CLS]'s fixed position, folded in
        state["reg_token"] = ours.pop("register_tokens")
        state["pos_embed"] = positions  # no_embed_class: patches only
    else:
        state["cls_token"] = ours.pop("cls_token")
        state["pos_embed"] = torch.cat([cls_row, positions], dim=1)
    swiglu = arch.get("ffn_layer") == "swiglu"
    for key, value in ours.items():
        if swiglu:
            key = key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        state[key] = value
    hidden = (state["blocks.0.mlp.fc1.weight"].shape[0])  # SwiGLUPacked: gate and value, 2x the width
    dim = backbone.embed_dim
    img_size = arch["img_size"]
    kwargs: dict[str, Any] = {
        "img_size": list(img_size) if isinstance(img_size, (list, tuple)) else int(img_size),
        "patch_size": backbone.patch_size, "embed_dim": dim, "depth": len(backbone.blocks),
        "num_heads": backbone.num_heads, "mlp_ratio": (hidden + 0.5) / dim, "qkv_bias": bool(arch.get("qkv_bias", True)),
        "init_values": arch.get("init_values"), "class_token": True, "reg_tokens": num_reg,
        "no_embed_class": bool(num_reg), "global_pool": "token", "num_classes": 0,
    }
    return state, SWIGLU_MODEL if swiglu else MLP_MODEL, kwargs
