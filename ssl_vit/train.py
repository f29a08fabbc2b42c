"""python -m ssl_vit.train [overrides]: self-supervised pretraining (Hydra entry point).

All outputs go to the Hydra run folder DIR: checkpoints/last.ckpt (resumed automatically when
the same DIR is used again), logs/ (continued, not restarted, by a resumed run), and metrics.json:
the final k-NN figures (null, with the reason, for images without labels) and fit_seconds, the
training time of this invocation (without start-up and final k-NN; a resumed run counts anew).
On SIGTERM (preemption) the run writes its checkpoint and exits with code 143; on SIGUSR1 (what
``#SBATCH --signal=USR1@N`` sends before the time limit) it writes it after the current step and
requeues its SLURM job (launch/README.md).
"""
from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from lightning.fabric.utilities.rank_zero import rank_zero_only

from ssl_vit.build import (
    build_datamodule, build_method, build_trainer, knn_requested, plan_run, random_init_backbone,
    resolved_world_size, validate,
)
from ssl_vit.checkpoints import remove_stale_temporaries
from ssl_vit.resume import ResumeChoice, choose_resume, load_weights, set_aside_checkpoints
from ssl_vit.callbacks import LastCheckpoint
from ssl_vit.callbacks.knn import knn_accuracies
from ssl_vit.callbacks.requeue import RequeueStop
from ssl_vit.cli import config_errors_exit, run_app
from ssl_vit.cluster import check_launch
from ssl_vit.config import build_backbone_from_config
from ssl_vit.cpu_memory import use_cpu_allocator_of_run
from ssl_vit.schema import ConfigError

log = logging.getLogger("ssl_vit.train")
SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process the signal ended


def final_knn(cfg: DictConfig, method, datamodule, precision: str, device: torch.device) -> dict[str, float]:
    """k-NN top-1 on the full validation split: the trained teacher beside the same backbone
    at random init (same seed, so the same initial weights the run started from). The bank is
    the train split, or a fixed stratified subset of ``eval.final_knn_max_train`` images of it.
    ``device``: where training ran (Lightning moves the module back to the CPU when fit ends)."""
    bank, query = datamodule.knn_dataloaders("val", max_train=cfg.eval.get("final_knn_max_train"))
    dtype = torch.bfloat16 if "bf16" in precision else None
    random_init = random_init_backbone(cfg).to(device)
    trained, baseline = knn_accuracies([method.evaluation_backbone().to(device), random_init], bank, query, device,
                                       autocast_dtype=dtype, progress=True)
    return {"knn_top1": trained, "knn_top1_random_init": baseline, "knn_bank_size": len(bank.dataset),
            "knn_query_size": len(query.dataset)}


def last_checkpoint(trainer: L.Trainer) -> LastCheckpoint:
    return next(cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint))


