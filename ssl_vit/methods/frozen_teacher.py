"""Distillation's teacher: a pretrained backbone, with its projection heads when the file has them,
frozen (no gradients, never updated, always in eval mode).

``method.teacher.checkpoint`` may be
  * a training checkpoint of this framework: DINO / DINOv2 (the EMA teacher with its DINO head,
    and its iBOT head when it has a separate one), a distillation stage (the EMA student with its
    heads: the next stage of a cascade), or MAE (the encoder; no heads);
  * an export (``backbone.safetensors`` with its JSON) or outside weights (timm, the official
    DINO / DINOv2 / MAE layouts): a backbone without heads. ``method.teacher.load_kwargs`` passes
    what such a file cannot tell (``num_heads``, ``patch_size``, ...) to ``load_backbone``.

The teacher sees the student's crops. Two differences are bridged here, so that the student's
data pipeline stays its own: the normalisation (the teacher's mean / std where its file stores
them, ImageNet's for outside weights, which were trained with it) and the patch grid (a teacher
with another patch size gives a token grid that is resampled bilinearly to the student's).
"""
from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_vit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_vit.models.heads import DINOHead
from ssl_vit.models.load import TORCH_SUFFIXES, _torch_load, load_backbone
from ssl_vit.models.vision_transformer import VisionTransformer

KEY = "method.teacher.checkpoint"
TARGETS = ("auto", "heads", "features")
# Where a DINO / DINOv2 checkpoint written before checkpoints described their heads keeps them.
LEGACY_HEADS_PREFIX = "teacher."


@dataclass
class TeacherFile:
    """What a teacher file holds: the backbone, its heads (name -> head; empty when it has
    none), the preprocessing its images had (None for outside weights) and a description."""

    backbone: VisionTransformer
    heads: dict[str, DINOHead] = field(default_factory=dict)
    preprocessing: dict[str, Any] | None = None
    description: str = ""


def _legacy_head_specs(meta: Mapping, hparams: Mapping | None, in_dim: int) -> dict[str, dict]:
    """Head shapes of DINO / DINOv2 checkpoints without ``ssl_vit.heads``, from their method config."""
    method = (hparams or {}).get("method") or {}
    if meta.get("method") not in ("dino", "dinov2") or "head" not in method:
        return {}

    def spec(head: Mapping) -> dict:
        return {"in_dim": in_dim, "out_dim": head["out_dim"], "hidden_dim": head["hidden_dim"],
                "bottleneck_dim": head["bottleneck_dim"], "nlayers": head["nlayers"],
                "norm_last_layer": head["norm_last_layer"]}

    specs = {"dino_head": spec(method["head"])}
    ibot = method.get("ibot") or {}
    if ibot.get("separate_head"):
        specs["ibot_head"] = spec(ibot["head"])
    return specs


def heads_of_checkpoint(checkpoint: Mapping, in_dim: int) -> dict[str, DINOHead]:
    """The projection heads stored in a training checkpoint of this framework (may be none)."""
    meta, state = checkpoint["ssl_vit"], checkpoint.get("state_dict") or {}
    described = meta.get("heads")
    if described is not None:
        prefix, specs = described["prefix"], described["specs"]
    else:
        prefix, specs = LEGACY_HEADS_PREFIX, _legacy_head_specs(meta, checkpoint.get("hyper_parameters"), in_dim)
    heads = {}
    for name, spec in specs.items():
        start = f"{prefix}{name}."
        weights = {k[len(start):]: v for k, v in state.items() if k.startswith(start)}
        head = DINOHead(**spec)
        try:
            head.load_state_dict(weights)
        except RuntimeError as err:
            raise ValueError(f"its {name} does not match the head shape it describes: {err}") from None
        heads[name] = head
    return heads


