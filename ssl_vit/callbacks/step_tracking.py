"""Callbacks that act once per optimizer step.

``on_train_batch_end`` runs after every batch, and with gradient accumulation several batches
(micro-batches) make one optimizer step: ``trainer.global_step`` stays put between them, so a
rule such as ``global_step % N == 0`` would fire on each micro-batch of step N (and at step 0
before any step). :class:`OptimizerStepCallback` tells a batch that completed an optimizer step
from one that only accumulated.
"""
from __future__ import annotations

import lightning as L


class OptimizerStepCallback(L.Callback):
    """Base class: :meth:`optimizer_stepped` is True at most once per optimizer step."""

    _last_step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step  # after a resume: the restored step

    def optimizer_stepped(self, trainer: L.Trainer) -> bool:
        """Call from ``on_train_batch_end``: whether this batch completed an optimizer step."""
        if self._last_step is None:
            self._last_step = 0
        if trainer.global_step == self._last_step:
            return False
        self._last_step = trainer.global_step
        return True
