"""MAE's reconstruction target and loss (He et al., 2022; the released ``models_mae.py``).

``patchify`` lays each patch out as (row, column, channel): for patch size p the target vector of
a patch is ``pixels[r, c, ch]`` flattened with the channel fastest, ``r, c`` in ``0..p-1``. The
loss is the per-patch mean squared error, averaged over the removed patches only (mask 1).
"""
from __future__ import annotations

import torch


def _check_images(images: torch.Tensor, patch_size: int) -> tuple[int, int]:
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch_size}")
    return height // patch_size, width // patch_size


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches in row-major order, each laid out (row, col, channel)."""
    rows, cols = _check_images(images, patch_size)
    batch, channels = images.shape[:2]
    p = patch_size
    x = images.reshape(batch, channels, rows, p, cols, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, rows, cols, p_row, p_col, C)
    return x.reshape(batch, rows * cols, p * p * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """The inverse of :func:`patchify`: (B, L, p*p*C) -> (B, C, rows*p, cols*p)."""
    rows, cols = grid
    batch, length, dim = patches.shape
    p = patch_size
    if length != rows * cols or dim != p * p * channels:
        raise ValueError(f"patches of shape {tuple(patches.shape)} do not fit a {rows}x{cols} grid of "
                         f"{p}x{p}x{channels} patches")
    x = patches.reshape(batch, rows, cols, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(batch, channels, rows * p, cols * p)


def normalized_patch_target(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``norm_pix_loss``: each patch minus its mean, over sqrt(unbiased variance + eps)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)  # unbiased, as torch.var's default in the paper's code
    return (target - mean) / (var + eps) ** 0.5


def mae_loss(images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
             norm_pix_loss: bool = False) -> torch.Tensor:
    """MAE loss: per-patch MSE between ``pred`` (B, L, p*p*C) and the patchified ``images``
    (normalised per patch with ``norm_pix_loss``), averaged over the patches where ``mask`` is 1."""
    target = patchify(images, patch_size)
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)}; the patchified images have {tuple(target.shape)}")
    if mask.shape != target.shape[:2]:
        raise ValueError(f"mask must have shape (B, L) = {tuple(target.shape[:2])}, got {tuple(mask.shape)}")
    if norm_pix_loss:
        target = normalized_patch_target(target)
    per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()
