"""Small end-to-end runs of the real training path (config -> data -> method -> Trainer)."""
from __future__ import annotations

from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir

from ssl_vit.build import build_datamodule, build_method, validate

CONF = Path(__file__).resolve().parents[2] / "conf"

# A tiny but complete setting: every piece of the method runs, in seconds on 2 cores.
TINY = [
    "data=synthetic", "data.options.num_samples=128", "data.val_size=64", "data.batch_size=16",
    "data.num_workers=0", "model.depth=2", "method.crops.n_local=2", "method.head.out_dim=128",
    "method.head.hidden_dim=128", "method.head.bottleneck_dim=32", "trainer.precision=32",
]


def first_training_batch(datamodule) -> dict:
    """The first training batch, finished as the Trainer finishes it (``data.batched_augmentation``,
    on in the CPU recipe of DINO / DINOv2, leaves the augmentation to ``on_after_batch_transfer``)."""
    return datamodule.on_after_batch_transfer(next(iter(datamodule.train_dataloader())), 0)


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="train", overrides=overrides)


def fit(overrides: list[str], max_steps: int, callbacks=(), seed: int = 0, accelerator: str = "cpu",
        precision: str = "32", base: list[str] = TINY, **trainer_kwargs):
    """Train with the real builders; returns (cfg, datamodule, method, trainer). Bit-for-bit
    deterministic on the CPU in fp32 (the default); on CUDA, as fast as cuDNN allows.
    ``trainer_kwargs`` go to the Trainer (e.g. ``accumulate_grad_batches``; give the same value
    as an override, ``trainer.accumulate_grad_batches=N``, so that the method plans for it).
    ``base``: the overrides the run starts from (the DINO-family TINY setting by default)."""
    cfg = compose_train(list(base) + [f"trainer.max_steps={max_steps}", f"seed={seed}"] + list(overrides))
    validate(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    method = build_method(cfg, datamodule)
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator=accelerator,
                        precision=precision, callbacks=list(callbacks), deterministic=accelerator == "cpu",
                        **trainer_kwargs)
    trainer.fit(method, datamodule=datamodule)
    return cfg, datamodule, method, trainer
