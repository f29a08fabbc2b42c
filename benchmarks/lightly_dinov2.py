"""The reference DINOv2 step of ``benchmarks/step_speed.py``, assembled from lightly's components
in a plain PyTorch loop (after lightly's own DINOv2 benchmark): a timm ``VisionTransformer`` in
``MaskedVisionTransformerTIMM``, ``DINOv2ProjectionHead``, ``DINOLoss``, ``IBOTPatchLoss``,
``KoLeoLoss``, AdamW on lightly's per-parameter groups, one global gradient-norm clip and the EMA by
``update_momentum``; sizes, crops, masks and loss weights from this project's composed config."""
from __future__ import annotations

import copy
import math
import re

import torch
import torch.nn.functional as F


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

def timm_vit(model_cfg, **kwargs):
    """timm's VisionTransformer at the size of a ``model`` config; everything else timm's default."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    return TimmViT(img_size=model_cfg.img_size, patch_size=model_cfg.patch_size, embed_dim=model_cfg.embed_dim,
                   depth=model_cfg.depth, num_heads=model_cfg.num_heads, mlp_ratio=model_cfg.mlp_ratio,
                   qkv_bias=model_cfg.qkv_bias, num_classes=0, **kwargs)


def check_reference_supports(cfg) -> None:
    """The lightly reference builds a plain timm ViT and lightly's 3-layer DINOv2 head."""
    m, method = cfg.model, cfg.method
    unsupported = {
        "model.ffn_layer": (m.ffn_layer, "mlp"), "model.pos_embed": (m.pos_embed, "learned"),
        "model.num_register_tokens": (m.num_register_tokens, 0), "method.head.nlayers": (method.head.nlayers, 3),
        "method.centering": (method.centering, "centering"),
    }
    bad = [f"{k}={v!r} (needs {want!r})" for k, (v, want) in unsupported.items() if v != want]
    if bad:
        raise SystemExit("the lightly reference step cannot mirror " + ", ".join(bad))