def read_teacher_file(path: Any, load_kwargs: Mapping[str, Any] | None = None) -> TeacherFile:
    """Read ``method.teacher.checkpoint``; every failure is a ValueError naming the key."""
    if path in (None, ""):
        raise ValueError(f"{KEY} is required for method=distill: a DINO / DINOv2 / distillation training "
                         "checkpoint (.ckpt), an export (.safetensors) or outside weights (.pth)")
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise ValueError(f"{KEY}={str(path)!r}: no such file ({file.resolve()})")
    kwargs = {k: v for k, v in dict(load_kwargs or {}).items() if v is not None}
    try:
        if file.suffix.lower() in TORCH_SUFFIXES:
            checkpoint = _torch_load(file)
            backbone = load_backbone(checkpoint, **kwargs)
            if isinstance(checkpoint, Mapping) and "ssl_vit" in checkpoint:
                meta = checkpoint["ssl_vit"]
                return TeacherFile(backbone, heads_of_checkpoint(checkpoint, backbone.embed_dim),
                                   dict(meta.get("preprocessing") or {}) or None,
                                   f"a {meta.get('method', 'ssl_vit')} training checkpoint")
            return TeacherFile(backbone, {}, None, "outside weights")
        backbone = load_backbone(file, **kwargs)
        from ssl_vit.evaluate import read_preprocessing

        preprocessing = read_preprocessing(file)
        return TeacherFile(backbone, {}, preprocessing, "an export" if preprocessing else "outside weights")
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{KEY}={str(path)!r} cannot be read ({type(err).__name__}: {str(err)[:200]}); "
                         "is the file complete? Give a checkpoint that torch.load or safetensors reads") from None
    except (ValueError, TypeError) as err:
        raise ValueError(f"{KEY}={str(path)!r}: {err}") from None


def resolve_target(target: str, teacher: TeacherFile) -> str:
    """``heads`` or ``features`` for ``method.teacher.target`` (``auto``: heads when the file has them)."""
    if target not in TARGETS:
        raise ValueError(f"method.teacher.target={target!r}; allowed: {', '.join(TARGETS)}")
    if target == "heads" and not teacher.heads:
        raise ValueError(f"method.teacher.target=heads, but {KEY} is {teacher.description} without projection "
                         "heads; allowed for it: features (or auto, which picks features)")
    if target == "auto":
        return "heads" if teacher.heads else "features"
    return target


def resample_patch_tokens(tokens: torch.Tensor, grid: tuple[int, int], to_grid: tuple[int, int]) -> torch.Tensor:
    """(B, rows*cols, D) tokens of ``grid`` -> (B, to_rows*to_cols, D), bilinear on the 2-D grid."""
    if tuple(grid) == tuple(to_grid):
        return tokens
    batch, _, dim = tokens.shape
    image = tokens.transpose(1, 2).reshape(batch, dim, *grid)
    image = F.interpolate(image.float(), size=tuple(to_grid), mode="bilinear", align_corners=False)
    return image.to(tokens.dtype).flatten(2).transpose(1, 2)


class FrozenTeacher(nn.Module):
    """The teacher's backbone and heads, frozen. ``student_mean`` / ``student_std``: the student
    pipeline's normalisation, undone and replaced by the teacher's before its forward (None:
    the student's images are taken to be normalised as the teacher's)."""

    def __init__(self, source: TeacherFile, student_mean=None, student_std=None):
        super().__init__()
        self.backbone = source.backbone
        self.heads = nn.ModuleDict(source.heads)
        self.description = source.description
        for param in self.parameters():
            param.requires_grad_(False)
        pre = source.preprocessing or {}
        teacher_mean = torch.tensor(pre.get("mean") or IMAGENET_MEAN, dtype=torch.float32)
        teacher_std = torch.tensor(pre.get("std") or IMAGENET_STD, dtype=torch.float32)
        mean = teacher_mean if student_mean is None else torch.tensor(student_mean, dtype=torch.float32)
        std = teacher_std if student_std is None else torch.tensor(student_std, dtype=torch.float32)
        # x_teacher = (x_student * std + mean - teacher_mean) / teacher_std, per channel.
        self.register_buffer("scale", (std / teacher_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean - teacher_mean) / teacher_std).view(1, 3, 1, 1), persistent=False)
        self.same_normalisation = bool(torch.allclose(self.scale, torch.ones(())) and
                                       torch.allclose(self.shift, torch.zeros(())))
        self.eval()

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)  # always in eval mode, whatever Lightning asks of the whole module

    @property
    def patch_head(self) -> DINOHead:
        """The head for patch tokens: the iBOT head, or the DINO head when there is no separate one."""
        return self.heads["ibot_head"] if "ibot_head" in self.heads else self.heads["dino_head"]

    @torch.no_grad()
    def tokens(self, images: torch.Tensor, student_grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """[CLS] (B, D_t) and patch tokens (B, N_student, D_t) on the student's patch grid."""
        if not self.same_normalisation:
            images = images * self.scale.to(images.dtype) + self.shift.to(images.dtype)
        out = self.backbone.forward_features(images)
        grid = self.backbone.patch_embed.grid_size(*images.shape[-2:])
        return out["x_norm_clstoken"], resample_patch_tokens(out["x_norm_patchtokens"], grid, student_grid)
