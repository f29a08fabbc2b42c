"""Collapse monitor: warns when the teacher's outputs become uniform or one-hot.

Reads the metrics the self-distillation methods log every step (entropies normalised by log K):
``collapse/teacher_entropy`` near 1 means every output is near-uniform; ``collapse/
teacher_batch_entropy`` near 0 means every image lands on the same prototype.
"""
from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_warn

from ssl_vit.callbacks.step_tracking import OptimizerStepCallback


class CollapseMonitor(OptimizerStepCallback):
    def __init__(self, every_n_steps: int = 50, start_step: int = 50, uniform_above: float = 0.98,
                 one_hot_below: float = 0.02):
        self.every_n_steps = every_n_steps
        self.start_step = start_step
        self.uniform_above = uniform_above
        self.one_hot_below = one_hot_below
        self.warned: set[str] = set()

    def check(self, step: int, metrics: dict) -> list[str]:
        """The collapse modes present in ``metrics`` (warned once each until they recover)."""
        modes = []
        entropy = metrics.get("collapse/teacher_entropy")
        batch_entropy = metrics.get("collapse/teacher_batch_entropy")
        if entropy is not None and float(entropy) > self.uniform_above:
            modes.append(f"uniform: teacher entropy {float(entropy):.3f} x log K")
        if batch_entropy is not None and float(batch_entropy) < self.one_hot_below:
            modes.append(f"one-hot: entropy of the mean teacher output {float(batch_entropy):.3f} x log K")
        for mode in modes:
            kind = mode.split(":")[0]
            if kind not in self.warned:
                rank_zero_warn(f"step {step}: the teacher's outputs look collapsed ({mode}); check the "
                               "teacher temperature, centering and learning rate")
                self.warned.add(kind)
        self.warned &= {m.split(":")[0] for m in modes}
        return modes

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.optimizer_stepped(trainer) and step >= self.start_step and step % self.every_n_steps == 0:
            self.check(step, trainer.callback_metrics)
