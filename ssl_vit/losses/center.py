"""The EMA center of the teacher's outputs (DINO cls center, iBOT patch center).

``center <- m * center + (1 - m) * batch_center`` once per optimizer step, after that step's
targets were computed with the old center. What ``batch_center`` is over several processes
depends on the loss, as in the released code:

* ``"sample_mean"`` (DINO's cls center): the mean over every row of every process (per-process
  sums and row counts are all-reduced together, so unequal batch sizes are weighted by rows);
* ``"process_mean"`` (DINOv2's iBOT patch center): each process takes the mean over its own rows
  (its masked tokens), and the batch center is the plain average of those per-process means.
  The two differ whenever processes hold different numbers of rows, which block masking allows.
  A process without any row this step is left out of the average (the released code would
  divide by zero there); with none anywhere the center is unchanged.

The update is split in two so that gradient accumulation folds every micro-batch of one
optimizer step into one update: :meth:`EMACenterMixin.accumulate_center` adds a micro-batch's
local statistics, :meth:`EMACenterMixin.apply_center_update` reduces them over processes and
applies the EMA; :meth:`EMACenterMixin.update_center` does both at once.
"""
from __future__ import annotations

import torch

from ssl_vit.losses.distributed import all_reduce_sum

CENTER_REDUCTIONS = ("sample_mean", "process_mean")


def check_center_reduction(value: str) -> str:
    if value not in CENTER_REDUCTIONS:
        raise ValueError(f"center_reduction={value!r}; allowed: {', '.join(CENTER_REDUCTIONS)}")
    return value


@torch.no_grad()
def local_center_statistics(logits: torch.Tensor) -> torch.Tensor:
    """``(K + 1,)`` float32: the sum of the rows of ``logits`` (``(..., K)``) and their count."""
    flat = logits.detach().reshape(-1, logits.shape[-1]).float()
    return torch.cat([flat.sum(dim=0), flat.new_tensor([float(flat.shape[0])])])


@torch.no_grad()
def ema_center_update(center: torch.Tensor, statistics: torch.Tensor, momentum: float,
                      reduction: str = "sample_mean") -> None:
    """Reduce one step's local ``statistics`` (from :func:`local_center_statistics`, summed over
    micro-batches) over processes, then ``center <- m * center + (1 - m) * batch_center``."""
    stats = statistics.detach().float().clone()
    if reduction == "process_mean":
        count = stats[-1]
        has_rows = (count > 0).float()
        stats = torch.cat([stats[:-1] / count.clamp(min=1.0) * has_rows, has_rows.reshape(1)])
    else:
        check_center_reduction(reduction)
    all_reduce_sum(stats)  # one collective: summed means (or sums) and the divisor
    divisor = stats[-1]
    batch_center = (stats[:-1] / divisor.clamp(min=1.0)).reshape(center.shape).to(center.dtype)
    updated = center * momentum + batch_center * (1.0 - momentum)
    center.copy_(torch.where(divisor > 0, updated, center))  # no host sync


class EMACenterMixin:
    """Center bookkeeping of a loss module that owns a ``center`` buffer, ``center_momentum`` and
    ``center_reduction`` (see the module docstring)."""

    center: torch.Tensor
    center_momentum: float
    center_reduction: str
    _pending_center_stats: torch.Tensor | None = None

    @torch.no_grad()
    def accumulate_center(self, teacher_logits: torch.Tensor) -> None:
        """Fold a micro-batch's raw teacher outputs ``(..., K)`` into this step's pending update."""
        self._add_pending(local_center_statistics(teacher_logits))

    @torch.no_grad()
    def accumulate_center_of_product(self, features: torch.Tensor, prototypes: torch.Tensor) -> None:
        """:meth:`accumulate_center` of the outputs ``features @ prototypes.T`` (``(..., D)`` and
        ``(K, D)``) without forming them: the row sum of a linear map's outputs is the map of the
        inputs' row sum, one (D,) x (D, K) product in float32 instead of a pass over (rows, K)."""
        flat = features.detach().reshape(-1, features.shape[-1]).float()
        with torch.autocast(flat.device.type, enabled=False):
            sums = flat.sum(dim=0) @ prototypes.detach().float().t()
        self._add_pending(torch.cat([sums, sums.new_tensor([float(flat.shape[0])])]))

    def _add_pending(self, stats: torch.Tensor) -> None:
        pending = self._pending_center_stats
        self._pending_center_stats = stats if pending is None else pending + stats

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Apply the pending update (reduced over processes); nothing pending: no-op. Every
        process must call it at the same optimizer steps (it may all-reduce)."""
        if self._pending_center_stats is None:
            return
        ema_center_update(self.center, self._pending_center_stats, self.center_momentum, self.center_reduction)
        self._pending_center_stats = None

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """:meth:`accumulate_center` and :meth:`apply_center_update` in one call."""
        self.accumulate_center(teacher_logits)
        self.apply_center_update()
