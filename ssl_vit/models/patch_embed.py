"""Convolutional patch embedding with input checks that name what went wrong."""
from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Split an image into non-overlapping patches and project each to ``embed_dim``.

    Returns the tokens as (B, N, D) in row-major order and the patch grid (rows, cols).
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = int(patch_size)
        self.in_chans = int(in_chans)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid for an image size, or a ValueError naming the size and the patch size."""
        p = self.patch_size
        if height < p or width < p:
            raise ValueError(
                f"image of {height}x{width} pixels is smaller than one {p}x{p} patch; "
                f"expected height and width >= {p}"
            )
        if height % p or width % p:
            raise ValueError(
                f"image of {height}x{width} pixels is not divisible by the patch size {p}; "
                f"expected height and width to be multiples of {p}"
            )
        return height // p, width // p

    def check_input(self, x: torch.Tensor) -> tuple[int, int]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected images as a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(
                f"expected images of shape (B, {self.in_chans}, H, W), got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected {self.in_chans}-channel images (B, {self.in_chans}, H, W), got "
                f"{x.shape[1]} channels in shape {tuple(x.shape)}; replicate grayscale to "
                f"3 channels in the data pipeline"
            )
        return self.grid_size(x.shape[2], x.shape[3])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        grid = self.check_input(x)
        x = self.proj(x)  # (B, D, rows, cols)
        return x.flatten(2).transpose(1, 2), grid
