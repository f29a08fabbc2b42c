"""DINO cls-token loss with a centered (or Sinkhorn-Knopp) teacher."""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_vit.losses.center import EMACenterMixin, check_center_reduction
from ssl_vit.losses.sinkhorn import sinkhorn_knopp

__all__ = ["DINOLoss", "compute_dtype"]

Crops = Union[Sequence[torch.Tensor], torch.Tensor]


def _stack_crops(crops: Crops, what: str) -> torch.Tensor:
    """A list of ``(B, K)`` crops, or an already stacked ``(n, B, K)`` tensor -> ``(n, B, K)``."""
    if isinstance(crops, torch.Tensor):
        if crops.dim() != 3:
            raise ValueError(f"{what}: expected a list of (B, K) tensors or one (n_crops, B, K) tensor")
        return crops
    crops = list(crops)
    if not crops:
        raise ValueError(f"{what}: no crops given")
    return torch.stack(crops, dim=0)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 if any input is float64 (half-precision inputs are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class DINOLoss(EMACenterMixin, nn.Module):
    """Cross-entropy between teacher targets on the global crops and student predictions.

    Crop layout (explicit indexing):

    * student crops: ``[global_0, global_1, local_0, ..., local_{n-1}]``, each ``(B, K)`` logits;
    * teacher crops: ``[global_0, global_1]``, each ``(B, K)`` *probabilities* (from
      :meth:`softmax_center_teacher` or :meth:`sinkhorn_teacher`).

    Teacher crop ``i`` is compared with every student crop except student crop ``i`` (a global
    crop is never compared with itself; each local crop is compared with both teacher views).
    Each pair contributes the batch mean of ``-sum_k p_t * log_softmax(s / student_temp)``, and
    the loss is the sum over valid pairs divided by ``n_pairs = 2 * (n_crops - 1)`` with
    ``n_crops = 2 + n_local`` (generally ``n_teacher * (n_student - 1)``).

    Center order within a training step (the batch of step t must not be in the center used at
    step t)::

        probs = loss.softmax_center_teacher(teacher_logits, temp)   # uses the old center
        value = loss(student_logits, probs.chunk(2))
        loss.update_center(teacher_logits)                           # then fold in this batch

    :meth:`softmax_center_teacher` never modifies the center; only :meth:`update_center` does.
    With Sinkhorn-Knopp targets no center is used (DINOv2 then does not need to update it).
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 center_reduction: str = "sample_mean"):
        super().__init__()
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center_reduction = check_center_reduction(center_reduction)
        self.register_buffer("center", torch.zeros(1, out_dim))

    # ----------------------------------------------------------------- teacher targets
    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """``softmax((teacher_logits - center) / teacher_temp)`` in float32 (center subtracted
        before the temperature). Does not update the center."""
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_teacher(
        self, teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """Sinkhorn-Knopp targets over the all-process batch (no center used). Pass the cls
        logits of both global crops stacked as ``(2 * B_local, K)``; see :func:`sinkhorn_knopp`."""
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=n_iterations)

    # ----------------------------------------------------------------- loss
    def forward(self, student_logits_list: Crops, teacher_probs_list: Crops,
                temperature_applied: bool = False) -> torch.Tensor:
        """Average cross-entropy over the valid (teacher crop, student crop) pairs.

        Args:
            student_logits_list: ``n_student`` crops of ``(B, K)`` student logits, globals first
                (or one ``(n_student, B, K)`` tensor).
            teacher_probs_list: ``n_teacher`` (normally 2) crops of ``(B, K)`` teacher
                probabilities, in the same order as the student's global crops.
            temperature_applied: the student logits are already divided by ``student_temp``
                (the methods fold it into the head: ``DINOHead(x, scale=1 / student_temp)``).
        """
        student = _stack_crops(student_logits_list, "student_logits_list")
        teacher = _stack_crops(teacher_probs_list, "teacher_probs_list")
        n_t, n_s = teacher.shape[0], student.shape[0]
        if n_s < n_t:
            raise ValueError("the student must see at least the teacher's global crops")
        if student.shape[1:] != teacher.shape[1:]:
            raise ValueError(f"shape mismatch: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}")
        batch = student.shape[1]

        dtype = compute_dtype(student, teacher)
        # Autocast off: under bf16 autocast the einsum would round both operands to bf16 (a
        # loss of ~7 showed in steps of 1/32 and its gradients were as coarse).
        with torch.autocast(device_type=student.device.type, enabled=False):
            teacher = teacher.to(dtype)
            scores = student.to(dtype) if temperature_applied else student.to(dtype) / self.student_temp
            log_p_s = F.log_softmax(scores, dim=-1)  # (n_s, B, K)
            # ce[t, s] = mean over the batch of -sum_k p_t * log p_s, for every pair at once: one
            # (n_t, B*K) x (B*K, n_s) product, whose backward hands log_softmax a contiguous
            # gradient (the einsum's needed a copy: 17.8 -> 9.8 ms at 10 x 16 x 65,536).
            ce = -(teacher.reshape(n_t, -1) @ log_p_s.reshape(n_s, -1).t()) / batch
        valid = torch.ones(n_t, n_s, dtype=torch.bool, device=ce.device)
        idx = torch.arange(n_t, device=ce.device)
        valid[idx, idx] = False  # global crop i is never compared with itself
        n_pairs = n_t * (n_s - 1)
        return ce.masked_fill(~valid, 0.0).sum() / n_pairs

    # ----------------------------------------------------------------- center
    @torch.no_grad()
    def accumulate_center(self, teacher_logits: Crops) -> None:
        """Fold the *raw* teacher logits of both global crops into this step's center update.

        ``teacher_logits``: ``(2 * B_local, K)``, a list of ``(B_local, K)`` crops, or
        ``(2, B_local, K)``. The batch center is the mean over all rows of all processes
        (``center_reduction="sample_mean"``, DINO's; unequal batch sizes are fine).
        :meth:`update_center` accumulates and applies at once; call either *after* computing this
        step's targets (see :mod:`ssl_vit.losses.center`).
        """
        if not isinstance(teacher_logits, torch.Tensor):
            teacher_logits = torch.cat([t.reshape(-1, t.shape[-1]) for t in teacher_logits], dim=0)
        super().accumulate_center(teacher_logits)
