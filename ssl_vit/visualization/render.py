"""Pictures as (3, H, W) tensors in [0, 1], laid out by torchvision's ``make_grid``: one column per
image, the original on top."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

from ssl_vit.visualization.attention import cls_attention_maps
from ssl_vit.visualization.pca import joint_pca, patch_features, pca_foreground

# A dark-to-bright colour ramp (black, purple, orange, yellow) for single-channel maps.
RAMP = torch.tensor([[0.0, 0.0, 0.0], [0.35, 0.05, 0.55], [0.95, 0.45, 0.1], [1.0, 1.0, 0.6]])


def colourise(maps: torch.Tensor) -> torch.Tensor:
    """(..., H, W) values in [0, 1] -> (..., 3, H, W) colours along ``RAMP``."""
    position = maps.clamp(0, 1) * (len(RAMP) - 1)
    low = position.floor().long().clamp(max=len(RAMP) - 2)
    frac = (position - low).unsqueeze(-1)
    colours = RAMP[low] * (1 - frac) + RAMP[low + 1] * frac  # (..., H, W, 3)
    return colours.movedim(-1, -3)


def per_map_range(maps: torch.Tensor) -> torch.Tensor:
    """Each (H, W) map scaled to [0, 1] on its own."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - low) / (high - low).clamp_min(1e-12)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, rows, cols) -> (B, C, H, W), nearest: one block per patch."""
    return F.interpolate(maps, size=size, mode="nearest")


def attention_picture(backbone, images: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Rows: the images, then the [CLS] attention of each head of the last block."""
    maps = upsample(per_map_range(cls_attention_maps(backbone, images)), pixels.shape[-2:])  # (B, h, H, W)
    rows = [pixels.float()] + [colourise(maps[:, head]) for head in range(maps.shape[1])]
    return layout(rows)


def pca_picture(backbone, images: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Rows: the images, the first three PCA components of the patch features as RGB (fitted on
    all images together, each component scaled over all of them), and the foreground the first
    component gives (see :func:`pca_foreground`)."""
    features = patch_features(backbone, images)
    grid = backbone.patch_embed.grid_size(*images.shape[-2:])
    components = joint_pca(features, 3)  # (B, N, 3)
    low, high = components.amin(dim=(0, 1)), components.amax(dim=(0, 1))
    rgb = ((components - low) / (high - low).clamp_min(1e-12)).transpose(1, 2).reshape(-1, 3, *grid)
    mask = pca_foreground(features, grid).float().reshape(-1, 1, *grid).expand(-1, 3, -1, -1)
    return layout([pixels.float(), upsample(rgb, pixels.shape[-2:]), upsample(mask, pixels.shape[-2:])])


def layout(rows: list[torch.Tensor]) -> torch.Tensor:
    """Rows of (B, 3, H, W) -> one (3, H', W') picture, B columns, 1 px white lines between."""
    batch = rows[0].shape[0]
    return make_grid(torch.cat(rows).clamp(0, 1).cpu(), nrow=batch, padding=1, pad_value=1.0)
