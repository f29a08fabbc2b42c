"""Config -> objects for a training run: data module, method, trainer. Errors name the key."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, ListConfig

from ssl_vit.callbacks import CollapseMonitor, KNNMonitor, LastCheckpoint, StepSeeds
from ssl_vit.callbacks.pictures import FeaturePictures
from ssl_vit.callbacks.progress import LoggingIntervalProgressBar
from ssl_vit.callbacks.reconstruction import ReconstructionPictures
from ssl_vit.callbacks.requeue import RequeueOnSignal
from ssl_vit.cluster import slurm_plugins
from ssl_vit.config import backbone_arch, to_dict
from ssl_vit.data.collate import MultiCropCollator
from ssl_vit.data.datamodule import SSLDataModule, default_normalization
from ssl_vit.data.mae_transform import SingleViewTransform
from ssl_vit.data.masking import MIN_BLOCK_PATCHES, BlockMaskGenerator
from ssl_vit.data.transforms import MultiCropTransform
from ssl_vit.loggers import ResumableCSVLogger, wandb_run_id
from ssl_vit.methods import METHODS
from ssl_vit.models.load import initial_weights_for
from ssl_vit.models.vision_transformer import VisionTransformer
from ssl_vit.precision import AUTO, resolve_precision
from ssl_vit.resume import default_checkpoint
from ssl_vit.schema import check_config
from ssl_vit.schema.run import WANDB_MODES

SINGLE_VIEW_AUGMENTATION = "mae"  # method.crops.augmentation of MAE's one-view pipeline


def validate(cfg: DictConfig) -> None:
    """Every key against its schema (types, ranges, choices, unknown keys: ``ssl_vit.schema``),
    then the checks that need several groups at once; each group's own checks run when it is built."""
    check_config(cfg)
    if cfg.method.name not in METHODS:
        raise ValueError(f"method={cfg.method.name!r} is not implemented; available: {sorted(METHODS)}")
    METHODS[cfg.method.name].validate_config(cfg)  # the method's own keys
    patch = cfg.model.patch_size
    for key in ("global_size", "local_size"):
        if key == "local_size" and cfg.method.crops.get("n_local", 0) == 0:
            continue
        size = cfg.method.crops[key]
        if not isinstance(size, int) or size < patch or size % patch:
            raise ValueError(
                f"method.crops.{key}={size} is not a multiple of model.patch_size={patch}; "
                f"crop sizes must be positive multiples of the patch size"
            )
    if cfg.method.get("ibot") and cfg.method.crops.augmentation != SINGLE_VIEW_AUGMENTATION:
        side = cfg.method.crops.global_size // patch
        if side * side // 2 < MIN_BLOCK_PATCHES:  # the block-mask generator's largest block < its smallest
            raise ValueError(
                f"method.crops.global_size={cfg.method.crops.global_size} with model.patch_size={patch} gives a "
                f"{side}x{side} patch grid; iBOT's block masks (method.ibot) take {MIN_BLOCK_PATCHES} patches up to "
                f"half the grid per block, so the global crops need a grid of 3x3 patches or more: a larger "
                f"global crop or a smaller patch"
            )
    if cfg.data.get("batched_augmentation") and cfg.method.crops.augmentation == SINGLE_VIEW_AUGMENTATION:
        raise ValueError(f"data.batched_augmentation=true: method={cfg.method.name}'s one-view augmentation runs in "
                         "the data workers only; the option applies to the multi-crop methods (dino, dinov2, distill)")
    if cfg.get("ckpt_path") and not os.path.isfile(str(cfg.ckpt_path)):
        raise ValueError(f"ckpt_path={cfg.ckpt_path!r} is not a file; give a checkpoint of this framework to resume "
                         "from, or leave it null (a run resumes from DIR/checkpoints/last.ckpt by itself)")
    init = cfg.model.get("init")
    if init and not os.path.isfile(str(init)):
        raise ValueError(f"model.init={init!r} is not a file; give a backbone checkpoint or export "
                         "(timm / DINO / DINOv2 / MAE weights, or an ssl_vit .ckpt / .safetensors)")
    if not cfg.trainer.max_steps or cfg.trainer.max_steps < 1:
        if not cfg.trainer.get("max_epochs"):
            raise ValueError("set trainer.max_steps (or trainer.max_epochs): schedules need a planned run length")


