"""PCA of patch features fitted jointly over a set of images (DINOv2's figure), and the
foreground proxy built on its first component.

The first principal component of patch features of a trained backbone tends to separate the
object from the background. :func:`pca_foreground` thresholds it at 0 with one global sign for
all images, chosen so that the border patches are mostly negative (background); no per-image
choice. :func:`foreground_iou` scores that against the pixels: a patch is foreground when most
of its pixels are above 10% of the image's maximum.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def patch_features(backbone, images: torch.Tensor) -> torch.Tensor:
    """(B, N, D) normalised patch tokens, in float32."""
    return backbone.forward_features(images)["x_norm_patchtokens"].float()


def joint_pca(features: torch.Tensor, n_components: int = 3) -> torch.Tensor:
    """(B, N, D) -> (B, N, n_components): projections on the principal axes of all B * N patch
    features together (centred; axes ordered by variance)."""
    flat = features.reshape(-1, features.shape[-1]).double()
    flat = flat - flat.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    return (flat @ vh[:n_components].T).float().reshape(*features.shape[:2], n_components)


def border_mask(rows: int, cols: int) -> torch.Tensor:
    """(rows * cols,) True on the outermost ring of the patch grid."""
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    mask[0], mask[-1], mask[:, 0], mask[:, -1] = True, True, True, True
    return mask.reshape(-1)


def pca_foreground(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N) bool: the first component above 0, its sign chosen once so that most border
    patches of all images are negative."""
    first = joint_pca(features, 1)[..., 0]
    border = border_mask(*grid)
    if (first[:, border] > 0).float().mean() > 0.5:
        first = -first
    return first > 0


def pixel_foreground(pixels: torch.Tensor, patch_size: int, threshold: float = 0.1) -> torch.Tensor:
    """(B, N) bool from (B, C, H, W) pixels in [0, 1]: a patch is foreground when more than half of
    its pixels exceed ``threshold`` x the image's maximum (channels averaged)."""
    gray = pixels.float().mean(1, keepdim=True)
    peak = gray.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    share = F.avg_pool2d((gray > threshold * peak).float(), patch_size)  # fraction per patch
    return (share > 0.5).flatten(1)


def foreground_iou(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """Intersection over union of two (B, N) bool masks, pooled over all images."""
    union = (predicted | truth).sum()
    return float((predicted & truth).sum() / union) if union else 1.0
