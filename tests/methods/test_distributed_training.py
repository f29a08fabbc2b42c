"""A real two-process DDP run on the CPU (gloo) through the training entry point, and the check
that the launcher's process count agrees with the config."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import yaml

from training_helpers import compose_train
from ssl_vit.build import resolved_world_size

ROOT = Path(__file__).resolve().parents[2]
N_TRAIN, BATCH, PROCESSES, BASE_LR, MIN_LR = 128, 8, 2, 0.001, 1e-6  # the CPU recipe's DINOv2 lr


def _cosine(base: float, final: float, total: int, step: int) -> float:
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * step / total))


def test_two_process_run_uses_the_global_batch_and_per_process_epochs(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "ssl_vit.train", f"hydra.run.dir={out}",
        "trainer=ddp", "trainer.accelerator=cpu", f"trainer.devices={PROCESSES}",
        "data=synthetic", f"data.options.num_samples={N_TRAIN}", "data.val_size=64", f"data.batch_size={BATCH}",
        "data.num_workers=0", "model.depth=1", "method.crops.n_local=2", "method.head.out_dim=64",
        "method.head.hidden_dim=64", "method.head.bottleneck_dim=16", "trainer.precision=32",
        "trainer.max_steps=-1", "trainer.max_epochs=1", "optim.warmup_epochs=0", "trainer.log_every_n_steps=1",
        "eval.final_knn=false", "eval.knn_every_n_steps=0", "trainer.enable_progress_bar=false",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # One epoch: each process gets ceil(128 / 2) = 64 images, 8 batches of 8 (one process: 16).
    per_process_steps = math.ceil(N_TRAIN / PROCESSES) // BATCH
    assert json.loads((out / "metrics.json").read_text())["global_step"] == per_process_steps
    hparams = yaml.safe_load((out / "logs" / "hparams.yaml").read_text())
    assert hparams["steps_per_epoch"] == per_process_steps and hparams["total_steps"] == per_process_steps
    assert hparams["global_batch_size"] == BATCH * PROCESSES
    assert (out / "train_ddp_process_1.log").exists()  # the second rank ran

    # The logged lr is DINOv2's sqrt rule at the global batch of 16, along the cosine.
    base = BASE_LR * math.sqrt(BATCH * PROCESSES / 1024)
    rows = [r for r in csv.DictReader(open(out / "logs" / "metrics.csv")) if r.get("schedule/lr")]
    assert [int(r["step"]) for r in rows] == list(range(per_process_steps))
    for row in rows:
        expected = _cosine(base, MIN_LR, per_process_steps, int(row["step"]))
        assert float(row["schedule/lr"]) == pytest.approx(expected, rel=1e-6)
    one_process_base = BASE_LR * math.sqrt(BATCH / 1024)
    assert float(rows[0]["schedule/lr"]) != pytest.approx(one_process_base, rel=1e-3)


def test_a_launcher_that_disagrees_with_the_config_is_refused(monkeypatch):
    cfg = compose_train(["trainer.devices=1"])
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert resolved_world_size(cfg, trainer) == 1
    monkeypatch.setenv("WORLD_SIZE", "4")  # e.g. torchrun --nproc-per-node 4 with trainer.devices=1
    with pytest.raises(ValueError, match="trainer.devices=1 x trainer.num_nodes=1 asks for 1 processes.*started 4"):
        resolved_world_size(cfg, trainer)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="trainer.devices=2"):
        resolved_world_size(compose_train(["trainer.devices=2"]), trainer)
