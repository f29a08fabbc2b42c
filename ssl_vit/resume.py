"""Which checkpoint a run continues from, and what happens when the run's plan has changed.

A run resumes from ``ckpt_path=`` or, by default, from the newest complete checkpoint in
DIR/checkpoints/ (:mod:`ssl_vit.checkpoints`). Every schedule (lr, weight decay, EMA momentum,
teacher temperature, warm-ups) is laid over the planned run length, so resuming with a different
plan (a larger ``trainer.max_steps``, another global batch or epoch length) would silently
re-plan them: the lr of a finished cosine run jumps from its floor back up. ``resume.schedule``
makes that an explicit choice:

- ``error`` (default): refuse, naming the old and new plan and the choices;
- ``extend``: continue from the checkpoint's step with the schedules laid over the new plan
  (optimizer state, EMA and data order kept);
- ``restart``: start new schedules from step 0 with the checkpoint's weights (student, EMA copy,
  heads, centers); the optimizer state and step count start afresh, and the run folder's old
  checkpoints move to ``checkpoints-before-restart-STEP/``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from ssl_vit.checkpoints import newest_complete_checkpoint

log = logging.getLogger("ssl_vit.resume")
PLAN_KEYS = ("total_steps", "global_batch_size", "steps_per_epoch")


@dataclass(frozen=True)
class ResumeChoice:
    ckpt_path: str | None = None  # continue this checkpoint (Trainer.fit's ckpt_path)
    weights_from: str | None = None  # only load the weights of this checkpoint (resume.schedule=restart)
    step: int = 0  # the checkpoint's optimizer step


def default_checkpoint(cfg: DictConfig, out_dir: Path) -> str | None:
    """``ckpt_path`` when given, else the run folder's newest complete checkpoint (or None)."""
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)
    found = newest_complete_checkpoint(out_dir / "checkpoints")
    return None if found is None else str(found)


def saved_plan(path: str) -> dict:
    """The plan a checkpoint was trained with, and the step it reached."""
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    hparams = checkpoint.get("hyper_parameters") or {}
    plan = {key: hparams.get(key) for key in PLAN_KEYS}
    plan["global_step"] = int(checkpoint.get("global_step", 0))
    return plan


def choose_resume(cfg: DictConfig, out_dir: Path, plan) -> ResumeChoice:
    """What this run starts from, given its plan (:class:`ssl_vit.build.RunPlan`); raises
    ``ValueError`` for a changed plan under ``resume.schedule=error``."""
    path = default_checkpoint(cfg, out_dir)
    if path is None:
        return ResumeChoice()
    saved = saved_plan(path)
    changed = {key: (saved[key], getattr(plan, key)) for key in PLAN_KEYS
               if saved[key] is not None and saved[key] != getattr(plan, key)}
    if not changed:
        return ResumeChoice(ckpt_path=path, step=saved["global_step"])
    mode = cfg.get("resume", {}).get("schedule", "error")
    what = "; ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
    if mode == "error":
        raise ValueError(
            f"{path} (step {saved['global_step']}) was planned with other settings than this run: {what}. "
            "Its schedules (lr, weight decay, momentum, teacher temperature) would be laid over the new plan "
            "from step " f"{saved['global_step']} on. Choose resume.schedule=extend (continue with the schedules "
            "re-planned over the new length), resume.schedule=restart (new schedules from step 0, starting from "
            "the checkpoint's weights), or a new run folder (hydra.run.dir=...)")
    if mode == "extend":
        log.warning("resume.schedule=extend: continuing %s from step %d with the schedules re-planned (%s)",
                    path, saved["global_step"], what)
        return ResumeChoice(ckpt_path=path, step=saved["global_step"])
    log.warning("resume.schedule=restart: new schedules from step 0, starting from the weights of %s (step %d)",
                path, saved["global_step"])
    return ResumeChoice(weights_from=path, step=saved["global_step"])


def set_aside_checkpoints(out_dir: Path, step: int) -> Path | None:
    """Move DIR/checkpoints/ away before a restarted run writes its own (nothing is deleted)."""
    current = out_dir / "checkpoints"
    if not current.is_dir():
        return None
    target = out_dir / f"checkpoints-before-restart-{step}"
    suffix = 1
    while target.exists():
        target = out_dir / f"checkpoints-before-restart-{step}-{suffix}"
        suffix += 1
    current.rename(target)
    return target


def load_weights(method, path: str) -> int:
    """Load a checkpoint's module state into ``method`` (a restart); returns its step."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    method.load_state_dict(checkpoint["state_dict"])
    return int(checkpoint.get("global_step", 0))