def build_train_transform_and_collate(cfg: DictConfig, mean, std):
    """The training augmentation of ``method.crops`` and its batching: MAE's single view with
    the default collate, or the multi-crop views with iBOT's block masks (DINO, DINOv2)."""
    crops = cfg.method.crops
    if crops.augmentation == SINGLE_VIEW_AUGMENTATION:
        return SingleViewTransform(crops.global_size, tuple(crops.global_scale), mean=mean, std=std), None
    transform = MultiCropTransform(
        crops.global_size, crops.local_size, crops.n_local, tuple(crops.global_scale), tuple(crops.local_scale),
        mean=mean, std=std, preset=crops.augmentation,
        defer_augmentation=bool(cfg.data.get("batched_augmentation", False)),
    )
    ibot = cfg.method.get("ibot")
    grid = crops.global_size // cfg.model.patch_size
    collate = MultiCropCollator(
        BlockMaskGenerator((grid, grid), law=ibot.get("mask_law", "official")) if ibot else None,
        mask_ratio_range=tuple(ibot.mask_ratio) if ibot else (0.1, 0.5),
        mask_probability=ibot.mask_probability if ibot else 0.0,
        seed=cfg.seed,
    )
    return transform, collate


def build_datamodule(cfg: DictConfig) -> SSLDataModule:
    data, crops = cfg.data, cfg.method.crops
    mean, std = default_normalization(data.name)
    transform, collate = build_train_transform_and_collate(cfg, mean, std)
    return SSLDataModule(
        dataset=data.name, root=data.root, batch_size=data.batch_size, num_workers=data.num_workers,
        train_transform=transform, collate_fn=collate, val_size=data.val_size, seed=cfg.seed,
        split_seed=data.split_seed, image_size=crops.global_size, mean=mean, std=std,
        **to_dict(data.get("options") or {}),
    )


def world_size_from_config(cfg: DictConfig) -> int:
    """Processes a run of ``cfg`` uses: ``trainer.devices x trainer.num_nodes``. ``devices`` may be
    a count, a list of device ids or a string of either ("2", "0,1"); "auto" and -1 depend on the
    machine, so they need the Trainer (``build_method(..., world_size=trainer.world_size)``)."""
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    elif isinstance(devices, str) and "," in devices:
        devices = [d for d in devices.split(",") if d.strip()]
    if isinstance(devices, (list, tuple, ListConfig)):
        per_node = len(devices)
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        per_node = devices
    else:
        raise ValueError(f"trainer.devices={devices!r}: the number of processes (which scales the learning rate) "
                         "cannot be told from the config alone; give a count or a list of devices, or build "
                         "the method with world_size=trainer.world_size")
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"trainer.num_nodes={nodes!r}; allowed: an integer >= 1")
    return per_node * nodes


def accumulated_batches(cfg: DictConfig) -> int:
    """``trainer.accumulate_grad_batches`` (1 when not set): micro-batches per optimizer step."""
    value = cfg.trainer.get("accumulate_grad_batches", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"trainer.accumulate_grad_batches={value!r}; allowed: an integer >= 1")
    return value


def optimizer_steps_per_data_epoch(n_images: int, batch_size: int, world_size: int, accumulate: int) -> int:
    """Optimizer steps of one pass over ``n_images`` on every process: Lightning's distributed
    sampler gives each of the ``world_size`` processes ``ceil(n / world_size)`` images, batches
    drop the last incomplete one, and the last accumulation window of an epoch still steps."""
    per_process = math.ceil(n_images / world_size)
    batches = per_process // batch_size
    if batches == 0:
        raise ValueError(
            f"data.batch_size={batch_size} is larger than the {per_process} training images each of the "
            f"{world_size} processes gets ({n_images} in all): not one batch would be formed; lower "
            "data.batch_size (or add images)"
        )
    return math.ceil(batches / accumulate)


@dataclass(frozen=True)
class RunPlan:
    """What the schedules are laid over, from the config and the number of processes."""

    world_size: int
    global_batch_size: int  # data.batch_size x world_size x accumulate_grad_batches
    total_steps: int  # optimizer steps of the planned run
    steps_per_epoch: int  # optimizer steps of one schedule "epoch"


