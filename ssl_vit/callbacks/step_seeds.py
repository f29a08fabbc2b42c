"""Seeds torch's generators before every training batch from ``(seed, rank, step, micro-batch)``.

What a training step draws itself (drop path, MAE's masks, anything on the accelerator) then
depends on where the run stands, not on the generator's history: a run resumed from a
checkpoint draws what the uninterrupted run drew at that step, without storing generator states,
and every process of a distributed run draws its own stream (as the official code seeds each
rank differently). The data's randomness is seeded per image by the sampler
(:mod:`ssl_vit.data.sampler`).
"""
from __future__ import annotations

import lightning as L
import torch

from ssl_vit.data.sampler import mix_seed


class StepSeeds(L.Callback):
    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        micro_batch = batch_idx % max(1, int(trainer.accumulate_grad_batches))
        torch.manual_seed(mix_seed(self.seed, trainer.global_rank, trainer.global_step, micro_batch))
