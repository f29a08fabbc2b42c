"""MAE's light decoder: encoder tokens + mask tokens, back in patch order, -> pixels per patch.

As the released ``forward_decoder``: a linear map to the decoder width, one learned mask token
per removed patch, un-shuffling by ``ids_restore``, the fixed 2-D sin-cos table (a zero row for
the prefix tokens), pre-LN blocks, a final norm and a linear prediction of the p*p*3 pixels of
every patch. Prefix tokens ([CLS], registers) take part in attention and are dropped at the end.
"""
from __future__ import annotations

import torch
from torch import nn

from ssl_vit.models.block import Block
from ssl_vit.models.pos_embed import sincos_2d_table


def check_decoder_shape(embed_dim: int, depth: int, num_heads: int) -> None:
    """Errors that name the ``method.decoder`` key (raised before any weight is allocated)."""
    for key, value in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"method.decoder.{key}={value!r}; allowed: a positive integer")
    if embed_dim % num_heads:
        raise ValueError(f"method.decoder.embed_dim={embed_dim} is not divisible by method.decoder.num_heads="
                         f"{num_heads}; allowed: a width that is a multiple of the number of heads")
    if embed_dim % 4:
        raise ValueError(f"method.decoder.embed_dim={embed_dim}: the 2-D sin-cos positions need a multiple of 4")


class MAEDecoder(nn.Module):
    def __init__(self, encoder_dim: int, patch_size: int, embed_dim: int = 512, depth: int = 8,
                 num_heads: int = 16, mlp_ratio: float = 4.0, norm_eps: float = 1e-6, in_chans: int = 3):
        super().__init__()
        check_decoder_shape(embed_dim, depth, num_heads)
        self.embed_dim = embed_dim
        self.decoder_embed = nn.Linear(encoder_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_eps=norm_eps)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.pred = nn.Linear(embed_dim, patch_size * patch_size * in_chans)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int],
                num_prefix: int = 1) -> torch.Tensor:
        """``tokens`` (B, P + K, D_enc): the encoder's normalised prefix and kept patch tokens
        (in ``ids_keep`` order); ``ids_restore`` (B, L). Returns (B, L, p*p*3) in patch order."""
        x = self.decoder_embed(tokens)
        prefix, visible = x[:, :num_prefix], x[:, num_prefix:]
        batch, length = ids_restore.shape
        if length != grid[0] * grid[1] or visible.shape[1] > length:
            raise ValueError(f"ids_restore covers {length} patches, the grid {grid} has {grid[0] * grid[1]} "
                             f"and {visible.shape[1]} are visible")
        masked = self.mask_token.to(x.dtype).expand(batch, length - visible.shape[1], -1)
        patches = torch.cat([visible, masked], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, self.embed_dim))
        table = sincos_2d_table(self.embed_dim, *grid).to(device=x.device, dtype=x.dtype)
        x = torch.cat([prefix, patches + table.unsqueeze(0)], dim=1)  # prefix rows: zero positions
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, num_prefix:]
