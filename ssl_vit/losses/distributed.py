"""Minimal collective helpers used by the losses.

Every helper is a no-op when ``torch.distributed`` is unavailable or not initialised, so the
losses run unchanged in a single process (tests, notebooks, CPU debugging).

The reductions work **in place** (like ``torch.distributed.all_reduce``) and return the same
tensor for convenience. They are meant for statistics computed under ``torch.no_grad()``
(centers, Sinkhorn-Knopp normalisers); they do not propagate gradients across processes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_dist_enabled", "world_size", "rank", "all_reduce_sum", "all_reduce_mean"]


def is_dist_enabled() -> bool:
    """True when a default process group is available and initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_dist_enabled() else 1


def rank() -> int:
    """Rank of this process in the default group (0 when not distributed)."""
    return dist.get_rank() if is_dist_enabled() else 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes, in place; returns ``t``. No-op in a single process."""
    if is_dist_enabled() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average ``t`` over all processes (plain mean of the per-process values), in place.

    Note: this is the mean of the per-process tensors, *not* a sample-weighted mean; when
    processes hold different numbers of samples, reduce a (sum, count) pair with
    :func:`all_reduce_sum` instead.
    """
    n = world_size()
    if n > 1:
        all_reduce_sum(t)
        t.div_(n)
    return t
