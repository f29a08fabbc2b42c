"""``load_backbone``: a ready ``VisionTransformer`` (eval mode) from a file or a checkpoint dict.

Sources, by file:
  * ``backbone.safetensors`` with ``backbone.json`` beside it: this framework's export; the JSON
    holds ``{"arch": {...}, "preprocessing": {...}}`` and its arch is used;
  * ``.ckpt`` (or any torch file) holding ``ckpt["ssl_vit"]``: this framework's training
    checkpoints (see ``_from_training_checkpoint``);
  * anything else (``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` without JSON): an outside
    checkpoint, converted by ``ssl_vit.models.convert`` (timm, DINO, DINOv2, MAE).

Keyword arguments override the stored or inferred constructor args (``num_heads``,
``interpolate_offset``, ...); ``layout=`` forces the converter for outside checkpoints.
Loading is strict: missing, unexpected or wrongly shaped tensors raise a ValueError.
"""
from __future__ import annotations

import argparse
import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ssl_vit.models.convert import convert_state_dict, supported_layouts_message
from ssl_vit.models.vision_transformer import VisionTransformer, build_backbone

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SUFFIXES = TORCH_SUFFIXES + (".safetensors",)
_MAX_LISTED = 30


def _from_training_checkpoint(ckpt: Mapping) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """This framework's Lightning checkpoints: (arch, backbone state dict).

    The training code stores ``ckpt["ssl_vit"] = {"arch": backbone.arch, "backbone_prefix":
    "teacher.backbone.", ...}`` next to Lightning's own entries; the backbone's tensors are the
    entries of ``ckpt["state_dict"]`` under that prefix (the teacher for DINO / DINOv2, the
    encoder for MAE, the EMA student for distillation), so they are not stored twice.
    """
    meta = ckpt.get("ssl_vit")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("arch"), Mapping):
        raise ValueError("not an ssl_vit training checkpoint: ckpt['ssl_vit']['arch'] is missing")
    prefix = meta.get("backbone_prefix")
    state = ckpt.get("state_dict")
    if not isinstance(prefix, str) or not isinstance(state, Mapping):
        raise ValueError(
            "not an ssl_vit training checkpoint: ckpt['ssl_vit']['backbone_prefix'] or "
            "ckpt['state_dict'] is missing"
        )
    backbone_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not backbone_state:
        raise ValueError(f"the checkpoint's state_dict has no entries under {prefix!r}")
    return dict(meta["arch"]), backbone_state


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return f"[{shown}{', ... and %d more' % (len(keys) - _MAX_LISTED) if len(keys) > _MAX_LISTED else ''}]"


def load_state_dict_strict(
    model: VisionTransformer, state_dict: Mapping[str, torch.Tensor], layout: str, source: str = "checkpoint"
) -> None:
    """``load_state_dict`` with errors naming the keys, the shapes and the detected layout."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"cannot load {source} (detected layout: {layout}) into the backbone: "
            f"missing keys {_listing(missing)}; unexpected keys {_listing(unexpected)}"
        )
    mismatched = [
        f"{key}: the backbone expects {tuple(expected[key].shape)}, the checkpoint has "
        f"{tuple(state_dict[key].shape)}"
        for key in sorted(expected)
        if tuple(expected[key].shape) != tuple(state_dict[key].shape)
    ]
    if mismatched:
        raise ValueError(
            f"cannot load {source} (detected layout: {layout}): shape mismatch for "
            + "; ".join(mismatched)
        )
    model.load_state_dict(dict(state_dict), strict=True)


def _torch_load(path: Path) -> Any:
    try:
        # DINO / MAE training checkpoints keep their argparse options next to the weights.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if path.suffix.lower() == ".ckpt":
            # Lightning checkpoints of this framework store hyper-parameters as Python objects.
            return torch.load(path, map_location="cpu", weights_only=False)
        raise ValueError(
            f"{path} holds Python objects that torch.load(weights_only=True) refuses ({err}). If you "
            "trust the file, load it with torch.load(path, weights_only=False) and pass the dict "
            "to load_backbone"
        ) from None


def _read_export_arch(path: Path) -> dict[str, Any]:
    meta = json.loads(path.read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("arch"), dict):
        raise ValueError(f"{path} has no 'arch' dict; expected {{'arch': {{...}}, 'preprocessing': {{...}}}}")
    return meta["arch"]


def _from_timm_export(state_dict: Mapping[str, torch.Tensor], arch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """An export in timm's key layout -> this backbone's keys (``ssl_vit.models.timm_export``)."""
    _, converted, _ = convert_state_dict(state_dict, layout="timm", **{k: v for k, v in arch.items()
                                                                       if k in ("img_size", "patch_size")})
    if arch.get("pos_embed") != "learned":
        converted.pop("pos_embed", None)  # a fixed sin-cos table, computed again at any size
    return converted


def _build(arch: dict[str, Any], state_dict: Mapping, layout: str, source: str) -> VisionTransformer:
    model = build_backbone(arch)
    load_state_dict_strict(model, state_dict, layout, source)
    return model.eval()


def load_backbone(path: str | Path | Mapping, layout: str | None = None, **arch: Any) -> VisionTransformer:
    """Load a backbone in eval mode from a file (or an already loaded checkpoint dict)."""
    if isinstance(path, Mapping):
        checkpoint, source = path, "the given checkpoint dict"
    else:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"no backbone file at {path}")
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint = load_file(str(path), device="cpu")
            meta = path.with_suffix(".json")
            if meta.is_file():
                stored = _read_export_arch(meta)
                if json.loads(meta.read_text()).get("format") == "timm":  # python -m ssl_vit.export
                    checkpoint = _from_timm_export(checkpoint, stored)
                return _build({**stored, **arch}, checkpoint, "ssl_vit export", source)
        elif suffix in TORCH_SUFFIXES:
            checkpoint = _torch_load(path)
        else:
            raise ValueError(
                f"cannot load {path}: unknown file type {suffix!r}; expected one of {SUFFIXES}"
            )
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"{source} holds a {type(checkpoint).__name__}, not a checkpoint dict; "
            + supported_layouts_message()
        )
    if "ssl_vit" in checkpoint:
        stored, state_dict = _from_training_checkpoint(checkpoint)
        return _build({**stored, **arch}, state_dict, "ssl_vit training checkpoint", source)
    detected, state_dict, full_arch = convert_state_dict(checkpoint, layout=layout, **arch)
    return _build(full_arch, state_dict, detected, source)


def initial_weights_for(path: str | Path, arch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The weights in ``path`` as a state dict for a backbone built from ``arch`` (``model.init``).

    Every constructor argument of ``arch`` applies to the file except the image size: a file
    trained at another resolution gives its learned position table resampled to ``arch``'s patch
    grid, the same bicubic resampling the backbone applies to any other input size.
    """
    start = load_backbone(path, **{k: v for k, v in arch.items() if k != "img_size"})
    weights = start.state_dict()
    if start.pos_embed is not None and "img_size" in arch:
        size = arch["img_size"]
        rows, cols = (size, size) if isinstance(size, int) else tuple(size)
        grid = start.patch_embed.grid_size(rows, cols)
        if grid != start.base_grid:
            with torch.no_grad():
                weights["pos_embed"] = torch.cat([start.pos_embed[:, :1], start.patch_positions(grid)], dim=1)
    return weights
