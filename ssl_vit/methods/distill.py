"""Distillation (DINOv2, Oquab et al., 2023, section 5): a frozen pretrained teacher trains a
student, usually a smaller one, with DINOv2's training loop.

What changes from DINOv2 (fidelity.md, "Distillation"): the teacher is a frozen pretrained model
(backbone and heads, ``method.teacher.checkpoint``), not an EMA of the student; the student sees
its crops without masking and without drop path; the iBOT loss covers every patch token of the
two global crops; the final model is a separate EMA copy of the student (``student_ema``, with
its heads), which is what ``load_backbone``, k-NN and exports use. Targets come from the teacher's
own heads with Sinkhorn-Knopp (``method.centering``); the student's heads are shaped like the
teacher's. Per step:

    targets  = SK(teacher heads(teacher(global crops)))         # [CLS] and every patch token
    loss     = DINO(student [CLS] of every crop, cross-view targets)
             + iBOT(student patch tokens of the global crops, targets of the same positions)
             + KoLeo(student backbone [CLS] of each global crop)

A teacher without heads (an MAE encoder, an export, official or timm weights) is distilled by
its features instead (``method.teacher.target=features``, what ``auto`` picks for it): the
cosine distance between the student's [CLS] and patch tokens of the global crops, mapped to the
teacher's width by a learned projection where the widths differ, and the teacher's tokens of
the same crops. That projection is trained but is not part of the student's backbone. Local
crops play no part in it (no targets exist for them).

Student and teacher may differ in width, depth and patch size: a teacher token grid that differs
from the student's is resampled bilinearly to it before the heads.
"""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ssl_vit.losses import DINOLoss, IBOTPatchLoss, koleo_loss_per_crop
from ssl_vit.losses.feature_distill import cosine_distance
from ssl_vit.methods.clipping import clip_global_per_module
from ssl_vit.methods.dino import split_crops
from ssl_vit.methods.teacher_targets import CENTERINGS, cls_and_patch_targets
from ssl_vit.methods.frozen_teacher import KEY, FrozenTeacher, read_teacher_file, resolve_target
from ssl_vit.methods.self_distillation import SelfDistillationMethod
from ssl_vit.models import build_backbone
from ssl_vit.models.heads import DINOHead, cls_and_patch_logits


