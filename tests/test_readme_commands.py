"""The README's training commands run as written (each for one step on synthetic data).

Every ``make train`` line (``make train ARGS="..."`` runs ``python -m ssl_vit.train ...``) and
every ``python -m ssl_vit.train`` line of the README's code blocks is composed and trained with
``trainer.max_steps=1 data=synthetic`` appended (and a small synthetic set, so that the final
k-NN is quick), in-process through ``ssl_vit.train.run``; identical commands run once.
Lines that name a placeholder data folder (``/path/to/...``, ``/imagenet/...``) cannot run
here and are left out; ``hydra.*`` overrides (the run folder) are replaced by the test's own.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ssl_vit.train import run

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDERS = ("/path/to/", "/imagenet")
APPENDED = ["trainer.max_steps=1", "data=synthetic"]
SMALL = ["data.options.num_samples=256", "data.val_size=64", "+trainer.enable_progress_bar=false"]  # a quick k-NN


def readme_train_commands() -> list[list[str]]:
    """The override lists of the README's training commands (continuation lines joined)."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("make train"):
                match = re.search(r'ARGS="([^"]*)"', line)
                commands.append(shlex.split(match.group(1)) if match else [])
            elif line.startswith("python -m ssl_vit.train"):
                commands.append(shlex.split(line)[3:])
    unique = []
    for command in commands:
        if command not in unique:
            unique.append(command)
    return unique


COMMANDS = readme_train_commands()
RUNNABLE = [c for c in COMMANDS if not any(p in arg for arg in c for p in PLACEHOLDERS)]


def test_the_readme_has_make_train_examples():
    text = (ROOT / "README.md").read_text()
    assert text.count('make train ARGS="') >= 1 and len(RUNNABLE) >= 3


@pytest.mark.parametrize("overrides", RUNNABLE, ids=[" ".join(c) or "(defaults)" for c in RUNNABLE])
def test_readme_command_trains(overrides, tmp_path):
    kept = [o for o in overrides if not o.startswith("hydra.")]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="train", overrides=kept + APPENDED + SMALL)
    metrics = run(cfg, tmp_path / "run")
    assert metrics["global_step"] == 1 and 0.0 <= metrics["knn_top1"] <= 1.0