def run(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    datamodule, method, trainer, knn_skipped, start = prepare(cfg, out_dir)
    # The EMA teacher is kept in eval mode on purpose (no drop path, never trained by gradients).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
    # The data module resumes mid-epoch through its own state (ssl_vit.data.sampler), which
    # Lightning's check for resumable DataLoaders does not see.
    warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended")
    # Printed by Lightning at every fit, nothing a user can act on: its own use of a torch pytree
    # API that torch deprecated, and the model summary's size estimate under bf16 (it counts fp32).
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Precision bf16-mixed is not supported by the model summary")
    try:
        return train_and_evaluate(cfg, out_dir, datamodule, method, trainer, knn_skipped, start.ckpt_path)
    finally:
        close_loggers(trainer)


def prepare(cfg: DictConfig, out_dir: Path):
    """Everything before training, in the order that fails fastest: the config, the model on the
    meta device, the data and its splits, the trainer, the method. A value that cannot work
    raises :class:`ConfigError` here, before any step is taken or any checkpoint written."""
    try:
        if cfg.get("cascade") is not None:
            choice = HydraConfig.get().runtime.choices.get("experiment") if HydraConfig.initialized() else None
            raise ValueError(f"experiment={choice} is a cascade of training runs: start it with "
                             f"python -m ssl_vit.cascade experiment={choice}")
        validate(cfg)
        allocator = use_cpu_allocator_of_run(cfg)  # before the run's first large tensor
        if allocator is not None:
            log.info("cpu_allocator=%s: %s", cfg.cpu_allocator, allocator)
        with torch.device("meta"):  # checks the model config without allocating its weights
            build_backbone_from_config(cfg.model)
        L.seed_everything(cfg.seed, workers=True)
        datamodule = build_datamodule(cfg)
        datamodule.prepare_data()
        datamodule.setup("fit")
        knn_skipped = datamodule.knn_unavailable_reason() if knn_requested(cfg) else None
        if knn_skipped:
            log.warning("k-NN evaluation is skipped: %s; training on all of them", knn_skipped)
        elif knn_requested(cfg):
            datamodule.check_knn_splits()  # an evaluation split too small fails now, not after training
        start = start_point(cfg, out_dir, datamodule)
        trainer = build_trainer(cfg, out_dir, datamodule, knn=not knn_skipped)
        check_launch(cfg, trainer)  # -m with processes Lightning would start itself: refused
        # Schedules and the lr scaling count every process the Trainer runs (torchrun, SLURM, ...).
        method = build_method(cfg, datamodule, world_size=resolved_world_size(cfg, trainer))
        if start.weights_from:
            load_weights(method, start.weights_from)
    except ConfigError:
        raise
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error
    return datamodule, method, trainer, knn_skipped, start


def start_point(cfg: DictConfig, out_dir: Path, datamodule) -> ResumeChoice:
    """Where training starts: afresh, from a checkpoint, or from a checkpoint's weights with new
    schedules (``resume.schedule``, :mod:`ssl_vit.resume`). Leftovers of a killed checkpoint
    write are removed first (by the first process only)."""
    if rank_zero_only.rank == 0:
        remove_stale_temporaries(out_dir / "checkpoints")
    start = choose_resume(cfg, out_dir, plan_run(cfg, datamodule))
    if start.weights_from and Path(start.weights_from).parent == out_dir / "checkpoints":
        moved = set_aside_checkpoints(out_dir, start.step)
        start = ResumeChoice(weights_from=str(moved / Path(start.weights_from).name), step=start.step)
    if start.ckpt_path and rank_zero_only.rank == 0:
        print(f"resuming from {start.ckpt_path} at step {start.step}", flush=True)
    return start


def close_loggers(trainer: L.Trainer) -> None:
    """Finish the wandb run (the process may go on: tests, notebooks, a second run)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def train_and_evaluate(cfg: DictConfig, out_dir: Path, datamodule, method, trainer: L.Trainer,
                       knn_skipped: str | None, ckpt_path: str | None) -> dict[str, float]:
    fit_start = time.perf_counter()
    try:
        trainer.fit(method, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        # Lightning ends fit with exit code 0 on SIGTERM; a scheduler must see the run as stopped.
        saved = last_checkpoint(trainer)
        if trainer.is_global_zero:
            print(f"stopped by SIGTERM at step {saved.saved_step}: wrote {saved.path}; exiting with code "
                  f"{SIGTERM_EXIT_CODE} (start the same command again to resume)", flush=True)
        sys.exit(SIGTERM_EXIT_CODE)
    except RequeueStop as stop:  # SLURM's warning signal; the callback said what it did (callbacks/requeue.py)
        sys.exit(0 if stop.requeued else 128 + stop.signum)
    # Training time without start-up or the final k-NN: what a wall-clock budget should count.
    fit_seconds = round(time.perf_counter() - fit_start, 1)

    metrics: dict[str, float] = {"global_step": trainer.global_step, "fit_seconds": fit_seconds}
    if not trainer.is_global_zero:
        return metrics
    if knn_skipped:
        metrics.update({"knn_top1": None, "knn_top1_random_init": None, "knn_skipped_reason": knn_skipped})
    elif cfg.eval.final_knn:
        metrics.update(final_knn(cfg, method, datamodule, str(trainer.precision), trainer.strategy.root_device))
        print(f"knn_top1={metrics['knn_top1']:.4f} (k=20; queries: the {metrics['knn_query_size']} validation "
              f"images, bank: {metrics['knn_bank_size']} training images)")
        print(f"knn_top1_random_init={metrics['knn_top1_random_init']:.4f}")
        if hasattr(method, "heldout_metrics"):  # a method's own figures on the validation split (MAE)
            _, val_loader = datamodule.knn_dataloaders("val")
            heldout = method.heldout_metrics(val_loader, trainer.strategy.root_device, seed=cfg.seed)
            metrics.update(heldout)
            print(" ".join(f"{key}={value:.4f}" for key, value in heldout.items()))
    # Counted in this process; DataLoader workers count the files they skip in their own copies.
    metrics["skipped_files"] = datamodule.num_skipped
    if metrics["skipped_files"]:
        print(f"skipped {metrics['skipped_files']} unreadable files under data.root={cfg.data.get('root')} "
              "(named in the warnings above)")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


@hydra.main(version_base=None, config_path="../conf", config_name="train")
@config_errors_exit
def main(cfg: DictConfig) -> None:
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    run_app(main)
