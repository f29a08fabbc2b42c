"""k-NN monitor: weighted k-NN top-1 of the teacher backbone on labelled validation images."""
from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch

from ssl_vit.callbacks.step_tracking import OptimizerStepCallback
from ssl_vit.evaluation.knn import extract_features_of_many, knn_top1


def knn_accuracy(backbone: torch.nn.Module, bank_loader, query_loader, device, k: int = 20,
                 temperature: float = 0.07, autocast_dtype: torch.dtype | None = None) -> float:
    return knn_accuracies([backbone], bank_loader, query_loader, device, k, temperature, autocast_dtype)[0]


def knn_accuracies(backbones: Sequence[torch.nn.Module], bank_loader, query_loader, device, k: int = 20,
                   temperature: float = 0.07, autocast_dtype: torch.dtype | None = None,
                   progress: bool = False) -> list[float]:
    """Weighted k-NN top-1 of each backbone, the images read once for all of them
    (``progress``: a progress bar per pass, for evaluations outside the training loop's bar)."""
    banks, bank_labels = extract_features_of_many(backbones, bank_loader, device, autocast_dtype,
                                                  "k-NN bank" if progress else None)
    queries, query_labels = extract_features_of_many(backbones, query_loader, device, autocast_dtype,
                                                     "k-NN queries" if progress else None)
    return [knn_top1(bank, bank_labels, query, query_labels, k=k, temperature=temperature)
            for bank, query in zip(banks, queries)]


class KNNMonitor(OptimizerStepCallback):
    """Every ``every_n_steps`` optimizer steps, logs ``knn_top1`` (k=20, T=0.07, cosine) of the
    module's ``evaluation_backbone()`` on a fixed, stratified subset of the validation split.
    ``skip_last_step``: not at the run's last step (a full evaluation follows the run anyway)."""

    def __init__(self, datamodule, every_n_steps: int = 100, max_train: int | None = 10000,
                 max_eval: int | None = 2000, k: int = 20, temperature: float = 0.07,
                 skip_last_step: bool = False):
        self.datamodule = datamodule
        self.every_n_steps = every_n_steps
        self.skip_last_step = skip_last_step
        self.max_train, self.max_eval = max_train, max_eval
        self.k, self.temperature = k, temperature
        self._loaders = None

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        if self._loaders is None:
            self._loaders = self.datamodule.knn_dataloaders("val", max_train=self.max_train, max_eval=self.max_eval)
        bf16 = "bf16" in str(trainer.precision)
        accuracy = knn_accuracy(pl_module.evaluation_backbone(), *self._loaders, pl_module.device, self.k,
                                self.temperature, torch.bfloat16 if bf16 else None)
        # Shown by the progress bar (callbacks/progress.py); prog_bar=True would read it every step.
        pl_module.log("knn_top1", accuracy, on_step=True, on_epoch=False)
        return accuracy

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.optimizer_stepped(trainer) or not self.every_n_steps or step % self.every_n_steps:
            return
        if not trainer.is_global_zero:
            return
        if self.skip_last_step and step == trainer.max_steps:
            return
        self.evaluate(trainer, pl_module)
