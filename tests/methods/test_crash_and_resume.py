"""A crashed or preempted run loses nothing: its training log continues when it is resumed, and
SIGTERM leaves a checkpoint and an exit code a scheduler reads as "stopped"."""
from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from training_helpers import TINY, compose_train
from ssl_vit.callbacks import LastCheckpoint
from ssl_vit.methods.dinov2 import DINOv2
from ssl_vit.train import run

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["eval.final_knn=false", "eval.knn_every_n_steps=0", "trainer.log_every_n_steps=1",
         "trainer.enable_progress_bar=false", "model.depth=1"]


def _logged_steps(out: Path) -> list[int]:
    with open(out / "logs" / "metrics.csv", newline="") as file:
        return [int(row["step"]) for row in csv.DictReader(file) if row.get("schedule/lr")]


def _rows(out: Path) -> dict[int, dict]:
    with open(out / "logs" / "metrics.csv", newline="") as file:
        return {int(row["step"]): row for row in csv.DictReader(file) if row.get("schedule/lr")}


def test_resumed_run_appends_to_its_training_log(tmp_path, monkeypatch):
    """Crash in step 5 with the last checkpoint at step 3: the log holds steps 0-4. The resumed
    run trains steps 3-5 again; the log then holds 0-5 once each, the first three untouched."""
    out = tmp_path / "run"
    cfg = compose_train(TINY + QUICK + ["trainer.max_steps=6", "checkpoint_every_n_steps=3"])
    original_step = DINOv2.training_step

    def crash_at_step_5(self, batch, batch_idx):
        if self.global_step == 5:
            raise RuntimeError("simulated crash")
        return original_step(self, batch, batch_idx)

    with monkeypatch.context() as patch:
        patch.setattr(DINOv2, "training_step", crash_at_step_5)
        patch.setattr(LastCheckpoint, "on_exception", lambda *args: None)  # a hard crash saves nothing
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(cfg, out)
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    assert _logged_steps(out) == [0, 1, 2, 3, 4]  # 3 and 4 came after the checkpoint
    before = _rows(out)

    assert run(cfg, out)["global_step"] == 6
    assert _logged_steps(out) == [0, 1, 2, 3, 4, 5]
    after = _rows(out)
    for step in (0, 1, 2):
        assert after[step] == before[step]


def _train_cmd(out: Path, max_steps: int) -> list[str]:
    return [sys.executable, "-m", "ssl_vit.train", f"hydra.run.dir={out}", *TINY, *QUICK,
            f"trainer.max_steps={max_steps}", "checkpoint_every_n_steps=1000"]


def test_sigterm_writes_a_checkpoint_and_exits_143_then_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_train_cmd(out, 10_000), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        metrics_file = out / "logs" / "metrics.csv"
        while not (metrics_file.exists() and len(_logged_steps(out)) >= 3):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "training did not log 3 steps in time"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, output[-3000:]
    found = re.findall(r"stopped by SIGTERM at step (\d+): wrote (\S+last\.ckpt); exiting with code 143", output)
    assert len(found) == 1, output[-3000:]
    step, path = int(found[0][0]), Path(found[0][1])
    assert path == out / "checkpoints" / "last.ckpt"
    assert torch.load(path, weights_only=False)["global_step"] == step >= 3

    # A longer run from there re-plans every schedule: refused until the choice is explicit.
    refused = subprocess.run(_train_cmd(out, step + 2), cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert f"total_steps 10000 -> {step + 2}" in refused.stderr and "resume.schedule=extend" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert torch.load(path, weights_only=False)["global_step"] == step  # nothing trained or written

    # Resumed from that step with the schedules re-planned (two steps further); every step logged once.
    done = subprocess.run(_train_cmd(out, step + 2) + ["resume.schedule=extend"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resuming from {path} at step {step}" in done.stdout
    steps = _logged_steps(out)
    assert steps == list(range(step + 2)), Counter(steps)


def test_restart_starts_new_schedules_from_the_checkpoint_weights(tmp_path):
    """resume.schedule=restart: the old checkpoints move aside, the new run counts from step 0
    with a fresh warm-up, and its student starts from the checkpoint's weights."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.run(_train_cmd(out, 4) + ["optim.warmup_epochs=0"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    trained = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]

    again = subprocess.run(_train_cmd(out, 3) + ["resume.schedule=restart", "optim.warmup_epochs=0",
                                                 "optim.lr=1e-20", "optim.min_lr=0"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resume.schedule=restart: new schedules from step 0" in again.stdout + again.stderr
    aside = out / "checkpoints-before-restart-4"
    assert torch.load(aside / "last.ckpt", weights_only=False)["global_step"] == 4  # kept, not overwritten
    restarted = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert restarted["global_step"] == 3
    # With lr 1e-20 the student barely moves: it still holds the weights the restart loaded.
    student = [name for name in trained if name.startswith("student.")]
    assert student and all(torch.allclose(trained[n], restarted["state_dict"][n], rtol=0, atol=1e-12)
                           for n in student)
