"""iBOT masked-patch loss (DINOv2)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_vit.losses.center import EMACenterMixin, check_center_reduction
from ssl_vit.losses.dino import compute_dtype
from ssl_vit.losses.sinkhorn import sinkhorn_knopp

__all__ = ["IBOTPatchLoss", "masked_token_weights"]


def masked_token_weights(masks: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weight of every masked token, in the row-major order of ``masks`` (i.e. of ``x[masks]``):
    ``1 / (number of masked patches of its image)``. Shape ``(M,)``."""
    masks = masks.reshape(masks.shape[0], -1).bool()
    per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).to(dtype)  # (n_images,)
    return per_image.unsqueeze(-1).expand_as(masks)[masks]


class IBOTPatchLoss(EMACenterMixin, nn.Module):
    """Patch-token cross-entropy between student (on masked crops) and teacher (on unmasked crops).

    The patch head has its own center buffer ``(1, K)``, independent of the DINO cls center.
    Same step order as :class:`~ssl_vit.losses.dino.DINOLoss`: targets with the old center,
    then :meth:`update_center` (or :meth:`accumulate_center` per micro-batch and
    :meth:`apply_center_update` once per optimizer step).

    ``center_reduction``: how the batch center is formed over processes (see
    :mod:`ssl_vit.losses.center`). The default ``"process_mean"`` is DINOv2's: the average over
    processes of each process's mean over its own masked tokens. ``"sample_mean"`` (the mean over
    all masked tokens of all processes, token-weighted) is an option that departs from it.

    Masked-token tensors ``(M, K)`` must list the masked tokens in the row-major order of the
    boolean mask ``masks`` of shape ``(n_global_crops * B, N)``, i.e. ``tokens[masks]``.
    """

    center: torch.Tensor

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 center_reduction: str = "process_mean"):
        super().__init__()
        self.patch_out_dim = patch_out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center_reduction = check_center_reduction(center_reduction)
        self.register_buffer("center", torch.zeros(1, patch_out_dim))

    # ----------------------------------------------------------------- teacher targets
    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """``softmax((t - center) / teacher_temp)`` over the last dim, float32; any leading shape."""
        return F.softmax((teacher_patch_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_teacher(
        self,
        masked_teacher_logits: torch.Tensor,
        teacher_temp: float,
        n_masked_tokens_total: int | torch.Tensor | None = None,
        n_iterations: int = 3,
    ) -> torch.Tensor:
        """Sinkhorn-Knopp over all masked tokens of all processes (no center).

        ``n_masked_tokens_total`` is the number of masked tokens summed over all processes; when
        ``None`` it is obtained with an all-reduce of the local counts."""
        return sinkhorn_knopp(
            masked_teacher_logits, teacher_temp, n_iterations=n_iterations, n_masked_tokens=n_masked_tokens_total
        )

    # ----------------------------------------------------------------- losses
    def _token_ce(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                  temperature_applied: bool) -> torch.Tensor:
        dtype = compute_dtype(student_logits, teacher_probs)
        scores = student_logits.to(dtype) if temperature_applied else student_logits.to(dtype) / self.student_temp
        log_p_s = F.log_softmax(scores, dim=-1)
        return -(teacher_probs.to(dtype) * log_p_s).sum(dim=-1)

    def forward_masked(
        self,
        student_patch_logits_masked: torch.Tensor,
        teacher_probs_masked: torch.Tensor,
        masks: torch.Tensor,
        n_masked_patches: int | None = None,
        masks_weight: torch.Tensor | None = None,
        temperature_applied: bool = False,
    ) -> torch.Tensor:
        """iBOT loss over the masked tokens.

        Args:
            student_patch_logits_masked: ``(M, K)`` (or ``(M_pad, K)``) student logits of the
                masked tokens, in the row-major order of ``masks``.
            teacher_probs_masked: ``(M, K)`` teacher targets for the same tokens.
            masks: ``(n_global_crops * B, N)`` bool, True where the student's patch was masked.
            n_masked_patches: if the token tensors are padded beyond the ``M`` real masked
                tokens, only the first ``n_masked_patches`` rows are used.
            masks_weight: optional precomputed ``(M,)`` weights (see :func:`masked_token_weights`).
            temperature_applied: the student logits are already divided by ``student_temp``
                (the methods fold it into the head: ``DINOHead(x, scale=1 / student_temp)``).

        Returns:
            ``sum_images mean_{masked patches of image}(CE) / n_images`` with
            ``n_images = masks.shape[0]``; images without masked patches contribute 0.
        """
        masks = masks.reshape(masks.shape[0], -1).bool()
        s, t = student_patch_logits_masked, teacher_probs_masked
        if n_masked_patches is not None:
            s, t = s[:n_masked_patches], t[:n_masked_patches]
        ce = self._token_ce(s, t, temperature_applied)  # (M,)
        if masks_weight is None:
            masks_weight = masked_token_weights(masks, dtype=ce.dtype)
        if ce.shape[0] != masks_weight.shape[0]:
            raise ValueError(f"{ce.shape[0]} masked token rows but {masks_weight.shape[0]} masked positions")
        return (ce * masks_weight.to(ce.dtype)).sum() / masks.shape[0]

    def forward_all(self, student_patch_logits: torch.Tensor, teacher_probs: torch.Tensor,
                    temperature_applied: bool = False) -> torch.Tensor:
        """Distillation variant over every patch token: ``(B, N, K)`` each; mean over the tokens
        of each image, then over images. ``temperature_applied`` as in :meth:`forward_masked`."""
        ce = self._token_ce(student_patch_logits, teacher_probs, temperature_applied)  # (B, N)
        return ce.mean(dim=-1).mean()
