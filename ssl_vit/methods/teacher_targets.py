"""The teacher's targets from its head's bottleneck features (DINO, DINOv2, distillation).

The released code computes the head's logits ``t = f @ P.T`` (rows x K, K = 65,536 prototypes) and
then ``softmax((t - center) / temp)`` ("centering") or Sinkhorn-Knopp of ``exp(t / temp)``, and
folds the batch mean of ``t`` into the center. Here the temperature and the center enter the
matrix product itself (:func:`~ssl_vit.models.heads.prototype_scores`: the scale acts on the
(rows, 256) features, the shift starts the product), and the center's statistics come from the
features' row sum: the same targets and center up to float rounding, without three passes over
the (rows, K) logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_vit.models.heads import cls_and_patch_bottlenecks, prototype_scores

CENTERINGS = ("sinkhorn_knopp", "centering")


@torch.no_grad()
def teacher_targets(loss, features: torch.Tensor, prototypes: torch.Tensor, temp: float,
                    centering: str = "centering") -> torch.Tensor:
    """Float32 targets ``(..., K)`` of the teacher outputs ``features @ prototypes.T``.

    ``loss`` is the :class:`~ssl_vit.losses.DINOLoss` or :class:`~ssl_vit.losses.IBOTPatchLoss`
    that owns the center (and the Sinkhorn-Knopp variant of these rows). With ``"centering"``
    the targets use the current center, and this batch's outputs are added to the loss's pending
    center update (applied after the optimizer step, so a step is never in its own center);
    ``"sinkhorn_knopp"`` uses no center."""
    if centering not in CENTERINGS:
        raise ValueError(f"method.centering={centering!r}; allowed: {', '.join(CENTERINGS)}")
    if centering == "sinkhorn_knopp":
        scores = prototype_scores(features, prototypes, 1.0 / temp)
        return loss.sinkhorn_teacher(scores.reshape(-1, scores.shape[-1]), 1.0).reshape(scores.shape)
    scores = prototype_scores(features, prototypes, 1.0 / temp, loss.center / -temp)
    loss.accumulate_center_of_product(features, prototypes)
    return F.softmax(scores.float(), dim=-1)


@torch.no_grad()
def cls_and_patch_targets(cls_head, cls_tokens: torch.Tensor, patch_head, patch_tokens: torch.Tensor,
                          cls_loss, patch_loss, temp: float, centering: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`teacher_targets` of the [CLS] tokens through ``cls_head`` (centered by ``cls_loss``)
    and of the patch tokens through ``patch_head`` (by ``patch_loss``); a shared head runs its MLP
    once on both and builds its weight-normalised prototypes once."""
    cls_features, patch_features = cls_and_patch_bottlenecks(cls_head, cls_tokens, patch_head, patch_tokens)
    cls_prototypes = cls_head.last_layer.weight
    patch_prototypes = cls_prototypes if patch_head is cls_head else patch_head.last_layer.weight
    return (teacher_targets(cls_loss, cls_features, cls_prototypes, temp, centering),
            teacher_targets(patch_loss, patch_features, patch_prototypes, temp, centering))
