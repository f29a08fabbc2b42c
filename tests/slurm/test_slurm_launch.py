"""The launch/ scripts on a real SLURM (a one-node cluster on localhost, tests/slurm/conftest.py):
a 2-task DDP run through the project's sbatch script, a run requeued mid-training, a sweep
through the submitit launcher preset and a cascade as dependent jobs. CPU, tiny model, at most
30 steps each; opt-in with SSL_VIT_SLURM_TESTS=1."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from local_cluster import SKIP_REASON, SLURM_TESTS

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.skipif(not SLURM_TESTS, reason=SKIP_REASON)]

ROOT = Path(__file__).resolve().parents[2]
SLURM_DIR = ROOT / "launch" / "slurm"
JOB_ENV = {"PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# Every job: the CPU, one core per task, no GPU (the scripts ask for GPUs by default).
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1"]
TINY = [
    "trainer.accelerator=cpu", "trainer.precision=32", "data=synthetic", "data.val_size=64", "data.batch_size=8",
    "data.num_workers=0", "model.depth=1", "method.crops.n_local=2", "method.head.out_dim=64",
    "method.head.hidden_dim=64", "method.head.bottleneck_dim=16", "eval.knn_every_n_steps=0",
    "eval.pictures.every_n_steps=0", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
]
STEPS, TASKS = 30, 2
# The DDP run of (a), and the requeued twin of (b): 256 images, 16 a step over 2 tasks (16 steps an epoch).
DDP_RUN = TINY + ["data.options.num_samples=256", f"trainer.max_steps={STEPS}", "checkpoint_every_n_steps=3",
                  "eval.final_knn=true", "eval.final_knn_max_train=256"]
JOB_TIMEOUT_S = 300


def submit_train(cluster, cwd: Path, overrides: list[str], tasks: int = TASKS) -> str:
    return cluster.sbatch(*CPU_JOB, f"--ntasks-per-node={tasks}", f"--output={cwd}/%x-%j.out",
                          str(SLURM_DIR / "train_1node.sbatch"), *overrides, cwd=cwd, env=JOB_ENV)


def logged_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "logs" / "metrics.csv", newline="") as file:
        return [int(row["step"]) for row in csv.DictReader(file) if row.get("schedule/lr")]


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def assert_completed(record: dict, log: Path) -> None:
    assert record.get("JobState") == "COMPLETED" and record.get("ExitCode") == "0:0", \
        f"{record}\n{log.read_text(errors='replace')[-4000:] if log.exists() else 'no log'}"


@pytest.fixture(scope="module")
def ddp_run(slurm_cluster, tmp_path_factory):
    """(a): the project's 1-node script with 2 tasks on the CPU, uninterrupted."""
    cwd = tmp_path_factory.mktemp("ddp")
    start = time.monotonic()
    job = submit_train(slurm_cluster, cwd, DDP_RUN)
    record = slurm_cluster.wait(job, JOB_TIMEOUT_S)
    print(f"\n(a) 2-task job {job}: {time.monotonic() - start:.0f} s")
    return {"job": job, "cwd": cwd, "record": record, "log": cwd / f"ssl_vit-{job}.out",
            "dir": cwd / "outputs" / "slurm" / job}


def test_two_task_sbatch_run_writes_checkpoint_and_metrics_in_the_job_folder(ddp_run):
    assert_completed(ddp_run["record"], ddp_run["log"])
    run_dir, log = ddp_run["dir"], ddp_run["log"].read_text()
    assert [p.name for p in (ddp_run["cwd"] / "outputs" / "slurm").iterdir()] == [ddp_run["job"]]  # one folder
    # Both tasks joined one process group: Lightning took the ranks from SLURM.
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-3000:]
    assert "trainer=ddp trainer.devices=2 trainer.num_nodes=1" in log  # what the script derived
    assert checkpoint(run_dir)["global_step"] == STEPS
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == STEPS and 0.0 <= metrics["knn_top1"] <= 1.0
    assert logged_steps(run_dir) == list(range(STEPS))
    assert "global_batch_size: 16" in (run_dir / "logs" / "hparams.yaml").read_text()  # 8 a task x 2 tasks


