"""Shared base of DINO and DINOv2: a student, its EMA teacher and the per-step schedules.

The base owns everything the two papers share (fidelity.md, "Heads, optimisation, schedules"):
  * the teacher: a copy of the student (backbone + heads), updated by EMA with a cosine
    momentum schedule, never trained by gradients, without drop path;
  * per optimizer step: lr (scaled by the global batch: per-process batch x processes x
    accumulated micro-batches; linear warm-up, cosine to min_lr), weight decay (cosine), teacher
    temperature (linear warm-up then constant; per step, or per epoch for DINO), last-layer freeze;
  * once per optimizer step, whatever gradient accumulation does: the lr / wd set before the
    step, the EMA update and the loss centers' update after it (:meth:`optimizer_step`);
  * AdamW on parameter groups (no decay on biases / norms / LayerScale, optional layer-wise
    lr decay and patch-embed multiplier);
  * what a checkpoint must carry for ``ssl_vit.load_backbone``: the architecture, the teacher
    backbone's location in the state dict and the preprocessing.

Subclasses implement ``build_heads`` and ``training_step`` (the paper's algorithm box) and
say how gradients are clipped and how the last layer is frozen. Distillation keeps the loop but
not the roles: its teacher is frozen and pretrained, and the EMA copy of the student (named by
``ema_attribute``) is its final model; it overrides ``build_student`` to load that teacher first.
"""
from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
import torch
from torch import nn

from ssl_vit.losses.center import EMACenterMixin
from ssl_vit.methods.ema import copy_student_to_teacher, ema_parameter_lists, ema_update_lists
from ssl_vit.methods.finite_check import FiniteLossChecks
from ssl_vit.methods.param_groups import adamw, apply_lr_wd, build_param_groups
from ssl_vit.methods.schedules import (
    freeze_last_layer_active,
    lr_schedule,
    momentum_schedule,
    scaled_lr,
    teacher_temp_schedule_for,
    weight_decay_schedule,
)
from ssl_vit.models import build_backbone
from ssl_vit.models.heads import DINOHead

# Where the backbone that `ssl_vit.load_backbone` returns lives in a DINO / DINOv2 checkpoint.
TEACHER_BACKBONE_PREFIX = "teacher.backbone."


