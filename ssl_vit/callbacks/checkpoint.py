"""Keeps DIR/checkpoints/ current: a checkpoint every N optimizer steps and/or every M minutes,
at the end, and on a crash (unless a non-finite loss has spoilt the weights); the newest is
``last.ckpt``, the ``keep`` newest are kept as ``step-XXXXXXX.ckpt`` beside it (older ones are
deleted).

Every file is written to a temporary name and renamed, so a run killed mid-write leaves the
previous checkpoints intact (the temporary file is removed by the next start, see
:mod:`ssl_vit.checkpoints`). ``last.ckpt`` is a hard link to the newest step file where the file
system allows it (a copy otherwise), replaced atomically.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from ssl_vit.callbacks.step_tracking import OptimizerStepCallback
from ssl_vit.checkpoints import LAST, step_checkpoints, step_file_name
from ssl_vit.losses.checks import NonFiniteLossError


class LastCheckpoint(OptimizerStepCallback):
    def __init__(self, dirpath: str | os.PathLike, every_n_steps: int = 50, every_n_minutes: float | None = None,
                 keep: int = 2):
        if keep < 1:
            raise ValueError(f"checkpoint_keep={keep}: keep at least 1 checkpoint")
        self.dir = Path(dirpath)
        self.path = self.dir / LAST
        self.every_n_steps = every_n_steps
        self.every_n_seconds = None if not every_n_minutes else 60.0 * float(every_n_minutes)
        self.keep = int(keep)
        self._saved_step = -1
        self._saved_at = time.monotonic()

    @property
    def saved_step(self) -> int:
        """The optimizer step of the checkpoint written last by this process (-1: none yet)."""
        return self._saved_step

    def save(self, trainer: L.Trainer) -> None:
        if trainer.global_step == self._saved_step:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / step_file_name(trainer.global_step)
        tmp = final.with_name(final.name + ".tmp")
        # The full state (optimizer, loops, callbacks) to resume from; said explicitly, which also keeps
        # Lightning from logging its "weights_only was not set" line at every save.
        trainer.save_checkpoint(tmp, weights_only=False)  # every rank takes part (sharded strategies); rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, final)
            self._point_last_at(final)
            for old in step_checkpoints(self.dir)[self.keep:]:
                old.unlink(missing_ok=True)
        self._saved_step = trainer.global_step
        self._saved_at = time.monotonic()

    def _point_last_at(self, target: Path) -> None:
        link = self.path.with_name(LAST + ".tmp")
        link.unlink(missing_ok=True)
        try:
            os.link(target, link)
        except OSError:  # no hard links on this file system
            shutil.copyfile(target, link)
        os.replace(link, self.path)

    def _due(self, trainer: L.Trainer) -> bool:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            return True
        return self.every_n_seconds is not None and time.monotonic() - self._saved_at >= self.every_n_seconds

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._saved_at = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.optimizer_stepped(trainer) and self._due(trainer):
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if getattr(exception, "weights_spoilt", False):
            # A non-finite loss found after an optimizer step used it (finite_check=logging_interval):
            # the weights in memory are not worth resuming from; the newest checkpoint predates it.
            newest = f"step {self._saved_step}" if self._saved_step >= 0 else "none from this run"
            rank_zero_warn(f"no checkpoint written at the crash: the weights took a step with a non-finite loss "
                           f"(newest checkpoint in {self.dir}: {newest})")
            return
        try:
            self.save(trainer)
        except NonFiniteLossError as err:  # the save found a non-finite loss not yet reported
            rank_zero_warn(f"no checkpoint written at the crash: {err}")