@pytest.fixture(scope="module")
def requeued_run(slurm_cluster, tmp_path_factory):
    """(b): the same run, sent USR1 (what --signal=USR1@120 sends) once its first checkpoint exists."""
    cwd = tmp_path_factory.mktemp("requeue")
    start = time.monotonic()
    job = submit_train(slurm_cluster, cwd, DDP_RUN)
    run_dir, log = cwd / "outputs" / "slurm" / job, cwd / f"ssl_vit-{job}.out"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (run_dir / "checkpoints" / "last.ckpt").exists():  # step 3 of 30
        state = slurm_cluster.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING"), f"job {job} {state} before its first checkpoint:\n{log.read_text()}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.1)
    signalled = subprocess.run(["scancel", "--signal=USR1", job], env=slurm_cluster.env, capture_output=True,
                               text=True)
    assert signalled.returncode == 0, signalled.stderr
    record = slurm_cluster.wait(job, JOB_TIMEOUT_S)
    print(f"\n(b) requeued job {job}: {time.monotonic() - start:.0f} s")
    return {"job": job, "record": record, "log": log, "dir": run_dir}


def test_a_signalled_job_checkpoints_requeues_and_resumes_to_the_end(requeued_run):
    assert_completed(requeued_run["record"], requeued_run["log"])
    assert requeued_run["record"]["Restarts"] == "1"
    job, run_dir, log = requeued_run["job"], requeued_run["dir"], requeued_run["log"].read_text()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    stops = re.findall(rf"^stopped by SIGUSR1 at step (\d+): wrote (\S+); requeued SLURM job {job}, which resumes",
                       log, flags=re.M)
    assert len(stops) == 1, log[-4000:]
    step = int(stops[0][0])
    assert Path(stops[0][1]) == ckpt and 3 <= step < STEPS
    # The requeued job ran the same command in the same folder and resumed from that checkpoint.
    assert f"job {job} (start 2)" in log
    assert f"Restored all states from the checkpoint at {ckpt}" in log
    assert "Traceback" not in log, log[-4000:]  # the first job wound down quietly
    assert checkpoint(run_dir)["global_step"] == STEPS
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == STEPS
    assert logged_steps(run_dir) == list(range(STEPS))  # one log, every step once


def test_the_requeued_run_ends_with_the_weights_of_the_uninterrupted_one(ddp_run, requeued_run):
    assert_completed(requeued_run["record"], requeued_run["log"])
    reference, resumed = checkpoint(ddp_run["dir"])["state_dict"], checkpoint(requeued_run["dir"])["state_dict"]
    assert reference.keys() == resumed.keys()
    different = [key for key in reference if not torch.equal(reference[key], resumed[key])]
    assert not different, f"{len(different)} of {len(reference)} tensors differ, e.g. {different[:3]}"


