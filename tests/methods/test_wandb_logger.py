"""logger=wandb, offline, with the real wandb package: the run folder it writes holds the run id
kept beside the checkpoints, the metrics of every step and the pictures; a resumed run continues
that id without logging a step twice."""
from __future__ import annotations

from pathlib import Path

import pytest

from training_helpers import TINY, compose_train
from wandb_records import history_rows, run_id
from ssl_vit.train import run

QUICK = ["logger=wandb", "logger.mode=offline", "eval.final_knn=false", "eval.knn_every_n_steps=0",
         "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "model.depth=1"]


def _run_files(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_offline_wandb_run_logs_every_step_and_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert run(compose_train(TINY + QUICK + ["trainer.max_steps=3"]), out)["global_step"] == 3
    kept_id = (out / "wandb_run_id.txt").read_text().strip()
    assert len(kept_id) == 8 and kept_id.isalnum() and kept_id.islower()
    (first,) = _run_files(out)
    assert run_id(first) == kept_id
    rows = history_rows(first)
    metric_rows = [r for r in rows if "loss" in r]
    assert [r["trainer/global_step"] for r in metric_rows] == [0, 1, 2]
    # The end-of-run pictures (the state after 3 steps): one row, both images, written as files.
    (pictures,) = [r for r in rows if "loss" not in r and any(k.startswith("pictures/") for k in r)]
    assert pictures["trainer/global_step"] == 3
    for key in ("pictures/attention", "pictures/pca"):
        (image,) = pictures[f"{key}/filenames"]  # wandb's image record, nested keys joined by "/"
        assert pictures[f"{key}/_type"] == "images/separated"
        assert (first.parent / "files" / image).is_file() and image.endswith(".png"), image
    for row in metric_rows:
        for key in ("loss", "loss/dino", "loss/ibot", "loss/koleo", "schedule/lr", "collapse/teacher_entropy"):
            assert isinstance(row[key], (int, float)), key
    assert rows[0]["schedule/lr"] == pytest.approx(0.0)  # the warm-up starts at 0

    # Resumed in the same folder: the same wandb run id, and only the new steps.
    resumed = compose_train(TINY + QUICK + ["trainer.max_steps=5", "resume.schedule=extend"])
    assert run(resumed, out)["global_step"] == 5
    files = _run_files(out)
    assert len(files) == 2 and all(run_id(f) == kept_id for f in files)
    second = next(f for f in files if f != first)
    resumed = history_rows(second)
    assert [r["trainer/global_step"] for r in resumed if "loss" in r] == [3, 4]
    assert [r["trainer/global_step"] for r in resumed if "loss" not in r] == [5]  # its own end pictures
