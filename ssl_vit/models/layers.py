"""Small building blocks of the ViT: drop path, LayerScale, feed-forward layers.

One job per class; the block, attention and embeddings live in their own files.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample (training only)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        # Scale the kept samples so the expected output equals the input.
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def scaled_linear(linear: nn.Linear, x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``linear(x) * scale`` (``scale``: per output channel, or None for ``linear(x)``), computed as
    ``(scale * W) x + scale * b``: the scale multiplies the (out, in) weight instead of every
    token's output, so neither the forward nor the backward makes a pass over the tokens for it,
    and no branch output is kept for the scale's gradient. Equal up to float rounding."""
    if scale is None:
        return linear(x)
    bias = None if linear.bias is None else linear.bias * scale
    return F.linear(x, linear.weight * scale.unsqueeze(-1), bias)


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (CaiT / DINOv2 ``ls1`` / ``ls2``). The
    blocks fold it into the branch's output projection (``scaled_linear``); ``forward`` is the
    plain product."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """Linear - GELU - Linear feed-forward."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``out_scale``: a LayerScale's gamma, folded into ``fc2`` (``scaled_linear``)."""
        return scaled_linear(self.fc2, self.act(self.fc1(x)), out_scale)


class SwiGLU(nn.Module):
    """SwiGLU feed-forward with the gate and value projections fused (DINOv2's ``w12`` / ``w3``)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.w3 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``out_scale``: a LayerScale's gamma, folded into ``w3`` (``scaled_linear``)."""
        gate, value = self.w12(x).chunk(2, dim=-1)
        return scaled_linear(self.w3, F.silu(gate) * value, out_scale)


def swiglu_hidden_dim(dim: int, mlp_ratio: float) -> int:
    """DINOv2's SwiGLU width: 2/3 of the MLP width, rounded up to a multiple of 8.

    This keeps the parameter count of the SwiGLU block equal to the plain MLP it replaces.
    """
    hidden = int(int(dim * mlp_ratio) * 2 / 3)
    return (hidden + 7) // 8 * 8
