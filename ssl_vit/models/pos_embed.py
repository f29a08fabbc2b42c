"""Position encodings: the fixed 2-D sin-cos table, interpolation of learned tables, 2-D RoPE."""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d_table(dim: int, rows: int, cols: int, cls_token: bool = False) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table, (rows*cols [+1], dim), row-major token order.

    The first half of the channels encodes the column index and the second half the row index;
    each half is D/4 sines followed by D/4 cosines of the frequencies 1/10000^(k/(D/4)).
    With ``cls_token`` a zero row for the [CLS] token comes first.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need an embedding width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    row_idx, col_idx = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij"
    )

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(col_idx), encode(row_idx)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float()


def interpolate_pos_embed(
    patch_pos: torch.Tensor,
    src_grid: tuple[int, int],
    dst_grid: tuple[int, int],
    offset: float = 0.0,
    antialias: bool = False,
) -> torch.Tensor:
    """Bicubic resampling of a (1, rows*cols, D) table of patch positions to another grid.

    ``offset`` > 0 reproduces the DINO / DINOv2 training code, which passes
    ``scale_factor=(rows + offset) / src_rows`` to ``F.interpolate`` (so the sampling positions
    differ slightly from an exact resize); ``offset == 0`` resizes to the exact size, the
    convention of timm and of DINOv2's released register models (both with antialiasing).
    """
    if tuple(src_grid) == tuple(dst_grid):
        return patch_pos
    dim = patch_pos.shape[-1]
    src_rows, src_cols = src_grid
    dst_rows, dst_cols = dst_grid
    grid = patch_pos.float().reshape(1, src_rows, src_cols, dim).permute(0, 3, 1, 2)
    if offset:
        scale = ((dst_rows + offset) / src_rows, (dst_cols + offset) / src_cols)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        grid = F.interpolate(grid, size=(dst_rows, dst_cols), mode="bicubic", antialias=antialias)
    if grid.shape[-2:] != (dst_rows, dst_cols):  # a scale factor can round to a different size
        raise RuntimeError(
            f"position interpolation gave a {tuple(grid.shape[-2:])} grid, expected {dst_grid}"
        )
    return grid.permute(0, 2, 3, 1).reshape(1, dst_rows * dst_cols, dim).to(patch_pos.dtype)


class Rope2D(nn.Module):
    """Axial 2-D rotary position embedding for the patch tokens of each attention head.

    The first half of a head's channels rotates with the patch row, the second half with the
    column; each half uses head_dim/4 frequencies theta^(-k/(head_dim/4)) in the
    "rotate half" layout. [CLS] and register tokens are left unrotated.
    """

    def __init__(self, head_dim: int, theta: float = 100.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head width divisible by 4, got {head_dim}")
        quarter = head_dim // 4
        inv_freq = theta ** (-torch.arange(quarter, dtype=torch.float32) / quarter)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables of shape (rows*cols, head_dim) for a patch grid."""
        r, c = torch.meshgrid(
            torch.arange(rows, device=self.inv_freq.device, dtype=torch.float32),
            torch.arange(cols, device=self.inv_freq.device, dtype=torch.float32),
            indexing="ij",
        )
        row_angles = r.reshape(-1, 1) * self.inv_freq
        col_angles = c.reshape(-1, 1) * self.inv_freq
        # Each axis owns half the channels; "rotate half" pairs channel i with i + quarter.
        angles = torch.cat([row_angles, row_angles, col_angles, col_angles], dim=1)
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last ``len(cos)`` tokens of x (B, H, T, head_dim); earlier tokens are prefixes."""
    n_patch = cos.shape[0]
    prefix, patches = x[..., : x.shape[-2] - n_patch, :], x[..., x.shape[-2] - n_patch :, :]
    half = patches.shape[-1] // 2
    quarter = half // 2

    def rotate_half(t: torch.Tensor) -> torch.Tensor:
        # Within each axis's half: (a, b) -> (-b, a).
        a_row, b_row, a_col, b_col = t.split(quarter, dim=-1)
        return torch.cat([-b_row, a_row, -b_col, a_col], dim=-1)

    rotated = patches * cos.to(patches.dtype) + rotate_half(patches) * sin.to(patches.dtype)
    return torch.cat([prefix, rotated], dim=-2)
