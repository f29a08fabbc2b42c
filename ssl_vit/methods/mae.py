"""MAE (He et al., 2022): mask most patches, encode the visible ones, reconstruct the pixels.

Per step (the released ``MaskedAutoencoderViT.forward``): draw uniform noise per patch, keep the
``int(L * (1 - ratio))`` patches with the smallest noise, encode only those with the shared
backbone (positions added before the gather), let the light decoder fill in mask tokens and
predict every patch's pixels, and score the removed patches only. Optimisation is MAE's own:
AdamW (0.9, 0.95), fixed weight decay 0.05 (none on biases and 1-D parameters), lr = base x
global batch / 256 with a warm-up in fractional epochs and a half-cycle cosine, no clipping.
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ssl_vit.losses.mae import mae_loss
from ssl_vit.methods.finite_check import FiniteLossChecks
from ssl_vit.methods.mae_masking import kept_patches, random_masking
from ssl_vit.methods.param_groups import adamw, apply_lr_wd, build_param_groups
from ssl_vit.methods.schedules import HalfCycleCosineSchedule, scaled_lr
from ssl_vit.models import build_backbone
from ssl_vit.models.mae_decoder import MAEDecoder, check_decoder_shape

# Where the backbone that `ssl_vit.load_backbone` returns lives in a training checkpoint.
ENCODER_PREFIX = "encoder."
ROPE_REFUSED = ("model.pos_embed='rope' cannot be used with method=mae: the encoder sees only the visible "
                "patches (forward_visible needs absolute positions); allowed: learned, sincos")


def init_like_mae(module: nn.Module) -> None:
    """The released ``initialize_weights``: xavier-uniform linear layers (the patch embedding as
    a linear map on flattened patches), zero biases, unit LayerNorms, tokens normal(0.02)."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.xavier_uniform_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
    for name, param in module.named_parameters():
        if name.split(".")[-1] in ("cls_token", "mask_token", "register_tokens"):
            nn.init.normal_(param, std=0.02)
    patch_proj = getattr(getattr(module, "patch_embed", None), "proj", None)
    if patch_proj is not None:
        nn.init.xavier_uniform_(patch_proj.weight.view(patch_proj.weight.shape[0], -1))
        nn.init.zeros_(patch_proj.bias)