class Distillation(SelfDistillationMethod):
    name = "distill"
    freeze_last_layer_by_lr = True  # DINOv2's way: lr 0 for the prototypes during the first epoch
    drop_path_law = "subset"  # DINOv2's way, as its distillation runs the same training code
    ema_attribute = "student_ema"  # the final model; "teacher" is the frozen pretrained one
    ema_momentum_key = "ema_momentum"
    masks_student = False

    def build_student(self, arch: dict[str, Any]) -> nn.ModuleDict:
        cfg = self.cfg
        if cfg["centering"] not in CENTERINGS:
            raise ValueError(f"method.centering={cfg['centering']!r}; allowed: {', '.join(CENTERINGS)}")
        source = read_teacher_file(cfg["teacher"]["checkpoint"], cfg["teacher"].get("load_kwargs"))
        self.target = resolve_target(cfg["teacher"].get("target", "auto"), source)
        self.teacher = FrozenTeacher(source, self.preprocessing.get("mean"), self.preprocessing.get("std"))
        if arch.get("drop_path_rate"):
            rank_zero_info(f"method=distill trains the student without drop path (DINOv2); model.drop_path_rate="
                           f"{arch['drop_path_rate']} is not used")
        backbone = build_backbone({**arch, "drop_path_rate": 0.0})
        student = nn.ModuleDict({"backbone": backbone})
        width, teacher_width = backbone.embed_dim, self.teacher.backbone.embed_dim
        if self.target == "heads":
            for name, head in self.teacher.heads.items():  # shaped like the teacher's, on the student's width
                student[name] = DINOHead(**{**head.spec(), "in_dim": width})
            head_dim = self.teacher.heads["dino_head"].out_dim
            self.dino_loss = DINOLoss(head_dim, cfg["student_temp"], cfg["center_momentum"])
            self.ibot_loss = IBOTPatchLoss(self.teacher.patch_head.out_dim, cfg["student_temp"],
                                           cfg["center_momentum"])
        elif width != teacher_width:
            student["feature_proj"] = nn.Linear(width, teacher_width)
        teacher_params = sum(p.numel() for p in self.teacher.backbone.parameters())
        student_params = sum(p.numel() for p in backbone.parameters())
        if student_params > teacher_params:
            rank_zero_warn(f"the student backbone ({student_params:,} parameters) is larger than the teacher "
                           f"({teacher_params:,}, {KEY}): distillation usually trains a smaller model")
        rank_zero_info(f"distilling from {self.teacher.description} (width {teacher_width}, depth "
                       f"{len(self.teacher.backbone.blocks)}, patch {self.teacher.backbone.patch_size}) by its "
                       f"{self.target}")
        return student

    def patch_head(self, model: nn.ModuleDict) -> nn.Module:
        return model["ibot_head"] if "ibot_head" in model else model["dino_head"]

    # ------------------------------------------------------------------ the algorithm
    @torch.no_grad()
    def teacher_targets(self, globals_: torch.Tensor, grid: tuple[int, int], temp: float):
        """Targets of the [CLS] (2B, K) and of every patch token (2B, N, K); with centering, this
        batch also goes into the centers' pending update."""
        cls_tokens, patch_tokens = self.teacher.tokens(globals_, grid)
        return cls_and_patch_targets(self.teacher.heads["dino_head"], cls_tokens, self.teacher.patch_head, patch_tokens,
                                     self.dino_loss, self.ibot_loss, temp, self.cfg["centering"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        globals_, locals_ = batch["global_crops"], batch["local_crops"]
        batch_size = globals_.shape[0] // 2
        n_local = locals_.shape[0] // batch_size if self.target == "heads" else 0
        grid = self.student.backbone.patch_embed.grid_size(*globals_.shape[-2:])
        if self.target == "features":
            return self.feature_distillation_step(globals_, grid)

        temp = self.teacher_temp_at(self.global_step)
        cls_targets, patch_targets = self.teacher_targets(globals_, grid, temp)

        # Student: every crop unmasked, globals first, in one multi-crop backbone call; the losses
        # read every patch token of the globals and only the [CLS] token of the locals.
        crops = [globals_, locals_] if n_local else [globals_]
        # As flat indices rather than an all-True mask: no host synchronisation on an accelerator.
        every_patch = torch.arange(globals_.shape[0] * grid[0] * grid[1], device=globals_.device)
        outs = self.student.backbone.forward_cls_and_patches(crops, None, [every_patch] + [None] * (len(crops) - 1))
        out_global = outs[0]
        patch_tokens = out_global["x_norm_selected_patchtokens"].unflatten(0, (globals_.shape[0], -1))
        cls_tokens = torch.cat([out["x_norm_clstoken"] for out in outs])
        # Logits / student temperature: the scale is applied to the heads' bottleneck features.
        student_cls_scores, student_patch_scores = cls_and_patch_logits(
            self.student.dino_head, cls_tokens, self.patch_head(self.student), patch_tokens,
            scale=1.0 / self.cfg["student_temp"])

        dino = self.dino_loss(split_crops(student_cls_scores, 2 + n_local), split_crops(cls_targets, 2),
                              temperature_applied=True)
        ibot = self.ibot_loss.forward_all(student_patch_scores, patch_targets, temperature_applied=True)
        koleo = koleo_loss_per_crop(out_global["x_norm_clstoken"], 2)
        total = self.checked_total({
            "dino": (self.cfg["dino_loss_weight"], dino),
            "ibot": (self.cfg["ibot_loss_weight"], ibot),
            "koleo": (self.cfg["koleo_loss_weight"], koleo),
        })
        self.log_collapse_metrics(cls_targets, student_cls_scores[: 2 * batch_size])
        return total

    def feature_distillation_step(self, globals_: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Cosine distance to the teacher's [CLS] and patch tokens of the same global crops."""
        teacher_cls, teacher_patches = self.teacher.tokens(globals_, grid)
        out = self.student.backbone.forward_features(globals_)
        project = self.student["feature_proj"] if "feature_proj" in self.student else nn.Identity()
        weights = self.cfg["feature_loss"]
        return self.checked_total({
            "feature_cls": (weights["cls_weight"], cosine_distance(project(out["x_norm_clstoken"]), teacher_cls)),
            "feature_patch": (weights["patch_weight"],
                              cosine_distance(project(out["x_norm_patchtokens"]), teacher_patches)),
        })

    def clip_gradients_as_in_paper(self) -> None:
        clip_global_per_module(dict(self.student.items()), self.optim_cfg["clip_grad"])

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The frozen teacher is not stored (it is the file ``method.teacher.checkpoint`` names,
        read again on resume): a checkpoint holds what training changed."""
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]
        checkpoint["ssl_vit"]["teacher"] = {"checkpoint": str(self.cfg["teacher"]["checkpoint"]),
                                            "target": self.target, "description": self.teacher.description}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lightning loads the state dict strictly: the frozen teacher's entries, left out when
        saving, come from the teacher this module read."""
        checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.teacher.eval()

    @classmethod
    def validate_config(cls, cfg) -> None:
        """The teacher file and its fit with the student, before any work starts."""
        teacher_cfg = cfg.method.teacher
        source = read_teacher_file(teacher_cfg.checkpoint, teacher_cfg.get("load_kwargs"))
        resolve_target(teacher_cfg.get("target", "auto"), source)
        if cfg.method.centering not in CENTERINGS:
            raise ValueError(f"method.centering={cfg.method.centering!r}; allowed: {', '.join(CENTERINGS)}")
        patch = source.backbone.patch_size
        for key in ("global_size",):
            size = cfg.method.crops[key]
            if isinstance(size, int) and size % patch:
                raise ValueError(f"method.crops.{key}={size} is not a multiple of the teacher's patch size {patch} "
                                 f"({KEY}); the teacher sees the student's global crops")
