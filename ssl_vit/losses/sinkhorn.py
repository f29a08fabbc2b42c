"""Sinkhorn-Knopp teacher targets (DINOv2 / SwAV style), exact to the released algorithm."""
from __future__ import annotations

import torch

from ssl_vit.losses.distributed import all_reduce_sum

__all__ = ["sinkhorn_knopp"]


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    n_masked_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Balanced soft assignments of samples to prototypes (no center is involved).

    Args:
        teacher_logits: ``(B_local, K)`` raw teacher head outputs held by *this* process
            (DINO cls variant: the cls tokens of both global crops stacked; iBOT variant: the
            masked patch tokens of this process).
        teacher_temp: teacher temperature; ``Q = exp(logits / teacher_temp)``.
        n_iterations: number of (row, column) normalisation rounds. The papers' code uses 3.
        n_masked_tokens: the number ``B`` of columns over **all** processes. For the iBOT
            variant pass the total number of masked tokens of all processes (int or 0-d/1-element
            tensor). When ``None``, ``B`` is the all-reduced sum of the local row counts, which
            is also correct when processes hold different numbers of samples.

    Returns:
        ``(B_local, K)`` float32 targets; each row sums to 1.

    The algorithm, all in float32: ``Q = exp(logits / temp).T`` (K x B); ``Q /= sum(Q)`` with
    the sum taken over all processes; then ``n_iterations`` times: divide each row (prototype)
    by its all-process sum and by ``K``, then each column (sample) by its sum and by ``B``;
    finally ``Q *= B`` and return ``Q.T``. On several processes this equals one process
    holding the concatenated batch.

    No max-subtraction is done (as in the released code): ``logits / temp`` above ~88
    overflows float32 and produces non-finite targets.
    """
    logits = teacher_logits.float()
    if teacher_temp != 1.0:  # 1.0: the caller folded the temperature into the logits already
        logits = logits / teacher_temp
    q = torch.exp(logits).t()  # (K, B_local)
    k = q.shape[0]

    if n_masked_tokens is None:
        b = all_reduce_sum(torch.tensor(float(q.shape[1]), device=q.device))
    elif isinstance(n_masked_tokens, torch.Tensor):
        b = n_masked_tokens.detach().to(device=q.device, dtype=torch.float32).reshape(())
    else:
        b = torch.tensor(float(n_masked_tokens), device=q.device)

    total = all_reduce_sum(q.sum())
    q = q / total

    for _ in range(n_iterations):
        # Prototypes (rows): each gets total mass 1/K over the whole (all-process) batch.
        row_sums = all_reduce_sum(q.sum(dim=1, keepdim=True))
        q = q / row_sums / k
        # Samples (columns): each gets mass 1/B; columns are local, no communication needed.
        q = q / q.sum(dim=0, keepdim=True) / b

    q = q * b
    return q.t()