def test_a_sweep_through_the_submitit_preset_runs_one_job_per_point(slurm_cluster, tmp_path):
    """(c): 2 points, each a job of 2 DDP tasks; point 0 gets submitit's warning signal (USR2)
    after its first checkpoint and is requeued, resuming in its folder."""
    start = time.monotonic()
    cmd = [sys.executable, "-m", "ssl_vit.train", "-m", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null",
           "hydra.launcher.cpus_per_task=1", f"hydra.launcher.tasks_per_node={TASKS}", "trainer=ddp",
           f"trainer.devices={TASKS}", "seed=0,1", *TINY, "data.options.num_samples=128", f"trainer.max_steps={STEPS}",
           "checkpoint_every_n_steps=3", "eval.final_knn=false"]
    sweep = subprocess.Popen(cmd, cwd=tmp_path, env={**slurm_cluster.env, **JOB_ENV}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not list(tmp_path.glob("multirun/*/*/0/checkpoints/last.ckpt")):
            assert sweep.poll() is None, sweep.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint of point 0 in time"
            time.sleep(0.1)
        first = next(p.name for p in tmp_path.glob("multirun/*/*/.submitit/*_0"))
        signalled = subprocess.run(["scancel", "--signal=USR2", first], env=slurm_cluster.env, capture_output=True,
                                   text=True)
        assert signalled.returncode == 0, signalled.stderr
        output, _ = sweep.communicate(timeout=2 * JOB_TIMEOUT_S)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    print(f"\n(c) 2-point sweep, one point requeued: {time.monotonic() - start:.0f} s")
    assert sweep.returncode == 0, output[-4000:]
    sweeps = list((tmp_path / "multirun").glob("*/*"))  # multirun/DATE/TIME, resolved once for every job
    assert len(sweeps) == 1, sweeps
    sweep_dir = sweeps[0]
    tasks = sorted(p.name for p in (sweep_dir / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(tasks) == 2 and tasks[0].split("_")[0] == tasks[1].split("_")[0], tasks  # one array, two jobs
    weights = []
    for point, task in enumerate(tasks):
        record = slurm_cluster.wait(task, 60)  # the launcher returns on the results; the job may be ending
        assert record.get("JobState") == "COMPLETED" and record.get("ArrayTaskId") == str(point), record
        assert record.get("Restarts") == ("1" if point == 0 else "0"), record
        run_dir = sweep_dir / str(point)
        assert f"seed={point}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
        assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == STEPS
        assert "global_batch_size: 16" in (run_dir / "logs" / "hparams.yaml").read_text()  # 2 tasks of 8
        assert logged_steps(run_dir) == list(range(STEPS))
        weights.append(checkpoint(run_dir)["state_dict"])
    job_logs = "".join(p.read_text(errors="replace") for p in (sweep_dir / ".submitit" / tasks[0]).glob("*_log.*"))
    assert re.search(r"^stopped by SIGUSR2 at step \d+: wrote \S+; requeued SLURM job", job_logs, flags=re.M), job_logs
    assert "Restored all states from the checkpoint" in job_logs
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # two different points


def test_a_cascade_runs_its_stages_as_dependent_jobs_in_order(slurm_cluster, tmp_path):
    start = time.monotonic()
    method_keys = [o for o in TINY if o.startswith("method.")]  # the distillation student takes the teacher's heads
    stages = ("cascade.stages=[{name:large,overrides:[" + ",".join(f'"{o}"' for o in ["method=dinov2", *method_keys])
              + ']},{name:small,overrides:["method=distill","model.embed_dim=32","model.num_heads=2"]}]')
    common = "cascade.common=[" + ",".join(f'"{o}"' for o in [o for o in TINY if o not in method_keys] + [
        "data.options.num_samples=128", "trainer.max_steps=5", "eval.final_knn=false"]) + "]"
    out = tmp_path / "cascade"
    cmd = ["bash", str(SLURM_DIR / "cascade.sh"), *CPU_JOB, "--ntasks-per-node=1", f"--output={tmp_path}/%x-%j.out",
           "--", "experiment=cascade_cpu", stages, common, f"hydra.run.dir={out}"]
    done = subprocess.run(cmd, cwd=tmp_path, env={**slurm_cluster.env, **JOB_ENV}, capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = dict(re.findall(r"^stage (\w+): job (\d+)", done.stdout, flags=re.M))
    report = re.search(r"^report: job (\d+)", done.stdout, flags=re.M).group(1)
    assert list(jobs) == ["large", "small"], done.stdout
    # The second stage waits for the first, the report for the second.
    assert f"afterok:{jobs['large']}" in slurm_cluster.job(jobs["small"])["Dependency"]
    assert f"afterok:{jobs['small']}" in slurm_cluster.job(report)["Dependency"]

    records = {name: slurm_cluster.wait(job, JOB_TIMEOUT_S) for name, job in [*jobs.items(), ("report", report)]}
    print(f"\n(d) 2-stage cascade: {time.monotonic() - start:.0f} s")
    for name, record in records.items():
        assert_completed(record, tmp_path / f"cascade-{name}-{record['JobId']}.out")
    assert records["large"]["EndTime"] <= records["small"]["StartTime"]  # ISO times: in order
    assert records["small"]["EndTime"] <= records["report"]["StartTime"]
    small_config = (out / "small" / ".hydra" / "config.yaml").read_text()
    assert str(out / "large" / "checkpoints" / "last.ckpt") in small_config  # taught by the first stage
    for name in ("large", "small"):
        assert checkpoint(out / name)["global_step"] == 5
    summary = json.loads((out / "cascade.json").read_text())
    assert [(s["name"], s["method"], s["state"]) for s in summary] == [
        ("large", "dinov2", "skipped"), ("small", "distill", "skipped")]  # the stage jobs had finished them

