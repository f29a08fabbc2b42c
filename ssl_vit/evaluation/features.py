"""Which features of a backbone an evaluation reads: its [CLS] token or its mean patch token."""
from __future__ import annotations

import torch
from torch import nn

FEATURES = ("cls", "mean_patch")


class BackboneFeatures(nn.Module):
    """``backbone`` seen through one kind of feature: ``cls`` (what ``backbone(images)`` gives)
    or ``mean_patch`` (the mean of the normalised patch tokens, MAE's global-pool choice)."""

    def __init__(self, backbone: nn.Module, kind: str = "cls"):
        super().__init__()
        if kind not in FEATURES:
            raise ValueError(f"features={kind!r}; allowed: {', '.join(FEATURES)}")
        self.backbone, self.kind = backbone, kind

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.backbone.forward_features(images)
        return out["x_norm_clstoken"] if self.kind == "cls" else out["x_norm_patchtokens"].mean(1)