def plan_run(cfg: DictConfig, datamodule: SSLDataModule, world_size: int | None = None) -> RunPlan:
    """The run's plan; ``world_size`` defaults to :func:`world_size_from_config`. The training
    data are only counted when a schedule needs them (no ``steps_per_epoch`` or no ``max_steps``)."""
    world = world_size_from_config(cfg) if world_size is None else int(world_size)
    accumulate = accumulated_batches(cfg)
    batch = cfg.data.batch_size
    max_steps = cfg.trainer.max_steps if cfg.trainer.max_steps and cfg.trainer.max_steps > 0 else None
    data_epoch = None
    if cfg.get("steps_per_epoch") is None or max_steps is None:
        data_epoch = optimizer_steps_per_data_epoch(len(datamodule.train_dataset), batch, world, accumulate)
    steps_per_epoch = cfg.get("steps_per_epoch") or data_epoch
    total = max_steps if max_steps is not None else cfg.trainer.max_epochs * data_epoch
    return RunPlan(world, batch * world * accumulate, int(total), int(steps_per_epoch))


def build_method(cfg: DictConfig, datamodule: SSLDataModule, world_size: int | None = None):
    """The method of ``cfg``, its schedules planned for ``world_size`` processes (default: from
    ``trainer.devices x trainer.num_nodes``; ``train.py`` passes the Trainer's resolved count)."""
    plan = plan_run(cfg, datamodule, world_size)
    method = METHODS[cfg.method.name](
        arch=backbone_arch(cfg.model),
        method=to_dict(cfg.method),
        optim=to_dict(cfg.optim),
        total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch,
        global_batch_size=plan.global_batch_size,
        preprocessing=datamodule.describe(),
    )
    method.finite_check = cfg.get("finite_check", "auto")
    if cfg.model.get("init"):  # student and teacher start from the same outside weights
        method.load_backbone_weights(initial_weights_for(cfg.model.init, backbone_arch(cfg.model)))
    for module in method.modules():
        if isinstance(module, VisionTransformer):
            if cfg.model.get("activation_checkpointing"):
                module.set_grad_checkpointing(True)
            module.set_attention_kernel(cfg.model.get("attention", "auto"))
            if cfg.model.get("pack_crops"):
                module.set_crop_packing(True)
            module.set_last_block_pruning(cfg.model.get("prune_last_block", True))
            law = cfg.model.get("drop_path_law", "auto")
            module.set_drop_path_law(method.drop_path_law if law == "auto" else law)
            if cfg.model.get("compile"):
                module.compile_blocks()
    return method


def random_init_backbone(cfg: DictConfig):
    """The backbone of ``cfg`` as its run started: built after seeding with ``cfg.seed`` and
    initialised by the method's own rule where it has one (MAE), without outside weights."""
    from ssl_vit.config import build_backbone_from_config

    L.seed_everything(cfg.seed, verbose=False)
    backbone = build_backbone_from_config(cfg.model)
    init = getattr(METHODS.get(cfg.method.name), "init_backbone", None)
    if init is not None:
        init(backbone)
    return backbone


def resolved_world_size(cfg: DictConfig, trainer: L.Trainer) -> int:
    """The Trainer's number of processes, checked against the config and the launcher: torchrun
    and Lightning's own launcher set ``WORLD_SIZE``; under SLURM the Trainer reads the task count."""
    world = trainer.world_size
    planned = trainer.num_nodes * trainer.num_devices
    launched = os.environ.get("WORLD_SIZE")
    try:
        configured = world_size_from_config(cfg)
    except ValueError:  # "auto" / -1: the Trainer decides
        configured = planned
    if world != planned or configured != planned or (launched and int(launched) != world):
        raise ValueError(
            f"trainer.devices={cfg.trainer.get('devices')!r} x trainer.num_nodes={cfg.trainer.get('num_nodes')!r} "
            f"asks for {configured} processes, the Trainer plans {planned} and the launcher "
            f"{'started ' + launched if launched else 'reports ' + str(world)} (WORLD_SIZE, SLURM_NTASKS): set "
            "trainer.devices and trainer.num_nodes to the processes per node and the nodes the job really has"
        )
    return world


