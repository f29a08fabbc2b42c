"""python -m ssl_vit.train [overrides]: self-supervised pretraining (Hydra entry point).

All outputs go to the Hydra run folder DIR: checkpoints/last.ckpt (resumed automatically when
the same DIR is used again), logs/, and metrics.json: the final k-NN figures and fit_seconds, the
training time of this invocation (without start-up and final k-NN; a resumed run counts anew).
"""
from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ssl_vit.build import (
    build_datamodule, build_method, build_trainer, resolved_world_size, resume_path, validate,
)
from ssl_vit.callbacks.knn import knn_accuracies
from ssl_vit.config import build_backbone_from_config

log = logging.getLogger("ssl_vit.train")


def final_knn(cfg: DictConfig, method, datamodule, precision: str, device: torch.device) -> dict[str, float]:
    """k-NN top-1 on the full validation split: the trained teacher beside the same backbone
    at random init (same seed, so the same initial weights the run started from). The bank is
    the train split, or a fixed stratified subset of ``eval.final_knn_max_train`` images of it.
    ``device``: where training ran (Lightning moves the module back to the CPU when fit ends)."""
    bank, query = datamodule.knn_dataloaders("val", max_train=cfg.eval.get("final_knn_max_train"))
    dtype = torch.bfloat16 if "bf16" in precision else None
    L.seed_everything(cfg.seed, verbose=False)
    random_init = build_backbone_from_config(cfg.model).to(device)
    trained, baseline = knn_accuracies([method.teacher_backbone().to(device), random_init], bank, query, device,
                                       autocast_dtype=dtype, progress=True)
    return {"knn_top1": trained, "knn_top1_random_init": baseline, "knn_bank_size": len(bank.dataset),
            "knn_query_size": len(query.dataset)}


def run(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    validate(cfg)  # fail before any work starts
    with torch.device("meta"):  # checks the model config without allocating its weights
        build_backbone_from_config(cfg.model)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    trainer = build_trainer(cfg, out_dir, datamodule)
    # Schedules and the lr scaling count every process the Trainer runs (torchrun, SLURM, ...).
    method = build_method(cfg, datamodule, world_size=resolved_world_size(cfg, trainer))
    # The EMA teacher is kept in eval mode on purpose (no drop path, never trained by gradients).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
    fit_start = time.perf_counter()
    trainer.fit(method, datamodule=datamodule, ckpt_path=resume_path(cfg, out_dir))
    # Training time without start-up or the final k-NN: what a wall-clock budget should count.
    fit_seconds = round(time.perf_counter() - fit_start, 1)

    metrics: dict[str, float] = {"global_step": trainer.global_step, "fit_seconds": fit_seconds}
    if not trainer.is_global_zero:
        return metrics
    if cfg.eval.final_knn:
        metrics.update(final_knn(cfg, method, datamodule, str(trainer.precision), trainer.strategy.root_device))
        print(f"knn_top1={metrics['knn_top1']:.4f} (k=20; queries: the {metrics['knn_query_size']} validation "
              f"images, bank: {metrics['knn_bank_size']} training images)")
        print(f"knn_top1_random_init={metrics['knn_top1_random_init']:.4f}")
    # Counted in this process; DataLoader workers count the files they skip in their own copies.
    metrics["skipped_files"] = datamodule.num_skipped
    if metrics["skipped_files"]:
        print(f"skipped {metrics['skipped_files']} unreadable files under data.root={cfg.data.get('root')} "
              "(named in the warnings above)")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


@hydra.main(version_base=None, config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
