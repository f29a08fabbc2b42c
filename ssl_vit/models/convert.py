"""Converters from outside ViT checkpoints to this backbone's state dict and constructor args.

Supported sources (``LAYOUTS``), each with one small converter that returns
``(state_dict, arch)``; ``convert_state_dict`` detects the source and dispatches:

* ``"timm"``: ``timm.models.vision_transformer.VisionTransformer`` state dicts (``reg_token``,
  optional ``no_embed_class`` tables, ``head.*``); timm resamples positions to the exact grid with
  antialiasing (offset 0.0, antialias True).
* ``"dino"``: facebookresearch/dino, the released backbones and full training checkpoints
  (``teacher`` / ``student`` dicts, ``module.`` / ``backbone.`` prefixes, ``head.*``). DINO's
  ``interpolate_pos_encoding`` uses ``scale_factor=(rows + 0.1) / M`` without antialiasing.
* ``"dinov2"``: facebookresearch/dinov2 (``register_tokens``, ``mask_token``, ``ls1.gamma``,
  ``mlp.w12/w3``, chunked ``blocks.<chunk>.<i>.`` naming, ``teacher`` + ``backbone.`` training
  checkpoints). Offset 0.1 without antialiasing, except the released register models, which use
  the exact size with antialiasing (offset 0.0, antialias True).
* ``"mae"``: facebookresearch/mae (``model`` wrapper, ``decoder_*`` and the decoder's
  ``mask_token`` dropped). The fixed sin-cos table is loaded as a learned table; MAE's
  fine-tuning code resizes it to the exact size without antialiasing (offset 0.0, antialias False).

What cannot be read from the tensors is filled with a default and can be overridden by keyword:
``num_heads`` (default ``embed_dim // 64``, right for ViT-Ti/S/B/L/g but not ViT-H/14, which has
16 heads), ``patch_size``, ``img_size``, ``interpolate_offset``, ``interpolate_antialias`` and any
other constructor argument of ``VisionTransformer``.

Ambiguous cases, settled by passing ``layout=``: a plain ``cls_token`` / ``pos_embed`` /
``blocks`` / ``norm`` dict with nothing else to go by is read as a released DINO backbone (pass
``layout="timm"`` for a timm model saved without a head), and an encoder-only MAE file (``model``
wrapper, no decoder) is read as timm (pass ``layout="mae"``).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ssl_vit.models.layers import swiglu_hidden_dim

LAYOUTS = ("timm", "dino", "dinov2", "mae")

# Position-interpolation convention of each source: (interpolate_offset, interpolate_antialias).
CONVENTIONS = {
    "timm": (0.0, True),
    "dino": (0.1, False),
    "dinov2": (0.1, False),
    "dinov2_registers": (0.0, True),
    "mae": (0.0, False),
}

StateDict = dict[str, torch.Tensor]

# Dicts that hold the model inside a checkpoint, in order of preference (the teacher is the
# model DINO / DINOv2 evaluate).
_WRAPPERS = ("teacher", "model", "state_dict", "student", "module")
_BLOCK_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.weight$")
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.(.+)$")


def supported_layouts_message() -> str:
    return (
        f"supported layouts: {', '.join(LAYOUTS)} (timm ViT, facebookresearch/dino, "
        "facebookresearch/dinov2, facebookresearch/mae), plus this framework's own files "
        "(.safetensors with its .json, training .ckpt)"
    )


# ------------------------------------------------------------------ unwrapping
def flatten_checkpoint(checkpoint: Mapping) -> tuple[StateDict, list[str]]:
    """The flat tensor dict inside a checkpoint, and the wrappers / prefixes that were removed.

    Follows ``teacher`` / ``model`` / ``state_dict`` / ``student`` / ``module`` dicts, keeps the
    teacher of flat ``teacher.`` / ``student.`` dicts, strips ``module.`` / ``_orig_mod.`` and keeps
    only the ``backbone.`` entries when there are some (dropping the projection heads).
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a checkpoint dict, got {type(checkpoint).__name__}")
    wrappers: list[str] = []
    obj: Mapping = checkpoint
    while not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((k for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        wrappers.append(inner)
        obj = obj[inner]
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError(
            f"found no tensors in the checkpoint (top-level keys: {sorted(map(str, checkpoint))[:20]}); "
            + supported_layouts_message()
        )
    for prefix in ("teacher.", "student."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            wrappers.append(prefix)
            break
    changed = True
    while changed:
        changed = False
        for prefix in ("module.", "_orig_mod."):
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                wrappers.append(prefix)
                changed = True
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        wrappers.append("backbone.")
    return sd, wrappers


def _detect(sd: StateDict, wrappers: list[str]) -> str | None:
    keys = set(sd)
    mask_token = sd.get("mask_token")
    if any(k.startswith("decoder_") for k in keys) or (mask_token is not None and mask_token.ndim == 3):
        return "mae"
    if (
        "register_tokens" in keys
        or (mask_token is not None and mask_token.ndim == 2)
        or any(_CHUNKED.match(k) for k in keys)
        or any(".mlp.w12." in k for k in keys)
    ):
        return "dinov2"
    head = sd.get("head.weight")
    if (
        "reg_token" in keys
        or "fc_norm.weight" in keys
        or (head is not None and head.ndim == 2)
        or any(".ls1.gamma" in k or ".mlp.fc1_g." in k for k in keys)
        or (wrappers and wrappers[0] in ("model", "state_dict"))
    ):
        return "timm"
    if {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= keys and any(_BLOCK_QKV.match(k) for k in keys):
        return "dino"
    return None


def detect_layout(state_dict: Mapping) -> str:
    """Which of ``LAYOUTS`` a state dict (or a checkpoint wrapping one) comes from, by its keys."""
    sd, wrappers = flatten_checkpoint(state_dict)
    layout = _detect(sd, wrappers)
    if layout is None:
        sample = sorted(sd)[:8]
        raise ValueError(f"unrecognised checkpoint layout (keys like {sample}); " + supported_layouts_message())
    return layout


# ------------------------------------------------------------ shared pieces
def _require(sd: StateDict, keys: list[str], layout: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ValueError(
            f"cannot convert the {layout} checkpoint: missing keys {missing} needed to infer the "
            f"architecture (layout detected: {layout})"
        )


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _grid_of(img_size: Any, patch_size: int) -> tuple[int, int]:
    rows, cols = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return rows // patch_size, cols // patch_size


def _mlp_ratio(dim: int, hidden: int, ffn_layer: str) -> float:
    """An ``mlp_ratio`` for which the backbone builds a feed-forward layer ``hidden`` wide."""
    # Float rounding can put int(dim * ratio) one below the width; the second candidate fixes that.
    base = hidden if ffn_layer == "mlp" else hidden * 1.5  # SwiGLU keeps 2/3 of the MLP width
    for ratio in (base / dim, (base + 0.5) / dim):
        width = int(dim * ratio) if ffn_layer == "mlp" else swiglu_hidden_dim(dim, ratio)
        if width == hidden:
            return ratio
    raise ValueError(
        f"a {ffn_layer} feed-forward layer {hidden} wide on {dim} channels cannot be built by this "
        "backbone (SwiGLU widths must be multiples of 8)"
    )


def _infer_arch(sd: StateDict, layout: str, convention: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Constructor args implied by a state dict already in this backbone's key layout."""
    _require(sd, ["cls_token", "patch_embed.proj.weight"], layout)
    embed_dim = sd["cls_token"].shape[-1]
    kernel = sd["patch_embed.proj.weight"]
    if kernel.ndim != 4 or kernel.shape[-1] != kernel.shape[-2]:
        raise ValueError(f"patch_embed.proj.weight of shape {tuple(kernel.shape)} is not a square conv kernel")
    patch_size = int(overrides.get("patch_size", kernel.shape[-1]))
    blocks = sorted(int(m.group(1)) for k in sd if (m := _BLOCK_QKV.match(k)))
    if not blocks:
        raise ValueError(f"cannot convert the {layout} checkpoint: no blocks.<i>.attn.qkv.weight keys")
    if "blocks.0.mlp.w12.weight" in sd:
        ffn_layer, hidden = "swiglu", sd["blocks.0.mlp.w12.weight"].shape[0] // 2
    elif "blocks.0.mlp.fc1.weight" in sd:
        ffn_layer, hidden = "mlp", sd["blocks.0.mlp.fc1.weight"].shape[0]
    else:
        raise ValueError(
            f"cannot convert the {layout} checkpoint: no blocks.0.mlp.fc1.weight or "
            "blocks.0.mlp.w12.weight to tell the feed-forward layer"
        )
    offset, antialias = CONVENTIONS[convention]
    arch: dict[str, Any] = dict(
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=blocks[-1] + 1,
        num_heads=max(1, embed_dim // 64),
        mlp_ratio=_mlp_ratio(embed_dim, hidden, ffn_layer),
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        ffn_layer=ffn_layer,
        init_values=1e-5 if "blocks.0.ls1.gamma" in sd else None,
        num_register_tokens=sd["register_tokens"].shape[1] if "register_tokens" in sd else 0,
        pos_embed="learned",
        interpolate_offset=offset,
        interpolate_antialias=antialias,
        norm_eps=1e-6,
    )
    if "img_size" in overrides:
        arch["img_size"] = overrides["img_size"]
    elif "pos_embed" in sd:
        num_patches = sd["pos_embed"].shape[1] - 1
        if not _is_square(num_patches):
            raise ValueError(
                f"pos_embed holds {num_patches} patch positions, not a square grid; pass img_size=(H, W)"
            )
        arch["img_size"] = math.isqrt(num_patches) * patch_size
    elif overrides.get("pos_embed", "learned") == "learned":
        raise ValueError(
            f"the {layout} checkpoint has no pos_embed table; pass pos_embed='sincos' or 'rope' "
            "if the model was trained with one"
        )
    else:
        arch["img_size"] = 224
    arch.update(overrides)
    return arch


def _drop(sd: StateDict, prefixes: tuple[str, ...]) -> StateDict:
    return {k: v for k, v in sd.items() if not k.startswith(prefixes)}


def _add_mask_token(sd: StateDict) -> StateDict:
    cls = sd.get("cls_token")
    if "mask_token" not in sd and cls is not None:
        sd["mask_token"] = torch.zeros(1, cls.shape[-1], dtype=cls.dtype)
    return sd


def _reject_pooled(sd: StateDict, layout: str) -> None:
    if "fc_norm.weight" in sd:
        raise ValueError(
            f"this {layout} checkpoint pools the patch tokens before its final norm (fc_norm); only "
            "models with a final norm over all tokens (norm.*) are supported"
        )


# -------------------------------------------------------------- converters
def convert_timm(checkpoint: Mapping, **overrides: Any) -> tuple[StateDict, dict[str, Any]]:
    sd, _ = flatten_checkpoint(checkpoint)
    _reject_pooled(sd, "timm")
    sd = _drop(sd, ("head.",))
    if "cls_token" not in sd:
        raise ValueError("timm ViTs without a class token (class_token=False) are not supported")
    dim = sd["cls_token"].shape[-1]
    reg = sd.pop("reg_token", None)
    num_reg = reg.shape[1] if reg is not None else 0
    pos = sd.get("pos_embed")
    if pos is not None:
        total = pos.shape[1]
        if "img_size" in overrides:
            _require(sd, ["patch_embed.proj.weight"], "timm")
            kernel = sd["patch_embed.proj.weight"].shape[-1]
            rows, cols = _grid_of(overrides["img_size"], int(overrides.get("patch_size", kernel)))
            has_prefix = total == rows * cols + 1 + num_reg
        elif _is_square(total):
            has_prefix = False  # no_embed_class: positions of the patches only
        elif _is_square(total - 1 - num_reg):
            has_prefix = True
        else:
            raise ValueError(
                f"timm pos_embed of shape {tuple(pos.shape)} with {num_reg} register tokens does not "
                "cover a square grid; pass img_size=(H, W)"
            )
        if has_prefix:
            # Original timm / DeiT layout: rows for [CLS] and the registers, then the patches.
            # Registers keep their fixed position row, so it folds into the register tokens.
            cls_row, patches = pos[:, :1], pos[:, 1 + num_reg :]
            if num_reg:
                reg = reg + pos[:, 1 : 1 + num_reg]
        else:
            cls_row, patches = torch.zeros(1, 1, dim, dtype=pos.dtype), pos
        sd["pos_embed"] = torch.cat([cls_row, patches], dim=1)
    if reg is not None:
        sd["register_tokens"] = reg
    for i in sorted(int(m.group(1)) for k in list(sd) if (m := _BLOCK_QKV.match(k))):
        p = f"blocks.{i}.mlp."
        if p + "fc1_g.weight" in sd:  # timm SwiGLU: separate gate and value projections
            for kind in ("weight", "bias"):
                gate, value = sd.pop(f"{p}fc1_g.{kind}", None), sd.pop(f"{p}fc1_x.{kind}", None)
                if gate is not None and value is not None:
                    sd[f"{p}w12.{kind}"] = torch.cat([gate, value], dim=0)
                if f"{p}fc2.{kind}" in sd:
                    sd[f"{p}w3.{kind}"] = sd.pop(f"{p}fc2.{kind}")
        elif (
            p + "fc1.weight" in sd
            and p + "fc2.weight" in sd
            and sd[p + "fc1.weight"].shape[0] == 2 * sd[p + "fc2.weight"].shape[1]
        ):  # timm SwiGLUPacked (gate first, as DINOv2's w12)
            for kind in ("weight", "bias"):
                if f"{p}fc1.{kind}" in sd:
                    sd[f"{p}w12.{kind}"] = sd.pop(f"{p}fc1.{kind}")
                if f"{p}fc2.{kind}" in sd:
                    sd[f"{p}w3.{kind}"] = sd.pop(f"{p}fc2.{kind}")
    sd = _add_mask_token(sd)
    return sd, _infer_arch(sd, "timm", "timm", overrides)


def convert_dino(checkpoint: Mapping, **overrides: Any) -> tuple[StateDict, dict[str, Any]]:
    sd, _ = flatten_checkpoint(checkpoint)
    sd = _add_mask_token(_drop(sd, ("head.",)))
    return sd, _infer_arch(sd, "dino", "dino", overrides)


def convert_dinov2(checkpoint: Mapping, **overrides: Any) -> tuple[StateDict, dict[str, Any]]:
    sd, _ = flatten_checkpoint(checkpoint)
    flat: StateDict = {}
    for key, value in sd.items():
        m = _CHUNKED.match(key)  # blocks.<chunk>.<global index>.<rest> (block_chunks > 0)
        flat[f"blocks.{m.group(1)}.{m.group(2)}" if m else key] = value
    sd = _add_mask_token(_drop(flat, ("head.", "dino_head.", "ibot_head.")))
    convention = "dinov2_registers" if "register_tokens" in sd else "dinov2"
    return sd, _infer_arch(sd, "dinov2", convention, overrides)


def convert_mae(checkpoint: Mapping, **overrides: Any) -> tuple[StateDict, dict[str, Any]]:
    sd, _ = flatten_checkpoint(checkpoint)
    _reject_pooled(sd, "mae")
    sd = _drop(sd, ("decoder_", "head."))
    if "mask_token" in sd and sd["mask_token"].ndim == 3:  # the decoder's mask token
        del sd["mask_token"]
    sd = _add_mask_token(sd)
    return sd, _infer_arch(sd, "mae", "mae", overrides)


CONVERTERS: dict[str, Callable[..., tuple[StateDict, dict[str, Any]]]] = {
    "timm": convert_timm,
    "dino": convert_dino,
    "dinov2": convert_dinov2,
    "mae": convert_mae,
}


def convert_state_dict(
    checkpoint: Mapping, layout: str | None = None, **overrides: Any
) -> tuple[str, StateDict, dict[str, Any]]:
    """(layout, state dict in this backbone's keys, arch) for an outside checkpoint.

    ``layout`` forces a source instead of detecting it; ``overrides`` replace inferred arch args.
    """
    if layout is None:
        layout = detect_layout(checkpoint)
    elif layout not in CONVERTERS:
        raise ValueError(f"unknown layout {layout!r}; " + supported_layouts_message())
    sd, arch = CONVERTERS[layout](checkpoint, **overrides)
    return layout, sd, arch
