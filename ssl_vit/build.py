"""Config -> objects for a training run: data module, method, trainer. Errors name the key."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import DictConfig

from ssl_vit.callbacks import CollapseMonitor, KNNMonitor, LastCheckpoint
from ssl_vit.config import backbone_arch, to_dict
from ssl_vit.data.collate import MultiCropCollator
from ssl_vit.data.datamodule import SSLDataModule, default_normalization
from ssl_vit.data.masking import BlockMaskGenerator
from ssl_vit.data.transforms import MultiCropTransform
from ssl_vit.methods import METHODS
from ssl_vit.models.load import initial_weights_for
from ssl_vit.precision import AUTO, resolve_precision

LOGGERS = ("csv", "wandb")


def validate(cfg: DictConfig) -> None:
    """Checks that need several groups at once; each group's own checks run when it is built."""
    if cfg.method.name not in METHODS:
        raise ValueError(f"method={cfg.method.name!r} is not implemented; available: {sorted(METHODS)}")
    patch = cfg.model.patch_size
    for key in ("global_size", "local_size"):
        size = cfg.method.crops[key]
        if key == "local_size" and cfg.method.crops.n_local == 0:
            continue
        if not isinstance(size, int) or size < patch or size % patch:
            raise ValueError(
                f"method.crops.{key}={size} is not a multiple of model.patch_size={patch}; "
                f"crop sizes must be positive multiples of the patch size"
            )
    if cfg.logger.name not in LOGGERS:
        raise ValueError(f"logger={cfg.logger.name!r}; allowed: {LOGGERS}")
    init = cfg.model.get("init")
    if init and not os.path.isfile(str(init)):
        raise ValueError(f"model.init={init!r} is not a file; give a backbone checkpoint or export "
                         "(timm / DINO / DINOv2 / MAE weights, or an ssl_vit .ckpt / .safetensors)")
    for key in ("knn_max_train", "knn_max_eval", "final_knn_max_train"):
        limit = cfg.eval.get(key)
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError(f"eval.{key}={limit!r}; allowed: a positive number of images, or null for all")
    if not cfg.trainer.max_steps or cfg.trainer.max_steps < 1:
        if not cfg.trainer.get("max_epochs"):
            raise ValueError("set trainer.max_steps (or trainer.max_epochs): schedules need a planned run length")


def build_datamodule(cfg: DictConfig) -> SSLDataModule:
    data, crops = cfg.data, cfg.method.crops
    mean, std = default_normalization(data.name)
    transform = MultiCropTransform(
        crops.global_size, crops.local_size, crops.n_local, tuple(crops.global_scale), tuple(crops.local_scale),
        mean=mean, std=std, preset=crops.augmentation,
    )
    ibot = cfg.method.get("ibot")
    grid = crops.global_size // cfg.model.patch_size
    collate = MultiCropCollator(
        BlockMaskGenerator((grid, grid)) if ibot else None,
        mask_ratio_range=tuple(ibot.mask_ratio) if ibot else (0.1, 0.5),
        mask_probability=ibot.mask_probability if ibot else 0.0,
        seed=cfg.seed,
    )
    return SSLDataModule(
        dataset=data.name, root=data.root, batch_size=data.batch_size, num_workers=data.num_workers,
        train_transform=transform, collate_fn=collate, val_size=data.val_size, seed=cfg.seed,
        split_seed=data.split_seed, image_size=crops.global_size, mean=mean, std=std,
        **to_dict(data.get("options") or {}),
    )


def planned_steps(cfg: DictConfig, steps_per_data_epoch: int) -> tuple[int, int]:
    """(total optimizer steps, steps per schedule epoch) of the planned run."""
    steps_per_epoch = cfg.get("steps_per_epoch") or steps_per_data_epoch
    total = cfg.trainer.max_steps if cfg.trainer.max_steps and cfg.trainer.max_steps > 0 else None
    if total is None:
        total = cfg.trainer.max_epochs * steps_per_data_epoch
    return int(total), int(steps_per_epoch)


def build_method(cfg: DictConfig, datamodule: SSLDataModule, world_size: int = 1):
    steps_per_data_epoch = len(datamodule.train_dataloader())
    total_steps, steps_per_epoch = planned_steps(cfg, steps_per_data_epoch)
    method = METHODS[cfg.method.name](
        arch=backbone_arch(cfg.model),
        method=to_dict(cfg.method),
        optim=to_dict(cfg.optim),
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        global_batch_size=cfg.data.batch_size * world_size,
        preprocessing=datamodule.describe(),
    )
    if cfg.model.get("init"):  # student and teacher start from the same outside weights
        method.load_backbone_weights(initial_weights_for(cfg.model.init, backbone_arch(cfg.model)))
    return method


def build_logger(cfg: DictConfig, out_dir: Path):
    if cfg.logger.name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(out_dir), name="logs", version="")
    from lightning.pytorch.loggers import WandbLogger

    # Keep one wandb run per output folder: a resumed run appends to the same wandb run.
    id_file = out_dir / "wandb_run_id.txt"
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        import wandb.util

        run_id = wandb.util.generate_id()
        id_file.write_text(run_id)
    return WandbLogger(save_dir=str(out_dir), project=cfg.logger.project, mode=cfg.logger.mode, id=run_id,
                       resume="allow")


def build_trainer(cfg: DictConfig, out_dir: Path, datamodule: SSLDataModule) -> L.Trainer:
    ckpt_dir = out_dir / "checkpoints"
    callbacks: list[Any] = [LastCheckpoint(ckpt_dir, cfg.checkpoint_every_n_steps), CollapseMonitor()]
    if cfg.trainer.get("enable_progress_bar", True):  # +trainer.enable_progress_bar=false: quiet logs
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    if cfg.eval.knn_every_n_steps:
        callbacks.append(KNNMonitor(datamodule, cfg.eval.knn_every_n_steps, cfg.eval.knn_max_train,
                                    cfg.eval.knn_max_eval, skip_last_step=bool(cfg.eval.final_knn)))
    trainer_args = to_dict(cfg.trainer)
    trainer_args["precision"] = resolve_precision(trainer_args.get("precision", AUTO),
                                                  trainer_args.get("accelerator", "auto"))
    return L.Trainer(
        **trainer_args,
        default_root_dir=str(out_dir),
        logger=build_logger(cfg, out_dir),
        callbacks=callbacks,
        enable_checkpointing=False,  # LastCheckpoint writes the one checkpoint a run keeps
        num_sanity_val_steps=0,
    )


def resume_path(cfg: DictConfig, out_dir: Path) -> str | None:
    if cfg.ckpt_path:
        if not os.path.isfile(cfg.ckpt_path):
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r} does not exist")
        return str(cfg.ckpt_path)
    last = out_dir / "checkpoints" / "last.ckpt"
    return str(last) if last.is_file() else None