class MAE(FiniteLossChecks, L.LightningModule):
    name = "mae"
    drop_path_law = "bernoulli"  # timm's DropPath, as the official MAE

    def __init__(self, arch: dict[str, Any], method: dict[str, Any], optim: dict[str, Any], total_steps: int,
                 steps_per_epoch: int, global_batch_size: int, preprocessing: dict[str, Any] | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.cfg, self.optim_cfg, self.preprocessing = method, optim, preprocessing or {}
        self.encoder = build_backbone(arch)
        self.init_backbone(self.encoder)  # before the decoder draws its weights: train.final_knn rebuilds it
        if self.encoder.pos_embed_type == "rope":
            raise ValueError(ROPE_REFUSED)
        # The backbone's iBOT mask token has no role here: frozen, so no optimizer or DDP sees it.
        self.encoder.mask_token.requires_grad_(False)
        dec = method["decoder"]
        self.decoder = MAEDecoder(self.encoder.embed_dim, self.encoder.patch_size, dec["embed_dim"], dec["depth"],
                                  dec["num_heads"], dec.get("mlp_ratio", 4.0), arch.get("norm_eps", 1e-6))
        init_like_mae(self.decoder)
        self.mask_ratio = float(method["mask_ratio"])
        self.norm_pix_loss = bool(method["norm_pix_loss"])

        self.total_steps = int(total_steps)
        self.base_lr = scaled_lr(optim["lr"], global_batch_size, optim["lr_scaling"])
        warmup = float(optim["warmup_epochs"])
        run_epochs = self.total_steps / steps_per_epoch
        if warmup >= run_epochs:
            rank_zero_warn(f"optim.warmup_epochs={warmup} is not shorter than the planned run ({run_epochs:.3g} "
                           "epochs); warming up over the first half of it instead")
            warmup = run_epochs / 2
        self.lr_at = HalfCycleCosineSchedule(self.base_lr, float(optim["min_lr"]), warmup, self.total_steps,
                                             int(steps_per_epoch))

    @classmethod
    def validate_config(cls, cfg) -> None:
        """MAE's keys, checked before any work starts (errors name the key)."""
        if cfg.model.pos_embed == "rope":
            raise ValueError(ROPE_REFUSED)
        dec = cfg.method.decoder
        check_decoder_shape(dec.embed_dim, dec.depth, dec.num_heads)
        grid = cfg.method.crops.global_size // cfg.model.patch_size
        kept_patches(grid * grid, cfg.method.mask_ratio)
        if not isinstance(cfg.method.norm_pix_loss, bool):
            raise ValueError(f"method.norm_pix_loss={cfg.method.norm_pix_loss!r}; allowed: true, false")

    @staticmethod
    def init_backbone(backbone: nn.Module) -> None:
        """MAE's initialisation of an encoder (also used for the random-init k-NN baseline)."""
        init_like_mae(backbone)

    def load_backbone_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Start the encoder from outside weights (``model.init``)."""
        self.encoder.load_state_dict(state_dict)

    def evaluation_backbone(self) -> nn.Module:
        """The backbone k-NN monitors and ``load_backbone`` use: the encoder."""
        return self.encoder

    # ------------------------------------------------------------------ the algorithm
    def reconstruct(self, images: torch.Tensor, noise: torch.Tensor | None = None):
        """Mask, encode the visible patches, decode every patch: (pred (B, L, p*p*3), mask (B, L))."""
        grid = self.encoder.patch_embed.grid_size(*images.shape[-2:])
        ids_keep, mask, ids_restore = random_masking(images.new_empty(images.shape[0], grid[0] * grid[1]),
                                                     self.mask_ratio, noise)
        out = self.encoder.forward_visible(images, ids_keep, check_range=False)  # valid by construction
        tokens = torch.cat([out["x_norm_clstoken"].unsqueeze(1), out["x_norm_regtokens"],
                            out["x_norm_patchtokens"]], dim=1)
        pred = self.decoder(tokens, ids_restore, grid, num_prefix=1 + self.encoder.num_register_tokens)
        return pred, mask

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, _ = batch  # one augmented view per image; labels unused
        pred, mask = self.reconstruct(images)
        loss = mae_loss(images, pred, mask, self.encoder.patch_size, self.norm_pix_loss)
        return self.checked_total({"mae": (1.0, loss)})

    def heldout_metrics(self, loader, device, seed: int = 0) -> dict[str, float]:
        """Reconstruction loss on held-out images beside the trivial predictor's (train.py prints
        them after the final k-NN, on the validation split)."""
        from ssl_vit.evaluation.reconstruction import heldout_reconstruction

        result = heldout_reconstruction(self.to(device), loader, seed=seed, device=device)
        return {"heldout_mae_loss": result["mae_loss"], "heldout_trivial_loss": result["trivial_loss"],
                "heldout_ratio_to_trivial": result["ratio_to_trivial"]}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        groups = build_param_groups({"encoder": self.encoder, "decoder": self.decoder},
                                    weight_decay=self.optim_cfg["weight_decay"])
        return adamw(groups, self.base_lr, tuple(self.optim_cfg["betas"]),
                     self.optim_cfg.get("implementation", "fused"))

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """This step's lr (per optimizer step, once per accumulation window), then the step."""
        lr = self.lr_at(self.global_step)
        apply_lr_wd(getattr(optimizer, "optimizer", optimizer), lr, self.optim_cfg["weight_decay"])
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.log("schedule/lr", lr, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.raise_if_nonfinite_seen()  # never save weights that a non-finite loss has spoilt
        checkpoint["ssl_vit"] = {
            "method": self.name,
            "arch": dict(self.encoder.arch),
            "backbone_prefix": ENCODER_PREFIX,
            "preprocessing": dict(self.preprocessing),
            "planned_steps": self.total_steps,
        }
