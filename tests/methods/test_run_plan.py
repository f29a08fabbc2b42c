"""The learning rate and the schedules count every process and every accumulated micro-batch.

Expected values are the papers' rules worked out by hand: DINO lr = 0.0005 x global batch / 256,
DINOv2 lr = 0.004 x sqrt(global batch / 1024), global batch = per-process batch x processes x
accumulated micro-batches; one schedule epoch = the optimizer steps of one pass on one process.
"""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from training_helpers import compose_train, fit
from ssl_vit.build import build_datamodule, build_method, optimizer_steps_per_data_epoch, plan_run, world_size_from_config
from ssl_vit.callbacks import CollapseMonitor, KNNMonitor, LastCheckpoint
import ssl_vit.losses.center as center_module
import ssl_vit.methods.self_distillation as base_module


@pytest.fixture
def image_root(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    return str(tmp_path)


@pytest.mark.parametrize("experiment, processes, global_batch, lr", [
    ("dinov2_vitl16_short", 32, 2048, 0.004 * math.sqrt(2048 / 1024)),  # 4 nodes x 8 GPUs x 64
    ("dino_vits16", 8, 512, 0.0005 * 512 / 256),                        # 8 GPUs x 64
])
def test_paper_recipes_scale_the_lr_by_the_global_batch(experiment, processes, global_batch, lr, image_root):
    cfg = compose_train([f"experiment={experiment}", f"data.root={image_root}"])
    datamodule = build_datamodule(cfg)
    assert world_size_from_config(cfg) == processes
    with torch.device("meta"):  # the real method, without allocating ViT-L's weights
        method = build_method(cfg, datamodule)
    assert method.hparams.global_batch_size == global_batch
    assert method.base_lr == pytest.approx(lr, rel=1e-12)
    assert method.lr_at(cfg.trainer.max_steps // 2) < lr  # the cosine is laid over the recipe's steps
    # An explicit world size (what train.py passes from the Trainer) wins over the config.
    with torch.device("meta"):
        one = build_method(cfg, datamodule, world_size=1)
    assert one.hparams.global_batch_size == 64


def test_devices_forms_and_auto(image_root):
    for devices, nodes, expected in (("'2'", 3, 6), ("'0,1'", 1, 2), ("[0,1,2]", 2, 6), (4, 1, 4)):
        cfg = compose_train([f"trainer.devices={devices}", f"trainer.num_nodes={nodes}"])
        assert world_size_from_config(cfg) == expected, devices
    cfg = compose_train(["trainer.devices=auto"])
    with pytest.raises(ValueError, match="trainer.devices='auto'"):
        world_size_from_config(cfg)


def test_steps_per_epoch_count_one_process_after_sharding_and_accumulation():
    # 1,500 images on 2 processes: 750 each, 46 batches of 16, 23 steps of 2 micro-batches.
    assert optimizer_steps_per_data_epoch(1500, 16, 1, 1) == 93
    assert optimizer_steps_per_data_epoch(1500, 16, 2, 1) == 46
    assert optimizer_steps_per_data_epoch(1500, 16, 2, 2) == 23
    assert optimizer_steps_per_data_epoch(1500, 16, 2, 4) == 12  # the last window of 2 still steps
    assert optimizer_steps_per_data_epoch(15, 8, 2, 1) == 1  # ceil(15 / 2) = 8 images each
    with pytest.raises(ValueError, match="data.batch_size=8 is larger than the 4 training images each of the 4"):
        optimizer_steps_per_data_epoch(15, 8, 4, 1)
    cfg = compose_train(["data=synthetic", "data.batch_size=16", "trainer.devices=2",
                         "trainer.accumulate_grad_batches=2", "trainer.max_steps=-1", "trainer.max_epochs=3"])
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    n = len(datamodule.train_dataset)
    plan = plan_run(cfg, datamodule)
    per_epoch = math.ceil((math.ceil(n / 2) // 16) / 2)
    assert (plan.world_size, plan.global_batch_size, plan.steps_per_epoch, plan.total_steps) == (2, 64, per_epoch,
                                                                                                3 * per_epoch)


class CallCounter:
    def __init__(self, monkeypatch, module, name):
        self.calls = []
        original = getattr(module, name)

        def counted(*args, **kwargs):
            self.calls.append(args)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


class EvaluationCounter(KNNMonitor):
    def __init__(self, datamodule):
        super().__init__(datamodule, every_n_steps=1)
        self.steps = []

    def evaluate(self, trainer, pl_module):
        self.steps.append(trainer.global_step)
        return 0.0


class CheckCounter(CollapseMonitor):
    def __init__(self):
        super().__init__(every_n_steps=1, start_step=0)
        self.steps = []

    def check(self, step, metrics):
        self.steps.append(step)
        return []


class SaveCounter(LastCheckpoint):
    def __init__(self, path):
        super().__init__(path, every_n_steps=1)
        self.steps = []

    def save(self, trainer):
        if trainer.global_step != self._saved_step:
            self.steps.append(trainer.global_step)
        super().save(trainer)


@pytest.mark.parametrize("name", ["dino", "dinov2"])
def test_accumulated_micro_batches_make_one_step_of_everything(name, monkeypatch, tmp_path):
    """3 optimizer steps of 2 micro-batches of 16: the EMA, the centers (holding both
    micro-batches' teacher outputs), the lr scaling and every monitor act once per step."""
    ema = CallCounter(monkeypatch, base_module, "ema_update_lists")
    centers = CallCounter(monkeypatch, center_module, "ema_center_update")
    cfg = compose_train(["data=synthetic"])
    datamodule = build_datamodule(cfg)
    knn, collapse, saves = EvaluationCounter(datamodule), CheckCounter(), SaveCounter(tmp_path)
    _, _, method, trainer = fit([f"method={name}", "trainer.accumulate_grad_batches=2"], max_steps=3,
                                callbacks=[knn, collapse, saves], accumulate_grad_batches=2)
    assert trainer.global_step == 3
    assert [args[2] for args in ema.calls] == [method.momentum_at(s) for s in range(3)]
    # One update per loss center per step, each over the two micro-batches: DINO's cls center sees
    # 2 crops x 16 images x 2 micro-batches rows; DINOv2 adds the iBOT center (masked tokens).
    per_step = 2 if name == "dinov2" else 1
    assert len(centers.calls) == 3 * per_step
    assert [int(args[1][-1]) for args in centers.calls[::per_step]] == [2 * 16 * 2] * 3
    assert method.hparams.global_batch_size == 32
    assert knn.steps == [1, 2, 3] and collapse.steps == [1, 2, 3] and saves.steps == [1, 2, 3]
