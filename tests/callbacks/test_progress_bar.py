"""The progress bar shows the loss (and k-NN accuracy) read on the logging interval only
(``callbacks/progress.py``): between reads it keeps the value of the last read, so that no step
in between reads a tensor on the host."""
from __future__ import annotations

import lightning as L

from ssl_vit.build import build_datamodule, build_method, validate
from ssl_vit.callbacks.progress import LoggingIntervalProgressBar
from tests.methods.training_helpers import TINY, compose_train

LOG_EVERY = 3


class RecordLossAndBar(L.Callback):
    """After each step: the step's own loss and what the bar shows (it runs after the bar)."""

    def __init__(self, bar: LoggingIntervalProgressBar):
        self.bar = bar
        self.losses: dict[int, float] = {}
        self.shown: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])
        self.shown[trainer.global_step] = {k: v for k, v in self.bar.get_metrics(trainer, pl_module).items()
                                           if k in ("loss", "at_step")}


def test_the_bar_shows_the_loss_of_the_last_logging_step(tmp_path):
    cfg = compose_train(TINY + ["method=dinov2", "trainer.max_steps=7"])
    validate(cfg)
    L.seed_everything(0)
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    method = build_method(cfg, datamodule)
    bar = LoggingIntervalProgressBar()
    record = RecordLossAndBar(bar)
    trainer = L.Trainer(max_steps=7, log_every_n_steps=LOG_EVERY, callbacks=[bar, record], logger=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(method, datamodule=datamodule)

    # The first step is read (nothing shown yet), then every third: steps 1, 3 and 6 (global_step
    # after the optimizer step), each shown until the next read.
    read_at = {1: 1, 2: 1, 3: 3, 4: 3, 5: 3, 6: 6, 7: 6}
    for step, read in read_at.items():
        assert record.shown[step] == {"loss": record.losses[read], "at_step": read}, step
    assert len(set(record.losses.values())) == 7  # distinct losses: a stale value could not pass as fresh