class LightlyDINOv2:
    """A DINOv2 step from lightly's components in a plain loop (see the module docstring)."""

    def __init__(self, cfg, bf16: bool):
        from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
        from lightly.models.modules import DINOv2ProjectionHead, MaskedVisionTransformerTIMM

        check_reference_supports(cfg)
        m, method, optim = cfg.model, cfg.method, cfg.optim
        self.bf16 = bf16
        self.patch_size = m.patch_size
        vit = timm_vit(m, init_values=m.init_values, pos_embed="learn",
                       dynamic_img_size=True)  # local crops: positions resampled, as in lightly's benchmark
        if m.drop_path_rate:  # the student's stochastic depth, set as lightly's benchmark sets it
            from lightly.models.utils import update_drop_path_rate

            update_drop_path_rate(vit, m.drop_path_rate, mode="uniform" if m.drop_path_uniform else "linear")
        self.student_backbone = MaskedVisionTransformerTIMM(vit=vit, antialias=False, pos_embed_initialization="skip")

        def head(spec):
            return DINOv2ProjectionHead(input_dim=m.embed_dim, hidden_dim=spec.hidden_dim,
                                        bottleneck_dim=spec.bottleneck_dim, output_dim=spec.out_dim)

        def heads():
            dino = head(method.head)
            return dino, head(method.ibot.head) if method.ibot.separate_head else dino

        self.student_head, self.student_ibot_head = heads()
        self.student = torch.nn.ModuleDict({"backbone": self.student_backbone, "dino_head": self.student_head,
                                            "ibot_head": self.student_ibot_head})
        # The teacher's heads are built anew and loaded (weight_norm's modules cannot be deep-copied).
        teacher_head, teacher_ibot_head = heads()
        self.teacher = torch.nn.ModuleDict({"backbone": copy.deepcopy(self.student_backbone),
                                            "dino_head": teacher_head, "ibot_head": teacher_ibot_head})
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self.student.train()

        self.dino_loss = DINOLoss(output_dim=method.head.out_dim, student_temp=method.student_temp,
                                  center_momentum=method.center_momentum)
        patch_dim = method.ibot.head.out_dim if method.ibot.separate_head else method.head.out_dim
        self.ibot_loss = IBOTPatchLoss(output_dim=patch_dim, student_temp=method.student_temp,
                                       center_momentum=method.center_momentum)
        self.koleo_loss = KoLeoLoss()
        self.weights = (method.dino_loss_weight, method.ibot.loss_weight, method.koleo_loss_weight)
        self.teacher_temp = float(method.teacher_temp)
        self.momentum = float(method.momentum_teacher)
        self.clip = float(optim.clip_grad)

        batch = cfg.data.batch_size
        self.lr = float(optim.lr) * (math.sqrt(batch / 1024) if optim.lr_scaling == "sqrt" else
                                     batch / 256 if optim.lr_scaling == "linear" else 1.0)
        self.weight_decay = float(optim.weight_decay)
        self.optimizer = torch.optim.AdamW(
            self.param_groups(optim.layerwise_decay or 1.0, optim.patch_embed_lr_mult), lr=self.lr,
            betas=tuple(optim.betas))
        self.params = [p for p in self.student.parameters() if p.requires_grad]

    def param_groups(self, layer_decay: float, patch_embed_mult: float) -> list[dict]:
        """One group per parameter, as lightly's DINOv2 benchmark: lr scaled by layer depth."""
        depth = len(self.student_backbone.vit.blocks)
        groups = []
        for name, p in self.student.named_parameters():
            scale = 1.0
            if name.startswith("backbone."):
                block = re.search(r"\.blocks\.(\d+)\.", name)
                if any(t in name for t in ("pos_embed", "mask_token", "cls_token", "reg_token")):
                    scale = layer_decay ** (depth + 1)
                elif "patch_embed" in name:
                    scale = layer_decay ** (depth + 1) * patch_embed_mult
                elif block:
                    scale = layer_decay ** (depth - int(block.group(1)))
            no_decay = name.endswith(".bias") or ".norm" in name or "gamma" in name
            groups.append({"params": [p], "lr_scale": scale, "decays": not no_decay,
                           "lr": self.lr * scale, "weight_decay": 0.0 if no_decay else self.weight_decay})
        return groups

    def loss(self, batch: dict) -> torch.Tensor:
        globals_, locals_, masks = batch["global_crops"], batch["local_crops"], batch["masks"]
        n_global = globals_.shape[0]
        n_views = 2 + locals_.shape[0] // (n_global // 2)
        grid = globals_.shape[-1] // self.patch_size
        token_mask = F.pad(masks, (1, 0), value=False)  # the [CLS] token is never masked
        with torch.no_grad():
            teacher_tokens = self.teacher["backbone"].encode(globals_)
            teacher_cls = self.teacher["dino_head"](teacher_tokens[:, 0])
            teacher_patches = self.teacher["ibot_head"](teacher_tokens[token_mask])
        student_tokens = self.student_backbone.encode(globals_, mask=token_mask)
        student_global_cls = student_tokens[:, 0]
        student_cls = [self.student_head(student_global_cls)]
        student_patches = self.student_ibot_head(student_tokens[token_mask])
        if n_views > 2:
            student_cls.append(self.student_head(self.student_backbone.encode(locals_)[:, 0]))
        student_cls = torch.cat(student_cls)
        dino = self.dino_loss(teacher_out=list(teacher_cls.chunk(2)), student_out=list(student_cls.chunk(n_views)),
                              teacher_temp=self.teacher_temp)
        ibot = self.ibot_loss(teacher_out=teacher_patches, student_out=student_patches,
                              mask=masks.reshape(n_global, grid, grid), teacher_temp=self.teacher_temp)
        koleo = sum(self.koleo_loss(crop) for crop in student_global_cls.chunk(2))
        w_dino, w_ibot, w_koleo = self.weights
        return w_dino * dino + w_ibot * ibot + w_koleo * koleo

    def step(self, batch: dict) -> float:
        """One optimisation step; returns the loss."""
        from lightly.models.utils import update_momentum

        for group in self.optimizer.param_groups:  # what a per-step schedule does
            group["lr"] = self.lr * group["lr_scale"]
            if group["decays"]:
                group["weight_decay"] = self.weight_decay
        with torch.enable_grad():
            with autocast(self.bf16):
                loss = self.loss(batch)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_momentum(self.student_backbone, self.teacher["backbone"], m=self.momentum)
        update_momentum(self.student_head, self.teacher["dino_head"], m=self.momentum)
        if self.student_ibot_head is not self.student_head:
            update_momentum(self.student_ibot_head, self.teacher["ibot_head"], m=self.momentum)
        return loss.detach()
