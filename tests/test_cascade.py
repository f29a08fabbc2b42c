"""python -m ssl_vit.cascade: stages chained teacher -> student, finished stages skipped, the
unfinished one resumed, typos caught before the first stage starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import ssl_vit

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["data=synthetic", "data.options.num_samples=128", "data.val_size=64", "data.batch_size=16",
          "data.num_workers=0", "trainer.precision=32", "eval.final_knn=false", "eval.knn_every_n_steps=0",
          "trainer.enable_progress_bar=false", "checkpoint_every_n_steps=2"]


def write_cascade(folder: Path, name: str, student_extra: list[str], student_steps: int = 30,
                  student_model: str = "model.embed_dim") -> None:
    """An experiment file: a tiny DINOv2 teacher (4 steps), then a narrower distilled student."""
    stages = [
        {"name": "teacher", "overrides": ["method=dinov2", "model.depth=2", "trainer.max_steps=4"]},
        {"name": "student", "overrides": ["method=distill", f"{student_model}=96", "model.depth=1",
                                          f"trainer.max_steps={student_steps}", *student_extra]},
    ]
    text = "# @package _global_\ncascade:\n  common: " + json.dumps(COMMON) + "\n  stages:\n"
    for stage in stages:
        text += f"    - name: {stage['name']}\n      overrides: {json.dumps(stage['overrides'])}\n"
    (folder / "experiment").mkdir(parents=True, exist_ok=True)
    (folder / "experiment" / f"{name}.yaml").write_text(text)


def cascade(conf: Path, experiment: str, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ssl_vit.cascade", f"experiment={experiment}", f"hydra.run.dir={run_dir}",
           f"hydra.searchpath=[file://{conf}]", *extra]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=600)


def test_cascade_chains_stages_skips_finished_ones_and_resumes_the_unfinished(tmp_path):
    conf, run_dir = tmp_path / "conf", tmp_path / "run"
    # The first attempt is cut short in the student stage (a 1-second safety cut-off), as a crash would be.
    write_cascade(conf, "cut", ["trainer.max_time=00:00:00:01"])
    write_cascade(conf, "whole", [])
    first = cascade(conf, "cut", run_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    teacher_ckpt = run_dir / "teacher" / "checkpoints" / "last.ckpt"
    student_ckpt = run_dir / "student" / "checkpoints" / "last.ckpt"
    assert torch.load(teacher_ckpt, weights_only=False)["global_step"] == 4
    cut_at = torch.load(student_ckpt, weights_only=False)["global_step"]
    assert 0 < cut_at < 30, cut_at
    teacher_written = teacher_ckpt.stat().st_mtime_ns

    second = cascade(conf, "whole", run_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "stage 1/2 teacher (dinov2): finished earlier" in second.stdout
    assert "stage 2/2 student (distill): resuming" in second.stdout
    assert teacher_ckpt.stat().st_mtime_ns == teacher_written  # not trained again
    student = torch.load(student_ckpt, weights_only=False)
    assert student["global_step"] == 30 and student["ssl_vit"]["planned_steps"] == 30
    assert student["ssl_vit"]["teacher"]["checkpoint"] == str(teacher_ckpt)  # the stage before taught it
    assert ssl_vit.load_backbone(student_ckpt).embed_dim == 96
    report = json.loads((run_dir / "cascade.json").read_text())
    assert [(r["name"], r["method"], r["state"]) for r in report] == [
        ("teacher", "dinov2", "skipped"), ("student", "distill", "trained")]

    third = cascade(conf, "whole", run_dir)
    assert third.returncode == 0 and third.stdout.count("finished earlier") == 2, third.stdout
    assert student_ckpt.stat().st_mtime_ns == (run_dir / "student" / "checkpoints" / "last.ckpt").stat().st_mtime_ns

    commands = cascade(conf, "whole", run_dir, "cascade.dry_run=true").stdout.strip().splitlines()
    assert len(commands) == 2 and f"method.teacher.checkpoint={teacher_ckpt}" in commands[1]
    assert commands[1].endswith(f"hydra.run.dir={run_dir / 'student'}")


def test_a_typo_in_a_later_stage_fails_before_the_first_stage_trains(tmp_path):
    conf, run_dir = tmp_path / "conf", tmp_path / "run"
    write_cascade(conf, "typo", [], student_model="model.embed_dimm")
    result = cascade(conf, "typo", run_dir)
    assert result.returncode == 2
    assert "cascade stage 'student'" in result.stderr and "embed_dimm" in result.stderr
    assert not (run_dir / "teacher").exists()


def test_train_refuses_a_cascade_recipe_and_names_the_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ssl_vit.train", "experiment=cascade_cpu",
                             f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode != 0
    assert "start it with python -m ssl_vit.cascade experiment=cascade_cpu" in result.stderr
