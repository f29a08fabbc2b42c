"""The last block's [CLS] attention over the patches, one map per head (DINO's figure)."""
from __future__ import annotations

import torch


@torch.no_grad()
def cls_attention_maps(backbone, images: torch.Tensor) -> torch.Tensor:
    """(B, heads, rows, cols): how much the [CLS] query of the last block attends to each patch
    (softmax weights over all tokens; the prefix tokens' share is left out of the picture)."""
    attention = backbone.last_self_attention(images)  # (B, heads, T, T)
    rows, cols = backbone.patch_embed.grid_size(*images.shape[-2:])
    prefix = 1 + backbone.num_register_tokens
    return attention[:, :, 0, prefix:].reshape(images.shape[0], -1, rows, cols).float()