def wandb_credentials_found() -> bool:
    """Whether wandb could log in without asking: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1]) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(mode: str) -> str:
    """``logger.mode``: ``auto`` is online where wandb finds credentials and offline elsewhere."""
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.mode={mode!r}; allowed: {', '.join(WANDB_MODES)}")
    if mode == "auto":
        return "online" if wandb_credentials_found() else "offline"
    return mode


def checkpoint_step(path: str | None) -> int | None:
    """The optimizer step a checkpoint was written at (None: no checkpoint or unreadable)."""
    if not path:
        return None
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])
    except Exception:  # the resume itself reports what is wrong with the file
        return None


def build_logger(cfg: DictConfig, out_dir: Path):
    if cfg.logger.name == "csv":
        return ResumableCSVLogger(save_dir=str(out_dir), name="logs", version="")
    if cfg.logger.name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        # A resumed run drops the events a crashed run logged after its last checkpoint.
        return TensorBoardLogger(save_dir=str(out_dir), name="tensorboard", version="", default_hp_metric=False,
                                 purge_step=checkpoint_step(resume_path(cfg, out_dir)))
    from lightning.pytorch.loggers import WandbLogger

    # One wandb run per output folder: a resumed run appends to the same wandb run.
    return WandbLogger(save_dir=str(out_dir), project=cfg.logger.project, mode=wandb_mode(cfg.logger.mode),
                       id=wandb_run_id(out_dir), resume="allow")


def knn_requested(cfg: DictConfig) -> bool:
    """Whether the run evaluates k-NN during training or at its end."""
    return bool(cfg.eval.knn_every_n_steps) or bool(cfg.eval.final_knn)


def build_trainer(cfg: DictConfig, out_dir: Path, datamodule: SSLDataModule, knn: bool = True) -> L.Trainer:
    """The Trainer of ``cfg``; ``knn=False`` leaves the k-NN monitor out (data without labels)."""
    ckpt_dir = out_dir / "checkpoints"
    saving = LastCheckpoint(ckpt_dir, cfg.checkpoint_every_n_steps, cfg.get("checkpoint_every_n_minutes"),
                            cfg.get("checkpoint_keep", 2))
    callbacks: list[Any] = [saving, CollapseMonitor(), StepSeeds(cfg.seed)]
    if cfg.trainer.get("enable_progress_bar", True):  # trainer.enable_progress_bar=false: quiet logs
        callbacks.append(LoggingIntervalProgressBar())
    # The pictures show fixed validation images when the run has a validation split to draw on
    # (it is needed for k-NN anyway); otherwise the first training images, so that a small or
    # unlabelled folder still trains.
    picture_split = "val" if knn and knn_requested(cfg) else "train"
    pictures = cfg.method.get("pictures")
    if pictures is not None:  # MAE: original / masked / reconstruction of fixed images
        callbacks.append(ReconstructionPictures(datamodule, out_dir, pictures.every_n_steps, pictures.num_images,
                                                seed=cfg.seed, split=picture_split))
    features = cfg.eval.get("pictures")
    if features is not None and features.every_n_steps:  # attention maps and PCA of the evaluated backbone
        callbacks.append(FeaturePictures(datamodule, out_dir, features.every_n_steps, features.num_images,
                                         split=picture_split, setting="eval.pictures"))
    if knn and cfg.eval.knn_every_n_steps:
        callbacks.append(KNNMonitor(datamodule, cfg.eval.knn_every_n_steps, cfg.eval.knn_max_train,
                                    cfg.eval.knn_max_eval, skip_last_step=bool(cfg.eval.final_knn)))
    # SIGUSR1 (SLURM's warning before the time limit): callbacks[0], the LastCheckpoint, saves; requeue; stop.
    callbacks.append(RequeueOnSignal(saving))
    trainer_args = to_dict(cfg.trainer)
    trainer_args["precision"] = resolve_precision(trainer_args.get("precision", AUTO),
                                                  trainer_args.get("accelerator", "auto"))
    return L.Trainer(
        **trainer_args,
        default_root_dir=str(out_dir),
        logger=build_logger(cfg, out_dir),
        callbacks=callbacks,
        plugins=slurm_plugins(),  # under SLURM: its ranks, without Lightning's own requeue handler
        enable_checkpointing=False,  # LastCheckpoint writes the one checkpoint a run keeps
        use_distributed_sampler=False,  # the data module's TrainSampler shards by rank itself
        num_sanity_val_steps=0,
    )


def resume_path(cfg: DictConfig, out_dir: Path) -> str | None:
    """``ckpt_path``, else the newest complete checkpoint of DIR/checkpoints/ (None: a new run)."""
    if cfg.ckpt_path and not os.path.isfile(cfg.ckpt_path):
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r} does not exist")
    return default_checkpoint(cfg, out_dir)