class SelfDistillationMethod(FiniteLossChecks, L.LightningModule):
    name = "self_distillation"
    # DINOv2 freezes the last layer with lr 0; DINO drops its gradients instead.
    freeze_last_layer_by_lr = False
    # Stochastic depth as the official code draws it (models/stochastic_depth.py): DINO masks samples.
    drop_path_law = "bernoulli"
    # Used when the method config has no ``teacher_temp_schedule`` key (tools that build a method
    # from older dicts); DINO warms its teacher temperature up per epoch, DINOv2 per step.
    default_teacher_temp_schedule = "per_step"
    # The EMA copy of the student, updated after every optimizer step: DINO's and DINOv2's
    # teacher. It is the model k-NN monitors, checkpoints and exports evaluate.
    ema_attribute = "teacher"
    # The method key of the EMA momentum's start value (cosine to 1 over the run).
    ema_momentum_key = "momentum_teacher"
    # Whether the student's global crops are masked (iBOT): otherwise the backbone's mask token is frozen.
    masks_student = True

    def __init__(
        self,
        arch: dict[str, Any],
        method: dict[str, Any],
        optim: dict[str, Any],
        total_steps: int,
        steps_per_epoch: int,
        global_batch_size: int,
        preprocessing: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = method
        self.optim_cfg = optim
        self.preprocessing = preprocessing or {}

        self.student = self.build_student(arch)
        if not self.masks_student:
            # Never used without masking: frozen, so that DDP does not wait for its gradient.
            self.student.backbone.mask_token.requires_grad_(False)
        setattr(self, self.ema_attribute, copy_student_to_teacher(self.student))
        self._ema_lists: tuple[list, list] | None = None  # (EMA copy's, student's) parameters, paired

        def steps(epochs: float) -> int:
            # A warm-up longer than a (short) run is cut to the run: the schedule still ends.
            wanted = int(round(float(epochs) * steps_per_epoch))
            if wanted > total_steps:
                rank_zero_warn(f"a warm-up of {epochs} epochs ({wanted} steps) is longer than the planned "
                               f"run of {total_steps} steps; using {total_steps}")
            return min(wanted, int(total_steps))

        self.total_steps = int(total_steps)
        self.base_lr = scaled_lr(optim["lr"], global_batch_size, optim["lr_scaling"])
        self.lr_at = lr_schedule(self.base_lr, total_steps, steps(optim["warmup_epochs"]), optim["min_lr"])
        self.wd_at = weight_decay_schedule(total_steps, optim["weight_decay"], optim["weight_decay_end"])
        self.momentum_at = momentum_schedule(total_steps, method[self.ema_momentum_key], 1.0)
        self.teacher_temp_at = teacher_temp_schedule_for(
            method.get("teacher_temp_schedule", self.default_teacher_temp_schedule),
            method["warmup_teacher_temp_epochs"], method["warmup_teacher_temp"], method["teacher_temp"],
            steps_per_epoch, self.total_steps, notice=rank_zero_info,
        )
        self.freeze_last_layer_steps = steps(method["freeze_last_layer_epochs"])

    @property
    def ema_copy(self) -> nn.ModuleDict:
        """The EMA copy of the student (backbone and heads)."""
        return getattr(self, self.ema_attribute)

    def load_backbone_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Start the student's backbone and its EMA copy from the same weights (``model.init``)."""
        self.student.backbone.load_state_dict(state_dict)
        self.ema_copy.backbone.load_state_dict(state_dict)

    # ------------------------------------------------------------------ to implement
    def build_student(self, arch: dict[str, Any]) -> nn.ModuleDict:
        """The trained model: a backbone and this method's heads."""
        backbone = build_backbone(arch)
        return nn.ModuleDict({"backbone": backbone, **self.build_heads(backbone.embed_dim)})

    def build_heads(self, embed_dim: int) -> dict[str, nn.Module]:
        raise NotImplementedError

    def clip_gradients_as_in_paper(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        groups = build_param_groups(
            dict(self.student.items()),
            weight_decay=self.optim_cfg["weight_decay"],
            layerwise_decay=self.optim_cfg.get("layerwise_decay"),
            patch_embed_lr_mult=self.optim_cfg.get("patch_embed_lr_mult", 1.0),
        )
        betas = tuple(self.optim_cfg.get("betas", (0.9, 0.999)))
        return adamw(groups, self.base_lr, betas, self.optim_cfg.get("implementation", "fused"))

    def last_layer_frozen(self, step: int) -> bool:
        return freeze_last_layer_active(step, self.freeze_last_layer_steps)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """One optimizer step (Lightning calls this once per step, after the last micro-batch
        when gradients are accumulated): this step's lr / wd, the step itself (its closure runs
        the last micro-batch's training step, backward and clipping), then the EMA teacher and
        the loss centers. Everything here happens before callbacks see the step, so a checkpoint
        written at step t holds the teacher and centers of step t."""
        step = self.global_step  # this step's index in every schedule (counted after the step)
        apply_lr_wd(
            getattr(optimizer, "optimizer", optimizer),  # unwrap Lightning's optimizer wrapper
            self.lr_at(step),
            self.wd_at(step),
            freeze_last_layer=self.freeze_last_layer_by_lr and self.last_layer_frozen(step),
        )
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        momentum = self.update_teacher_and_centers(step)
        self.log_dict(
            {"schedule/lr": self.lr_at(step), "schedule/wd": self.wd_at(step), "schedule/momentum": momentum,
             "schedule/teacher_temp": self.teacher_temp_at(step)},
            on_step=True, on_epoch=False,
        )

    @torch.no_grad()
    def update_teacher_and_centers(self, step: int) -> float:
        """After optimizer step ``step``: the EMA teacher update (returns its momentum) and the
        loss centers' update over every micro-batch of the step."""
        momentum = self.momentum_at(step)
        if self._ema_lists is None:  # paired by name once; the strategy's wrapping is done by now
            self._ema_lists = ema_parameter_lists(self.ema_copy, self.student)
        ema_update_lists(*self._ema_lists, momentum)
        for module in self.children():
            if isinstance(module, EMACenterMixin):
                module.apply_center_update()
        return momentum

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning calls this after backward (and unscaling) and before the optimizer step.
        self.clip_gradients_as_in_paper()

    def on_train_start(self) -> None:
        self._ema_lists = None  # a strategy may have replaced the parameters (FSDP): pair them anew

    def on_train_epoch_start(self) -> None:
        self.ema_copy.eval()  # Lightning puts the whole module in train mode; the EMA copy never is

    # ------------------------------------------------------------------ step helpers
    @torch.no_grad()
    def log_collapse_metrics(self, teacher_probs: torch.Tensor, student_scores: torch.Tensor) -> None:
        """Teacher output entropy (per sample and of the batch mean) and KL(teacher || student),
        normalised by log K: per-sample entropy near 1 means uniform outputs, batch-mean entropy
        near 0 means every image lands on the same prototype (the two collapse modes). Their
        difference is the mutual information between image and prototype: near 0 whenever all
        images get the same distribution, sharp or flat (the state of a random init).
        ``student_scores``: the student's logits already divided by its temperature."""
        log_k = math.log(teacher_probs.shape[-1])
        p = teacher_probs.float()
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean() / log_k
        mean_p = p.mean(0)
        batch_entropy = -(mean_p * mean_p.clamp_min(1e-12).log()).sum() / log_k
        log_q = torch.log_softmax(student_scores.float(), dim=-1)
        kl = (p * (p.clamp_min(1e-12).log() - log_q)).sum(-1).mean()
        self.log_dict(
            {"collapse/teacher_entropy": entropy, "collapse/teacher_batch_entropy": batch_entropy,
             "collapse/teacher_mutual_information": batch_entropy - entropy,
             "collapse/kl_teacher_student": kl},
            on_step=True,
        )

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.raise_if_nonfinite_seen()  # never save weights that a non-finite loss has spoilt
        checkpoint["ssl_vit"] = {
            "method": self.name,
            "arch": dict(self.student.backbone.arch),
            "backbone_prefix": f"{self.ema_attribute}.backbone.",
            "preprocessing": dict(self.preprocessing),
            "planned_steps": self.total_steps,
            # The EMA copy's heads, so that a later distillation can use this model as its teacher.
            "heads": {"prefix": f"{self.ema_attribute}.",
                      "specs": {name: module.spec() for name, module in self.ema_copy.items()
                                if isinstance(module, DINOHead)}},
        }

    def evaluation_backbone(self) -> nn.Module:
        """The backbone k-NN monitors and ``load_backbone`` use: the EMA copy's."""
        return self.ema_copy.backbone

    @classmethod
    def validate_config(cls, cfg) -> None:
        """Checks of this method's keys that need the whole config (``build.validate`` calls it
        before any work starts); errors name the key and what is allowed."""
