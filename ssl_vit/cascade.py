"""python -m ssl_vit.cascade experiment=CASCADE [hydra.run.dir=DIR]: a chain of training runs.

A cascade is a list of stages in an ``experiment=`` file (``cascade.stages``: a ``name`` and the
``overrides`` of an ordinary ``python -m ssl_vit.train`` run each; ``cascade.common``: overrides
for every stage). Stage i trains in ``DIR/<name>``; a ``method=distill`` stage after the first is
taught by the final model of the stage before it (``method.teacher.checkpoint`` is set to that
stage's ``checkpoints/last.ckpt`` unless the stage names a teacher itself). The first stage may be
any run, e.g. ``method=dinov2`` training the large teacher.

Started again with the same DIR, the command skips the finished stages (checkpoint at its planned
step count and final metrics written) and resumes the unfinished one from its checkpoint. Each
stage is one ordinary training run in a process of its own, so a scheduler can run them as
dependent jobs instead: ``cascade.dry_run=true`` prints each stage's command, one per line.
Every stage's configuration is composed before the first one starts, so a typo in a later
stage fails at once. Ends with DIR/cascade.json: each stage's folder, state and k-NN figures.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig

from ssl_vit.cli import exit_2_on, run_app

TEACHER_KEY = "method.teacher.checkpoint"


def stages_of(cfg: DictConfig) -> list[dict[str, Any]]:
    """The stages as plain dicts ``{"name", "overrides"}``, checked; errors name the key."""
    stages = cfg.get("cascade", {}).get("stages")
    if not isinstance(stages, ListConfig) or len(stages) == 0:
        raise ValueError("cascade.stages is empty: choose a cascade recipe (e.g. experiment=cascade_cpu) or give "
                         "a list of {name: ..., overrides: [...]} stages")
    out, names = [], set()
    for i, stage in enumerate(stages):
        if not isinstance(stage, DictConfig) or not isinstance(stage.get("name"), str) or not stage.name:
            raise ValueError(f"cascade.stages[{i}] needs a name (the stage's folder) and overrides, got {stage!r}")
        if stage.name in names or "/" in stage.name:
            raise ValueError(f"cascade.stages[{i}].name={stage.name!r}: names must be unique folder names")
        names.add(stage.name)
        overrides = stage.get("overrides") or []
        if not all(isinstance(o, str) for o in overrides):
            raise ValueError(f"cascade.stages[{i}].overrides must be a list of key=value strings, got {overrides!r}")
        out.append({"name": stage.name, "overrides": list(overrides)})
    return out


def stage_commands(cfg: DictConfig, run_dir: Path) -> list[dict[str, Any]]:
    """Each stage's folder, training overrides and method, its teacher linked to the stage before."""
    common = [str(o) for o in cfg.cascade.get("common") or []]
    planned, previous = [], None
    for stage in stages_of(cfg):
        stage_dir = run_dir / stage["name"]
        overrides = common + stage["overrides"]
        try:  # a typo in any stage fails here, before the first stage starts
            method = compose(config_name="train", overrides=overrides).method.name
        except Exception as err:  # Hydra's own composition errors name the bad key or group
            raise ValueError(f"cascade stage {stage['name']!r}: {err}") from None
        if method == "distill" and previous is not None and not any(o.startswith(TEACHER_KEY + "=")
                                                                    for o in overrides):
            overrides.append(f"{TEACHER_KEY}={previous / 'checkpoints' / 'last.ckpt'}")
        planned.append({"name": stage["name"], "dir": stage_dir, "method": method,
                        "overrides": overrides + [f"hydra.run.dir={stage_dir}"]})
        previous = stage_dir
    return planned


def stage_state(stage_dir: Path) -> str:
    """``finished`` (checkpoint at its planned steps and final metrics written), ``started``
    (a checkpoint short of them, or no metrics yet) or ``new``."""
    ckpt = stage_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        return "new"
    import torch

    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # unreadable: the stage's own run says what is wrong with it
        return "started"
    planned = (checkpoint.get("ssl_vit") or {}).get("planned_steps")
    done = planned is not None and checkpoint.get("global_step", -1) >= planned
    return "finished" if done and (stage_dir / "metrics.json").is_file() else "started"


def train_command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "ssl_vit.train", *overrides]


def run(cfg: DictConfig, run_dir: Path) -> list[dict[str, Any]]:
    stages = stage_commands(cfg, run_dir)
    if cfg.cascade.get("dry_run"):
        for stage in stages:
            print(shlex.join(train_command(stage["overrides"])))
        return []
    report = []
    for i, stage in enumerate(stages, start=1):
        state = stage_state(stage["dir"])
        label = f"stage {i}/{len(stages)} {stage['name']} ({stage['method']})"
        if state == "finished":
            print(f"{label}: finished earlier in {stage['dir']}; skipped", flush=True)
        else:
            print(f"{label}: {'resuming' if state == 'started' else 'training'} in {stage['dir']}", flush=True)
            code = subprocess.run(train_command(stage["overrides"])).returncode
            if code:
                print(f"{label} stopped with exit code {code}; run the same command again to resume it "
                      "(finished stages are skipped)", file=sys.stderr, flush=True)
                sys.exit(code)
        metrics_file = stage["dir"] / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        report.append({"name": stage["name"], "method": stage["method"], "dir": str(stage["dir"]),
                       "state": "skipped" if state == "finished" else "trained",
                       "knn_top1": metrics.get("knn_top1"), "knn_top1_random_init": metrics.get("knn_top1_random_init"),
                       "checkpoint": str(stage["dir"] / "checkpoints" / "last.ckpt")})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "cascade.json").write_text(json.dumps(report, indent=2))
    for row in report:
        knn = f"knn_top1={row['knn_top1']:.4f}" if row["knn_top1"] is not None else "no k-NN"
        print(f"{row['name']:>12} ({row['method']}): {knn}  {row['checkpoint']}")
    return report


@hydra.main(version_base=None, config_path="../conf", config_name="cascade")
@exit_2_on(ValueError)
def main(cfg: DictConfig) -> None:
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    run_app(main)
