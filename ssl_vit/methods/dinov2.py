"""DINOv2 (Oquab et al., 2023): DINO's image-level loss + iBOT's masked-patch loss + KoLeo.

Per step: the teacher sees the unmasked global crops and gives cls targets and patch targets at
the masked positions (Sinkhorn-Knopp or centering); the student sees the masked global crops and
the local crops. Loss = DINO cls loss (cross-view pairs) + iBOT loss (masked patches) + 0.1 x
KoLeo on the student's backbone cls tokens of each global crop. One global gradient norm is
clipped per student module; the last layer gets lr 0 during the first epoch.
"""
from __future__ import annotations

import torch
from torch import nn

from ssl_vit.losses import DINOLoss, IBOTPatchLoss, koleo_loss_per_crop
from ssl_vit.methods.clipping import clip_global_per_module
from ssl_vit.methods.self_distillation import SelfDistillationMethod
from ssl_vit.methods.teacher_targets import CENTERINGS, cls_and_patch_targets
from ssl_vit.models.heads import DINOHead, cls_and_patch_logits


class DINOv2(SelfDistillationMethod):
    name = "dinov2"
    freeze_last_layer_by_lr = True
    drop_path_law = "subset"  # the official multi-crop path: fixed-size random subsets per crop group

    def build_heads(self, embed_dim: int) -> dict[str, nn.Module]:
        cfg = self.cfg
        if cfg["centering"] not in CENTERINGS:
            raise ValueError(f"method.centering must be one of {CENTERINGS}, got {cfg['centering']!r}")

        def head(spec) -> DINOHead:
            return DINOHead(embed_dim, spec["out_dim"], spec["hidden_dim"], spec["bottleneck_dim"],
                            spec["nlayers"], norm_last_layer=spec["norm_last_layer"])

        self.dino_loss = DINOLoss(cfg["head"]["out_dim"], cfg["student_temp"], cfg["center_momentum"])
        heads = {"dino_head": head(cfg["head"])}
        ibot = cfg["ibot"]
        if ibot["separate_head"]:
            heads["ibot_head"] = head(ibot["head"])
        patch_dim = ibot["head"]["out_dim"] if ibot["separate_head"] else cfg["head"]["out_dim"]
        self.ibot_loss = IBOTPatchLoss(patch_dim, cfg["student_temp"], cfg["center_momentum"],
                                       center_reduction=ibot.get("center_reduction", "process_mean"))
        return heads

    def patch_head(self, model: nn.ModuleDict) -> nn.Module:
        return model["ibot_head"] if "ibot_head" in model else model["dino_head"]

    @torch.no_grad()
    def teacher_targets(self, globals_: torch.Tensor, masked: torch.Tensor, temp: float):
        """Targets of the [CLS] tokens (2B, K) and of the masked patches (M, K, row-major), given
        as a mask or as its flat indices; with centering, this batch also goes into the centers'
        pending update."""
        out = self.teacher.backbone.forward_cls_and_patches(globals_, patches=masked)
        return cls_and_patch_targets(self.teacher.dino_head, out["x_norm_clstoken"], self.patch_head(self.teacher),
                                     out["x_norm_selected_patchtokens"], self.dino_loss, self.ibot_loss, temp,
                                     self.cfg["centering"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        globals_, locals_, masks = batch["global_crops"], batch["local_crops"], batch["masks"]
        batch_size = globals_.shape[0] // 2
        n_local = locals_.shape[0] // batch_size
        temp = self.teacher_temp_at(self.global_step)
        # The masked positions as flat indices, computed on the host by the collate (as in
        # DINOv2's mask_indices_list): selecting by the bool mask would synchronise with the device.
        masked = batch.get("masked_indices", masks)

        cls_targets, patch_targets = self.teacher_targets(globals_, masked, temp)

        # Student: masked globals and unmasked locals in one multi-crop backbone call; the losses
        # read the [CLS] tokens and the globals' masked patch tokens.
        if n_local:
            out_global, out_local = self.student.backbone.forward_cls_and_patches(
                [globals_, locals_], [masks, None], patches=[masked, None])
            cls_tokens = torch.cat([out_global["x_norm_clstoken"], out_local["x_norm_clstoken"]])
        else:
            out_global = self.student.backbone.forward_cls_and_patches(globals_, masks, patches=masked)
            cls_tokens = out_global["x_norm_clstoken"]
        # Logits / student temperature: the scale is applied to the heads' bottleneck features.
        student_cls_scores, student_patch_scores = cls_and_patch_logits(
            self.student.dino_head, cls_tokens, self.patch_head(self.student), out_global["x_norm_selected_patchtokens"],
            scale=1.0 / self.cfg["student_temp"])

        # Crop-major rows viewed as (crops, B, K): the loss's pairs without a stacking copy.
        dino = self.dino_loss(student_cls_scores.unflatten(0, (2 + n_local, batch_size)),
                              cls_targets.unflatten(0, (2, batch_size)), temperature_applied=True)
        ibot = self.ibot_loss.forward_masked(student_patch_scores, patch_targets, masks,
                                             masks_weight=batch.get("mask_weights"), temperature_applied=True)
        # KoLeo on the backbone cls tokens, each global crop separately, summed.
        koleo = koleo_loss_per_crop(out_global["x_norm_clstoken"], 2)
        total = self.checked_total({
            "dino": (self.cfg["dino_loss_weight"], dino),
            "ibot": (self.cfg["ibot"]["loss_weight"], ibot),
            "koleo": (self.cfg["koleo_loss_weight"], koleo),
        })
        self.log_collapse_metrics(cls_targets, student_cls_scores[: 2 * batch_size])
        return total

    def clip_gradients_as_in_paper(self) -> None:
        clip_global_per_module(dict(self.student.items()), self.optim_cfg["clip_grad"])
