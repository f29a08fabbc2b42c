"""Turning Hydra config nodes into objects, with errors that name the key and what is allowed."""
from __future__ import annotations

from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from ssl_vit.models import VisionTransformer, build_backbone

# Keys of the model group that are not VisionTransformer arguments.
MODEL_META_KEYS = ("name", "init", "activation_checkpointing", "compile", "pack_crops", "attention",
                   "prune_last_block", "drop_path_law")  # not arguments of VisionTransformer


def to_dict(node: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node)


def backbone_arch(model_cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The VisionTransformer arguments of a `model` config node."""
    return {k: v for k, v in to_dict(model_cfg).items() if k not in MODEL_META_KEYS}


def build_backbone_from_config(model_cfg: DictConfig | Mapping[str, Any]) -> VisionTransformer:
    """Build the backbone of a `model` config; bad values fail with `model.<key>` in the message."""
    try:
        return build_backbone(backbone_arch(model_cfg))
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid model config ({to_dict(model_cfg).get('name')}): {err}") from None
