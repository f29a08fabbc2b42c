"""The tqdm progress bar, with the loss and the k-NN accuracy read on the logging interval only.

Lightning turns every value logged with ``prog_bar=True`` into a Python number after every step,
which makes the host wait for an accelerator to finish the step (it can no longer queue the next
one ahead). ``loss`` and ``knn_top1`` are logged without ``prog_bar``; this bar reads them from
the Trainer's callback metrics every ``trainer.log_every_n_steps`` steps, when the logger reads
them anyway, and shows those values (with their step) until the next read. The bar's counter
moves every step.
"""
from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar

SHOWN = ("loss", "knn_top1")


class LoggingIntervalProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self._shown: dict[str, float | int] = {}

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        step = trainer.global_step
        if not self._shown or (step % trainer.log_every_n_steps == 0 and self._shown.get("at_step") != step):
            read = {name: float(trainer.callback_metrics[name]) for name in SHOWN if name in trainer.callback_metrics}
            if read:
                self._shown = {**read, "at_step": step}
        return {**metrics, **self._shown}
