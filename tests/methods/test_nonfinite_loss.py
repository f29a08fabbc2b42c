"""A non-finite loss stops the run, names the term and the step, and never reaches a checkpoint
(``finite_check``, ssl_vit/methods/finite_check.py): read every step, the run stops at the bad
step and the crash checkpoint holds the weights before it; read on the logging interval (no
host synchronisation per step), it stops at the next read and writes no checkpoint from the
spoilt weights."""
from __future__ import annotations

import pytest
import torch

from training_helpers import TINY, compose_train
from ssl_vit.losses.checks import NonFiniteLossError
from ssl_vit.methods.dinov2 import DINOv2
from ssl_vit.methods.mae import MAE
from ssl_vit.train import run
from tests.methods.test_mae import MAE_TINY

QUICK = ["eval.final_knn=false", "eval.knn_every_n_steps=0", "eval.pictures.every_n_steps=0",
         "trainer.enable_progress_bar=false", "model.depth=1", "trainer.max_steps=12", "checkpoint_every_n_steps=2",
         "checkpoint_keep=10"]
BAD_STEP = 5


def _poison_step(monkeypatch, method_class, images_key):
    """From step BAD_STEP on, one image of every batch is NaN."""
    original = method_class.training_step

    def step(self, batch, batch_idx):
        if self.global_step >= BAD_STEP:
            images = batch[images_key] if isinstance(batch, dict) else batch[0]
            images[0] = float("nan")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(method_class, "training_step", step)


def _saved(out) -> dict[int, dict]:
    checkpoints = {}
    for path in sorted((out / "checkpoints").glob("step-*.ckpt")):
        checkpoint = torch.load(path, weights_only=False, map_location="cpu")
        checkpoints[checkpoint["global_step"]] = checkpoint
    return checkpoints


def _all_finite(checkpoint: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in checkpoint["state_dict"].values() if v.is_floating_point())


def test_read_every_step_stops_at_the_bad_step_and_saves_the_weights_before_it(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _poison_step(monkeypatch, DINOv2, "global_crops")
    cfg = compose_train(TINY + QUICK + ["finite_check=every_step"])
    with pytest.raises(NonFiniteLossError, match=rf"non-finite dino loss \(nan\) at step {BAD_STEP}$") as err:
        run(cfg, out)
    assert not err.value.weights_spoilt
    saved = _saved(out)
    assert sorted(saved) == [2, 4, BAD_STEP]  # the crash checkpoint: before the bad step's update
    assert all(_all_finite(c) for c in saved.values())


@pytest.mark.parametrize("method", ["dinov2", "mae"])
def test_read_on_the_logging_interval_stops_there_and_saves_nothing_spoilt(tmp_path, monkeypatch, method):
    """Checkpoints every 2 steps, logging every 4: the bad step 5 is found by the save at step 6
    (every save reads the record first); nothing is written at 6 or at the crash."""
    out = tmp_path / "run"
    if method == "mae":
        _poison_step(monkeypatch, MAE, None)
        base, term = [o for o in MAE_TINY if "max_steps" not in o], "mae"
    else:
        _poison_step(monkeypatch, DINOv2, "global_crops")
        base, term = TINY, "dino"
    cfg = compose_train(base + QUICK + ["finite_check=logging_interval", "trainer.log_every_n_steps=4"])
    with pytest.raises(NonFiniteLossError, match=rf"non-finite {term} loss \(nan\) at step {BAD_STEP}, found by the "
                                                 r"check at step 6 \(finite_check=logging_interval") as err:
        run(cfg, out)
    assert err.value.weights_spoilt
    saved = _saved(out)
    assert sorted(saved) == [2, 4]
    assert all(_all_finite(c) for c in saved.values())
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4


def test_the_logging_interval_read_finds_a_loss_between_checkpoints(tmp_path, monkeypatch):
    """No checkpoint before the read: the read at the logging step (8) stops the run, naming the
    first bad step and its terms' values as recorded on the device."""
    out = tmp_path / "run"
    _poison_step(monkeypatch, DINOv2, "global_crops")
    cfg = compose_train(TINY + QUICK + ["finite_check=logging_interval", "trainer.log_every_n_steps=4",
                                        "checkpoint_every_n_steps=0"])
    with pytest.raises(NonFiniteLossError, match=rf"non-finite dino loss \(nan\) at step {BAD_STEP}, found by the "
                                                 r"check at step 8 ") as err:
        run(cfg, out)
    assert err.value.weights_spoilt
    assert not (out / "checkpoints" / "last.ckpt").exists()


def test_a_finite_run_records_nothing(tmp_path):
    """The device-side record stays empty on finite losses (reads at steps 4, 8, 12 and at the
    saves pass), and the run ends normally."""
    out = tmp_path / "run"
    cfg = compose_train(TINY + QUICK + ["finite_check=logging_interval", "trainer.log_every_n_steps=4"])
    result = run(cfg, out)
    assert result["global_step"] == 12
    saved = _saved(out)
    assert 12 in saved and all(_all_finite(c) for c in saved.values())
