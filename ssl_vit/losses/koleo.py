"""KoLeo regulariser (Kozachenko-Leonenko differential-entropy estimator), as used by DINOv2."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["koleo_loss", "koleo_loss_per_crop"]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``-mean_i log(||x_i - x_nn(i) + eps|| + eps)`` on L2-normalised rows of ``x`` ``(n, D)``.

    Steps: ``x = F.normalize(x, eps=eps)``; the nearest neighbour of each row is the other row
    with the largest dot product (cosine; self excluded by setting the diagonal to ``-inf``);
    the distance is ``F.pairwise_distance(x, x_nn, eps=eps)``, which adds ``eps`` inside the norm;
    ``eps`` is added again before the log. Gradients flow through both ``x`` and ``x_nn``; the
    neighbour search itself is not differentiated. Computed in at least float32, autocast off.

    A batch of one row has no neighbour, so the estimator is undefined; we return a zero that is
    still connected to ``x`` (``x.sum() * 0``), so ``backward()`` works and gives zero gradients
    instead of failing or producing NaN.

    DINOv2 applies it to the student *backbone* cls tokens (before the head) of each global crop
    separately, within one process (no all-gather), sums the two crops' values and weights the
    sum by 0.1; that weighting belongs to the method, not to this function.
    """
    if x.dim() != 2:
        raise ValueError(f"koleo_loss expects (n, D), got {tuple(x.shape)}")
    if x.shape[0] < 2:
        return x.sum() * 0.0
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x, p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.t()
            dots.fill_diagonal_(float("-inf"))
            nn_idx = dots.argmax(dim=1)
        dist = F.pairwise_distance(x, x[nn_idx], p=2, eps=eps)
        return -torch.log(dist + eps).mean()


def koleo_loss_per_crop(x: torch.Tensor, n_crops: int) -> torch.Tensor:
    """Sum over crops of :func:`koleo_loss`, ``x`` crop-major ``(n_crops * B, D)``: neighbours are
    searched within one crop's batch, as DINOv2 does for its global crops."""
    return sum(koleo_loss(crop) for crop in x.chunk(n_crops))
