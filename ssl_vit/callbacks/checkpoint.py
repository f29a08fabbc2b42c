"""Keeps DIR/checkpoints/last.ckpt current: every N optimizer steps, at the end, and on a crash.

Written to a temporary file and renamed, so a run killed mid-write never leaves a truncated
last.ckpt behind.
"""
from __future__ import annotations

import os
from pathlib import Path

import lightning as L

from ssl_vit.callbacks.step_tracking import OptimizerStepCallback


class LastCheckpoint(OptimizerStepCallback):
    def __init__(self, dirpath: str | os.PathLike, every_n_steps: int = 50):
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_steps = every_n_steps
        self._saved_step = -1

    @property
    def saved_step(self) -> int:
        """The optimizer step of the checkpoint written last by this process (-1: none yet)."""
        return self._saved_step

    def save(self, trainer: L.Trainer) -> None:
        if trainer.global_step == self._saved_step:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".ckpt.tmp")
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.optimizer_stepped(trainer) and self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.save(trainer)
