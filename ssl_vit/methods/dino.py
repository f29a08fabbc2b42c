"""DINO (Caron et al., 2021): self-distillation with no labels.

Per step: the teacher (EMA of the student) embeds the two global crops; its outputs, centered
and sharpened, are the targets for the student's outputs on every other crop (global and
local); the center then absorbs this batch. The teacher temperature's warm-up (none by default)
is DINO's per-epoch table (``method.teacher_temp_schedule=per_epoch``; ``per_step`` as DINOv2). Gradients are clipped per parameter tensor and the
last layer receives none during the first epoch.

DINO has no KoLeo term; ``method.koleo_loss_weight`` (0 by default, as in the paper) adds
DINOv2's, computed the same way (student backbone cls tokens of each global crop), for recipes
that choose to depart from the paper (see conf/experiment/for_method/cpu_dino.yaml).
"""
from __future__ import annotations

import torch
from torch import nn

from ssl_vit.losses import DINOLoss, koleo_loss_per_crop
from ssl_vit.methods.clipping import clip_per_tensor
from ssl_vit.methods.self_distillation import SelfDistillationMethod
from ssl_vit.methods.teacher_targets import teacher_targets
from ssl_vit.models.heads import DINOHead


def split_crops(logits: torch.Tensor, n_crops: int) -> list[torch.Tensor]:
    """(n_crops * B, K), crop-major -> n_crops tensors of (B, K)."""
    return list(logits.chunk(n_crops)) if n_crops else []


class DINO(SelfDistillationMethod):
    name = "dino"
    default_teacher_temp_schedule = "per_epoch"  # DINO's table: constant within an epoch
    masks_student = False

    def build_heads(self, embed_dim: int) -> dict[str, nn.Module]:
        head = self.cfg["head"]
        self.dino_loss = DINOLoss(head["out_dim"], self.cfg["student_temp"], self.cfg["center_momentum"])
        return {
            "dino_head": DINOHead(embed_dim, head["out_dim"], head["hidden_dim"], head["bottleneck_dim"],
                                  head["nlayers"], norm_last_layer=head["norm_last_layer"])
        }

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        globals_, locals_ = batch["global_crops"], batch["local_crops"]
        batch_size = globals_.shape[0] // 2
        n_local = locals_.shape[0] // batch_size

        # Teacher: centered, sharpened targets from the two global crops (this batch then goes
        # into the center's pending update, applied after the optimizer step).
        with torch.no_grad():
            head = self.teacher.dino_head
            targets = teacher_targets(self.dino_loss, head.bottleneck(self.teacher.backbone(globals_)),
                                      head.last_layer.weight, self.teacher_temp_at(self.global_step))

        # Student: every crop, globals first, through one backbone call and one head call
        # (logits / student temperature: the scale is applied to the bottleneck features).
        crops = [globals_, locals_] if n_local else [globals_]
        cls_tokens = torch.cat(self.student.backbone(crops))
        student_scores = self.student.dino_head(cls_tokens, scale=1.0 / self.cfg["student_temp"])

        loss = self.dino_loss(split_crops(student_scores, 2 + n_local), split_crops(targets, 2),
                              temperature_applied=True)
        terms = {"dino": (1.0, loss)}
        koleo_weight = self.cfg.get("koleo_loss_weight", 0.0)
        if koleo_weight:
            terms["koleo"] = (koleo_weight, koleo_loss_per_crop(cls_tokens[: 2 * batch_size], 2))
        total = self.checked_total(terms)
        self.log_collapse_metrics(targets, student_scores[: 2 * batch_size])
        return total

    def clip_gradients_as_in_paper(self) -> None:
        clip_per_tensor(self.student.parameters(), self.optim_cfg["clip_grad"])
        if self.last_layer_frozen(self.global_step):
            for param in self.student.dino_head.last_layer_parameters():
                param.grad = None
