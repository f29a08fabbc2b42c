"""Stochastic depth (drop path) by one of two laws, chosen per method (``model.drop_path_law``).

``bernoulli`` (DINO, MAE; timm's ``DropPath``): every sample keeps a residual branch with
probability ``1 - p``, scaled by ``1 / (1 - p)``. The branch is computed for every sample and
multiplied by the mask (``layers.DropPath``).

``subset`` (DINOv2: ``drop_add_residual_stochastic_depth`` in the official ``layers/block.py``,
which its multi-crop training path uses at every rate): each branch is added, scaled by
``B / k``, to a random subset of exactly ``k = max(int(B * (1 - p)), 1)`` of the B samples of a
group, drawn by ``randperm``. The branch is computed on those k samples only: a fraction ``p``
of the branch's work is skipped (at DINOv2's ViT-L rate 0.3, 30% of the student's blocks), and
the subset size is known on the host, so nothing waits for the device.

Where the computation cannot be narrowed to the subset (packed crops, the pruned last block),
the same draws give per-sample factors (``B / k`` on the subset, 0 elsewhere) that multiply the
branch: same law, same samples, same values up to float rounding.
"""
from __future__ import annotations

from typing import Callable

import torch

DROP_PATH_LAWS = ("bernoulli", "subset")


def kept_subset(batch: int, drop_prob: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """The samples that keep the branch (k random indices) and their scale ``batch / k``."""
    kept = max(int(batch * (1.0 - drop_prob)), 1)
    return torch.randperm(batch, device=device)[:kept], batch / kept


def subset_factors(batch: int, drop_prob: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Per-sample factors (B,) of one ``kept_subset`` draw: ``B / k`` where kept, else 0."""
    indices, scale = kept_subset(batch, drop_prob, device)
    return torch.zeros(batch, device=device, dtype=dtype).index_fill_(0, indices, scale)


def branch_factors(batch: int, drop_prob: float, law: str, like: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One draw of a residual branch's per-sample factors (B,) under ``law`` and the divisor that
    follows them (``branch * factors / divisor``), for paths that compute the branch on every
    sample: ``bernoulli``: ``DropPath``'s 0/1 masks, drawn as it draws them, and ``1 - p``;
    ``subset``: ``subset_factors`` and 1."""
    if law == "subset":
        return subset_factors(batch, drop_prob, like.device, like.dtype), 1.0
    return like.new_empty((batch, 1, 1)).bernoulli_(1.0 - drop_prob).view(batch), 1.0 - drop_prob


def apply_branch_factors(branch: torch.Tensor, factors: torch.Tensor, divisor: float) -> torch.Tensor:
    """``branch * factors / divisor`` (``factors`` broadcast over the branch's rows; the division
    skipped when ``divisor`` is 1, as under the subset law)."""
    scaled = branch * factors
    return scaled if divisor == 1.0 else scaled / divisor


def add_branch_on_subset(x: torch.Tensor, indices: torch.Tensor, scale: float, branch_out: torch.Tensor) -> torch.Tensor:
    """``x`` (B, ...) plus ``scale * branch_out`` (k, ...) at the samples ``indices``."""
    return torch.index_add(x, 0, indices, branch_out.to(x.dtype), alpha=scale)


def add_residuals_on_subsets(xs: list[torch.Tensor], drop_prob: float,
                             branch: Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> list[torch.Tensor]:
    """``x + branch(x)`` under the subset law for groups of sequences: one subset per group
    (drawn in group order), the branch run on the kept samples of all groups at once."""
    subsets = [kept_subset(x.shape[0], drop_prob, x.device) for x in xs]
    outs = branch([x.index_select(0, indices) for x, (indices, _) in zip(xs, subsets)])
    return [add_branch_on_subset(x, indices, scale, out) for x, (indices, scale), out in zip(xs, subsets, outs)]
