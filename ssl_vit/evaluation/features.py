"""Which features of a backbone an evaluation reads: [CLS], the mean patch token, or both."""
from __future__ import annotations

import torch
from torch import nn

# cls: backbone(images), DINO's k-NN / linear features; mean_patch: the mean of the normalised
# patch tokens (MAE's global pool); cls_avgpool: both concatenated (DINOv2's linear evaluation).
FEATURES = ("cls", "mean_patch", "cls_avgpool")


def check_features(kind: str, key: str = "features") -> str:
    if kind not in FEATURES:
        raise ValueError(f"{key}={kind!r}; allowed: {', '.join(FEATURES)}")
    return kind


class BackboneFeatures(nn.Module):
    """``backbone`` seen through one kind of feature (see ``FEATURES``): (B, D), or (B, 2D) for
    ``cls_avgpool``."""

    def __init__(self, backbone: nn.Module, kind: str = "cls"):
        super().__init__()
        self.backbone, self.kind = backbone, check_features(kind)
        self.embed_dim = backbone.embed_dim * (2 if kind == "cls_avgpool" else 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.backbone.forward_features(images)
        if self.kind == "cls":
            return out["x_norm_clstoken"]
        mean_patch = out["x_norm_patchtokens"].mean(1)
        if self.kind == "mean_patch":
            return mean_patch
        return torch.cat([out["x_norm_clstoken"], mean_patch], dim=-1)
