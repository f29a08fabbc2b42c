"""Launching without a scheduler's help: the default run folder every process and a requeued job
agree on (ssl_vit/cluster.py), the requeue signal outside SLURM, torchrun, and ``-m`` with a
strategy that re-runs the command line. The SLURM runs themselves: tests/slurm/."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.plugins.environments import SLURMEnvironment

from ssl_vit.callbacks.requeue import RequeueOnSignal, requeue_signals
from ssl_vit.cluster import default_run_dir, slurm_job_id

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
TINY = ["data=synthetic", "data.options.num_samples=128", "data.val_size=64", "data.batch_size=8",
        "data.num_workers=0", "model.depth=1", "method.crops.n_local=2", "method.head.out_dim=64",
        "method.head.hidden_dim=64", "method.head.bottleneck_dim=16", "trainer.precision=32",
        "trainer.accelerator=cpu", "eval.final_knn=false", "eval.knn_every_n_steps=0", "eval.pictures.every_n_steps=0",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
NOW = datetime(2026, 12, 6, 9, 5, 7)
SLURM_TASK = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "ssl_vit", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
              "SLURM_NNODES": "1", "SLURM_NODELIST": "localhost", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
              "SLURM_NODEID": "0"}


@pytest.mark.parametrize("env, expected", [
    ({}, "outputs/2026-12-06/09-05-07"),
    ({"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "ssl_vit"}, "outputs/slurm/4242"),
    ({"SLURM_JOB_ID": "4243", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "1"}, "outputs/slurm/4242_1"),
    ({"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "interactive"}, "outputs/2026-12-06/09-05-07"),  # salloc by hand
    ({"TORCHELASTIC_RUN_ID": "3f1c-uuid"}, "outputs/torchrun/3f1c-uuid"),
    ({"TORCHELASTIC_RUN_ID": "3f1c-uuid", "SLURM_JOB_ID": "4242"}, "outputs/slurm/4242"),  # srun torchrun
], ids=["plain", "slurm", "slurm-array", "slurm-interactive", "torchrun", "torchrun-in-slurm"])
def test_default_run_dir(env, expected):
    assert default_run_dir("outputs", env=env, now=NOW) == expected


def test_torchrun_static_rendezvous_has_no_run_id():
    with pytest.raises(ValueError, match="--rdzv-id=NAME .* hydra.run.dir=DIR"):
        default_run_dir("outputs", env={"TORCHELASTIC_RUN_ID": "none"})
    result = subprocess.run([sys.executable, "-m", "ssl_vit.train", "trainer.max_steps=1"], cwd=ROOT,
                            env={**ENV, "TORCHELASTIC_RUN_ID": "none"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.startswith("error: torchrun with a static rendezvous"), result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) <= 25


def test_run_and_sweep_folders_of_the_config_follow_the_job(monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_JOB_NAME", "ssl_vit")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        train = compose(config_name="train", return_hydra_config=True)
        cascade = compose(config_name="cascade", return_hydra_config=True)
    assert train.hydra.run.dir == "outputs/slurm/77" and train.hydra.sweep.dir == "multirun/slurm/77"
    assert cascade.hydra.run.dir == "outputs/cascade/slurm/77"
    assert slurm_job_id() == "77"


def test_under_slurm_lightning_takes_the_ranks_without_its_own_requeue(monkeypatch, tmp_path):
    from ssl_vit.build import build_datamodule, build_trainer

    for key, value in SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="train", overrides=TINY)
    trainer = build_trainer(cfg, tmp_path, build_datamodule(cfg))
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False
    assert any(isinstance(cb, RequeueOnSignal) for cb in trainer.callbacks)


def test_submitit_jobs_also_requeue_on_submitit_signal(monkeypatch):
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert requeue_signals() == (signal.SIGUSR1,)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert requeue_signals() == (signal.SIGUSR1, signal.SIGUSR2)


def test_the_sbatch_scripts_share_their_body():
    """train_1node.sbatch and train_multinode.sbatch differ only in their #SBATCH header."""
    marker = "# --- the same below this line"
    bodies = {p.name: p.read_text().split(marker)[1] for p in (ROOT / "launch" / "slurm").glob("*.sbatch")}
    assert sorted(bodies) == ["train_1node.sbatch", "train_multinode.sbatch"] and len(set(bodies.values())) == 1


@pytest.mark.slow
def test_multirun_with_a_strategy_that_reruns_the_command_is_refused(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ssl_vit.train", "-m", "trainer=ddp", "trainer.devices=2",
                             "seed=0,1", *TINY, f"hydra.sweep.dir={tmp_path}/sweep"], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "error: -m (a Hydra sweep) with trainer.strategy=ddp and 2 processes" in result.stderr
    assert "hydra/launcher=slurm" in result.stderr
    assert "Traceback" not in output and len(output.strip().splitlines()) <= 25, output
    assert not list((tmp_path / "sweep").glob("*/checkpoints"))


@pytest.mark.slow
def test_a_local_sweep_runs_each_point_in_its_own_folder(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ssl_vit.train", "-m", "seed=0,1", *TINY, "trainer.max_steps=2"],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    points = sorted(tmp_path.glob("multirun/*/*/*/metrics.json"))  # multirun/DATE/TIME/N
    assert [p.parent.name for p in points] == ["0", "1"] and points[0].parent.parent == points[1].parent.parent


def _logged_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "logs" / "metrics.csv", newline="") as file:
        return [int(row["step"]) for row in csv.DictReader(file) if row.get("schedule/lr")]


@pytest.mark.slow
def test_usr1_outside_slurm_checkpoints_after_the_step_and_stops(tmp_path):
    """The requeue signal of a run that is not a SLURM job: last.ckpt after the current step, the
    step logged, exit 128 + SIGUSR1; the same command resumes and logs every step once."""
    out = tmp_path / "run"
    env = {k: v for k, v in ENV.items() if not k.startswith("SLURM_")}
    cmd = [sys.executable, "-m", "ssl_vit.train", f"hydra.run.dir={out}", *TINY, "checkpoint_every_n_steps=2",
           "trainer.max_steps=60"]  # signalled after step 2: far from the end
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "last.ckpt").exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGUSR1, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("stopped by SIGUSR1 at step ")]
    assert len(lines) == 1 and "not a SLURM batch job, nothing to requeue" in lines[0], output[-3000:]
    step = int(lines[0].split()[5].rstrip(":"))
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step
    assert 2 <= step < 60 and _logged_steps(out) == list(range(step))  # the step saved was logged before the stop

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # the same command
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _logged_steps(out) == list(range(60))


@pytest.mark.slow
def test_torchrun_processes_share_the_default_run_folder(tmp_path):
    """torchrun (one node, 2 processes, no hydra.run.dir): one folder, outputs/torchrun/<rendezvous id>."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "ssl_vit.train",
           "trainer=ddp", "trainer.devices=2", *TINY, "trainer.max_steps=3"]
    done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "torchrun").iterdir())
    assert len(runs) == 1 and not (tmp_path / "outputs" / datetime.now().strftime("%Y-%m-%d")).exists(), runs
    assert torch.load(runs[0] / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    assert (runs[0] / "metrics.json").is_file()
    assert "global_batch_size: 16" in (runs[0] / "logs" / "hparams.yaml").read_text()  # 8 a process x 2


def test_ci_runs_the_readmes_test_command_with_the_slurm_group():
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command == "SSL_VIT_SLURM_TESTS=1 make test"
    assert f"\n{command}    # what CI runs (bash .ci/run)" in (ROOT / "README.md").read_text()
    assert command in (ROOT / "launch" / "README.md").read_text()
