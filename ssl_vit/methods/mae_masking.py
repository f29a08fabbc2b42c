"""MAE's per-sample random masking (the released ``random_masking``), as a public function."""
from __future__ import annotations

import torch


def kept_patches(num_patches: int, mask_ratio: float) -> int:
    """Patches MAE keeps: ``int(L * (1 - ratio))`` (truncated), checked to keep at least one."""
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0 < mask_ratio < 1:
        raise ValueError(f"method.mask_ratio={mask_ratio!r}; allowed: a number in (0, 1)")
    keep = int(num_patches * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(
            f"method.mask_ratio={mask_ratio} keeps int({num_patches} x (1 - {mask_ratio})) = 0 of the "
            f"{num_patches} patches; allowed: a ratio below {1 - 1 / num_patches:.4g} for this patch grid"
        )
    return keep


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Per-sample random masking by sorting uniform noise (small noise = kept).

    Args:
        x: tokens (B, L, ...) or just their shape's holder; only B, L and the device are used.
        mask_ratio: fraction of patches removed, in (0, 1); ``int(L * (1 - ratio))`` are kept.
        noise: (B, L) noise to sort (the paper's code draws ``torch.rand``); drawn when None.

    Returns:
        ``ids_keep`` (B, K) indices of the kept patches (in order of increasing noise),
        ``mask`` (B, L) float, 1 for removed and 0 for kept patches (in patch order),
        ``ids_restore`` (B, L): ``concat(kept, removed)[ids_restore]`` is the patch order again.
    """
    batch, length = x.shape[:2]
    keep = kept_patches(length, mask_ratio)
    if noise is None:
        noise = torch.rand(batch, length, device=x.device)
    elif tuple(noise.shape) != (batch, length):
        raise ValueError(f"noise must have shape (B, L) = ({batch}, {length}), got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(batch, length, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, mask, ids_restore
