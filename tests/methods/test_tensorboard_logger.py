"""logger=tensorboard: the event files hold every step's metrics and the pictures; a resumed run
drops what the stopped run logged after its checkpoint. And wandb's logger.mode=auto."""
from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ssl_vit.build import wandb_mode
from ssl_vit.train import run
from training_helpers import TINY, compose_train

QUICK = ["logger=tensorboard", "eval.final_knn=false", "eval.knn_every_n_steps=0", "trainer.log_every_n_steps=1",
         "trainer.enable_progress_bar=false", "model.depth=1", "checkpoint_every_n_steps=2"]


def events(out):
    accumulator = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_events_hold_metrics_and_pictures_and_resume_without_duplicates(tmp_path):
    out = tmp_path / "run"
    run(compose_train(TINY + QUICK + ["trainer.max_steps=3"]), out)
    first = events(out)
    assert [e.step for e in first.Scalars("loss")] == [0, 1, 2]
    assert {"loss/dino", "loss/ibot", "loss/koleo", "schedule/lr", "collapse/teacher_entropy"} <= set(
        first.Tags()["scalars"])
    assert [e.step for e in first.Images("pictures/attention")] == [3]
    assert first.Images("pictures/pca")[0].width > 0


def test_a_resumed_run_drops_the_events_logged_after_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "last.ckpt"
    run(compose_train(TINY + QUICK + ["trainer.max_steps=2"]), out)
    step2 = ckpt.read_bytes()
    run(compose_train(TINY + QUICK + ["trainer.max_steps=4", "resume.schedule=extend"]), out)  # logs steps 2, 3
    # As if that run had died after step 3 with its last checkpoint at step 2:
    ckpt.write_bytes(step2)
    run(compose_train(TINY + QUICK + ["trainer.max_steps=4", "resume.schedule=extend"]), out)  # steps 2, 3 again
    steps = [e.step for e in events(out).Scalars("loss")]
    assert steps == [0, 1, 2, 3], steps


def test_wandb_mode_auto_is_online_only_with_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode("auto") == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode("auto") == "online"
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("offline") == "offline"
    with pytest.raises(ValueError, match="logger.mode='cloud'; allowed: auto, online, offline, disabled"):
        wandb_mode("cloud")
