"""MAE on held-out images: its reconstruction loss beside a trivial predictor's.

Both are scored exactly as training scores the model (``mae_loss``, removed patches only) on the
same images with the same masks (noise from a fixed seed, drawn per batch in loader order):

* with ``norm_pix_loss`` every target patch has mean 0, so the trivial prediction is 0;
* without it, every removed pixel is predicted as the image's mean visible pixel (per channel).
"""
from __future__ import annotations

import torch

from ssl_vit.losses.mae import mae_loss, patchify


def trivial_prediction(images: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix_loss: bool):
    """(B, L, p*p*3): zeros for normalised targets, else each image's mean visible pixel."""
    target = patchify(images, patch_size)
    if norm_pix_loss:
        return torch.zeros_like(target)
    channels = images.shape[1]
    pixels = target.view(*target.shape[:2], -1, channels)  # (B, L, p*p, C): channel fastest
    visible = (1 - mask).view(*mask.shape, 1, 1)
    mean = (pixels * visible).sum((1, 2)) / (visible.sum((1, 2)) * pixels.shape[2])  # (B, C)
    return mean.view(-1, 1, 1, channels).expand_as(pixels).reshape(target.shape)


@torch.no_grad()
def heldout_reconstruction(method, loader, seed: int = 0, device: str | torch.device = "cpu") -> dict[str, float]:
    """Mean MAE loss of ``method`` and of the trivial predictor over ``loader`` (image-weighted
    by removed patches, as one big batch would be)."""
    was_training = method.training
    method.eval()
    generator = torch.Generator().manual_seed(seed)
    sums = {"mae_loss": 0.0, "trivial_loss": 0.0}
    removed = 0.0
    p = method.encoder.patch_size
    try:
        for images, _ in loader:
            images = images.to(device)
            grid = method.encoder.patch_embed.grid_size(*images.shape[-2:])
            noise = torch.rand(images.shape[0], grid[0] * grid[1], generator=generator).to(device)
            pred, mask = method.reconstruct(images, noise)
            count = float(mask.sum())
            sums["mae_loss"] += float(mae_loss(images, pred, mask, p, method.norm_pix_loss)) * count
            trivial = trivial_prediction(images, mask, p, method.norm_pix_loss)
            sums["trivial_loss"] += float(mae_loss(images, trivial, mask, p, method.norm_pix_loss)) * count
            removed += count
    finally:
        method.train(was_training)
    result = {key: value / removed for key, value in sums.items()}
    result["ratio_to_trivial"] = result["mae_loss"] / result["trivial_loss"]
    return result
