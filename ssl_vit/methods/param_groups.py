"""Optimizer parameter groups: weight-decay exclusions, layer-wise lr decay, last-layer flag.

:func:`build_param_groups` returns plain dicts for ``torch.optim.AdamW(groups, ...)``.  Every
group carries

* ``lr_multiplier`` / ``wd_multiplier``: the method sets, each step,
  ``group["lr"] = scheduled_lr * lr_multiplier`` and
  ``group["weight_decay"] = scheduled_wd * wd_multiplier`` (:func:`apply_lr_wd` does exactly that);
* ``is_last_layer``: the DINO head's prototype layer, in groups of its own, so its lr can be set
  to 0 while it is frozen (DINOv2's way; DINO instead drops its gradients);
* ``name`` (a readable key) and ``param_names`` (full names ``"<module key>.<param name>"``; the
  key torch itself uses for named parameter groups).

Rules (the released DINO / DINOv2 ``get_params_groups``, see ``fidelity.md``):

* no weight decay on biases, 1-D parameters (norm weights), anything inside a ``*norm*`` module,
  and LayerScale ``gamma`` (DINOv2's name rules plus DINO's ``ndim == 1`` rule);
* the cls / register / mask tokens and the position table ARE decayed (both released codes do),
  unless ``exclude_tokens_from_decay=True`` (timm-style; not the papers' recipe);
* layer-wise lr decay (DINOv2, rate 0.9): ``rate ** (L + 1 - layer_id)`` with ``layer_id = 0``
  for ``patch_embed``, ``cls_token``, ``pos_embed``, ``mask_token``, ``register_tokens``,
  ``i + 1`` for ``blocks.i`` and ``L + 1`` for everything else (the final norm, the heads);
  every ``patch_embed`` parameter gets an extra ``patch_embed_lr_mult`` (DINOv2: 0.2);
* parameters with ``requires_grad=False`` (e.g. DINO's frozen weight-norm gain) are left out, as
  in DINO's ``get_params_groups``.

Layer ids are only given to *backbones*: modules with a ``blocks`` attribute (the
VisionTransformer); a head is all ``L + 1``.  Names are matched relative to each module, so the
dict key (``"backbone"``, ``"dino_head"``, ...) does not matter.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

TOKEN_NAMES = ("cls_token", "register_tokens", "mask_token", "pos_embed")
EMBED_PREFIXES = ("patch_embed.",) + TOKEN_NAMES


def _is_backbone(module: nn.Module) -> bool:
    return isinstance(getattr(module, "blocks", None), (nn.ModuleList, nn.Sequential))


def layer_id(name: str, num_layers: int) -> int:
    """DINOv2's layer id of a backbone parameter name (relative to the backbone)."""
    if name.startswith("patch_embed.") or name.split(".")[0] in TOKEN_NAMES:
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for biases, 1-D parameters, parameters of ``*norm*`` modules and LayerScale gammas."""
    parts = name.split(".")
    return (
        param.ndim <= 1
        or parts[-1] == "bias"
        or parts[-1] == "gamma"
        or any("norm" in p for p in parts[:-1])
    )


def build_param_groups(
    named_modules: Mapping[str, nn.Module],
    weight_decay: float,
    layerwise_decay: float | None = None,
    patch_embed_lr_mult: float = 1.0,
    num_layers: int | None = None,
    exclude_tokens_from_decay: bool = False,
) -> list[dict[str, Any]]:
    """Parameter groups for every trainable parameter of ``named_modules`` (each exactly once).

    Args:
        named_modules: e.g. ``{"backbone": vit, "dino_head": head, "ibot_head": head2}``.
        weight_decay: initial ``weight_decay`` of the groups (times ``wd_multiplier``); the
            scheduled value replaces it every step.
        layerwise_decay: DINOv2's rate (0.9), or None / 1.0 for none.
        patch_embed_lr_mult: extra lr factor of ``patch_embed`` (DINOv2: 0.2).
        num_layers: L of the formula; default ``len(backbone.blocks)``.
        exclude_tokens_from_decay: also exempt cls/register/mask tokens and ``pos_embed`` from
            weight decay (NOT what DINO / DINOv2 do).

    Parameters sharing ``(lr_multiplier, wd_multiplier, is_last_layer)`` share a group; groups are
    ordered by first appearance, and parameters keep the modules' order.
    """
    rate = 1.0 if layerwise_decay is None else float(layerwise_decay)
    groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
    seen: set[int] = set()
    for key, module in named_modules.items():
        backbone = _is_backbone(module)
        depth = num_layers if num_layers is not None else (len(module.blocks) if backbone else 0)
        last_ids: set[int] = set()
        if hasattr(module, "last_layer_parameters"):
            last_ids = {id(p) for p in module.last_layer_parameters()}
        token_names = set(TOKEN_NAMES)
        if backbone and hasattr(module, "no_weight_decay_names"):
            token_names |= set(module.no_weight_decay_names())
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            if id(param) in seen:  # shared between modules: optimise it once
                continue
            seen.add(id(param))

            lr_mult = 1.0
            if backbone:
                lid = layer_id(name, depth)
                lr_mult = rate ** (depth + 1 - lid)
                if name.startswith("patch_embed."):
                    lr_mult *= patch_embed_lr_mult
            wd_mult = 0.0 if no_weight_decay(name, param) else 1.0
            if exclude_tokens_from_decay and backbone and name.split(".")[0] in token_names:
                wd_mult = 0.0
            is_last = id(param) in last_ids or "last_layer" in name.split(".")

            gkey = (lr_mult, wd_mult, is_last)
            if gkey not in groups:
                groups[gkey] = {
                    "name": f"lr{lr_mult:.6g}_wd{wd_mult:g}" + ("_last_layer" if is_last else ""),
                    "params": [],
                    "param_names": [],
                    "lr_multiplier": lr_mult,
                    "wd_multiplier": wd_mult,
                    "is_last_layer": is_last,
                    "weight_decay": float(weight_decay) * wd_mult,
                }
            groups[gkey]["params"].append(param)
            groups[gkey]["param_names"].append(f"{key}.{name}")
    return list(groups.values())


def apply_lr_wd(
    optimizer: torch.optim.Optimizer, lr: float, weight_decay: float, freeze_last_layer: bool = False
) -> None:
    """Set every group's ``lr`` / ``weight_decay`` from the scheduled values and its multipliers;
    groups flagged ``is_last_layer`` get lr 0 while ``freeze_last_layer`` (DINOv2)."""
    for group in optimizer.param_groups:
        lr_mult = group.get("lr_multiplier", 1.0)
        wd_mult = group.get("wd_multiplier", 1.0)
        frozen = freeze_last_layer and group.get("is_last_layer", False)
        group["lr"] = 0.0 if frozen else lr * lr_mult
        group["weight_decay"] = weight_decay * wd_mult


__all__ = ["apply_lr_wd", "build_param_groups", "layer_id", "no_weight_decay"]


def adamw(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float],
          implementation: str = "fused") -> torch.optim.AdamW:
    """torch's AdamW with the chosen kernel (``optim.implementation``). On the CPU torch picks the
    per-tensor loop by default, one small op per tensor and step over hundreds of tensors; the
    fused kernel (the default here) is the same update up to rounding and took 28 ms against
    foreach's 87 ms for ViT-S/16 with a 65,536-prototype head (43.6M parameters, 2-core Xeon)."""
    if implementation not in ("fused", "foreach", "for_loop"):
        raise ValueError(f"optim.implementation={implementation!r}; allowed: fused, foreach, for_loop")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), foreach=implementation == "foreach",
                             fused=True if implementation == "fused" else None)
