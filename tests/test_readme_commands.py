"""The README's commands run as written, cheaply.

* Every ``make train`` line (``make train ARGS="..."`` runs ``python -m ssl_vit.train ...``) and
  every ``python -m ssl_vit.train`` line of the README's code blocks is composed and trained with
  ``trainer.max_steps=1 data=synthetic`` appended (and a small synthetic set, so that the final
  k-NN is quick), in-process through ``ssl_vit.train.run``. Lines that name a placeholder data
  folder (``/path/to/...``, ``/imagenet/...``) cannot run here and are left out; ``hydra.*``
  overrides (the run folder) are replaced by the test's own.
* The commands of blocks marked ``<!-- test: ... -->`` that are not training lines (evaluate,
  export, visualize, cascade) run as processes, with a few cheap settings appended and the
  README's ``outputs/`` folders placed under the test's temporary folder. ``outputs/fmnist`` is
  the folder of the quick start's first command, trained here once.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ssl_vit.train import run

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDERS = ("/path/to/", "/imagenet")
APPENDED = ["trainer.max_steps=1", "data=synthetic"]
SMALL = ["data.options.num_samples=256", "data.val_size=64", "trainer.enable_progress_bar=false"]  # a quick k-NN
# What makes the other entry points cheap here (the checkpoint's data set is the small synthetic one).
CHEAP = {
    "ssl_vit.evaluate": ["progress=false", "linear.epochs=2", "data.options.num_samples=256"],
    "ssl_vit.export": [],
    "ssl_vit.visualize": ["num_images=2"],
    "ssl_vit.cascade": ['cascade.common=["trainer.max_steps=1","data=synthetic","data.options.num_samples=256",'
                        '"data.val_size=64","eval.final_knn=false","eval.knn_every_n_steps=0",'
                        '"trainer.enable_progress_bar=false"]'],
}


def readme_blocks() -> list[tuple[bool, list[str]]]:
    """(marked for the test, command lines) of every code block; continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for marker, body in re.findall(r"(<!-- test[^>]*-->\n)?```[a-z]*\n(.*?)```", text, flags=re.S):
        lines = [line.split("#")[0].strip() for line in body.replace("\\\n", " ").splitlines()]
        blocks.append((bool(marker), [line for line in lines if line]))
    return blocks


def readme_error_examples() -> list[tuple[list[str], str]]:
    """``python -m ssl_vit.train ARGS   # error: TEXT`` lines: (ARGS, TEXT), a command shown failing."""
    text = (ROOT / "README.md").read_text()
    return [(shlex.split(args), message.strip())
            for args, message in re.findall(r"^python -m ssl_vit\.train ([^#\n]*?)\s+# error: (.*)$", text, flags=re.M)]


def readme_train_commands() -> list[list[str]]:
    commands = []
    shown_failing = [args for args, _ in readme_error_examples()]
    for _, lines in readme_blocks():
        for line in lines:
            if " --help" in line or " --cfg" in line:
                continue  # prints, does not train (tested in test_bad_configs.py)
            if line.startswith("python -m ssl_vit.train") and shlex.split(line)[3:] in shown_failing:
                continue
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


def readme_tool_commands() -> list[list[str]]:
    """The marked blocks' ``python -m ssl_vit.X`` lines other than training, as argument lists."""
    return [shlex.split(line)[2:] for marked, lines in readme_blocks() if marked for line in lines
            if line.startswith("python -m ssl_vit.") and not line.startswith("python -m ssl_vit.train")]


COMMANDS = readme_train_commands()
RUNNABLE = [c for c in COMMANDS if not any(p in arg for arg in c for p in PLACEHOLDERS)]
TOOLS = readme_tool_commands()


def in_tmp(args: list[str], tmp: Path) -> list[str]:
    return [arg.replace("outputs/", f"{tmp}/outputs/") for arg in args]


@pytest.fixture(scope="module")
def quick_start_run(tmp_path_factory) -> Path:
    """The quick start's first command (the default run into outputs/fmnist), for one step."""
    tmp = tmp_path_factory.mktemp("readme")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="train", overrides=APPENDED + SMALL)
    run(cfg, tmp / "outputs" / "fmnist")
    return tmp


def test_the_readme_has_commands_of_every_kind():
    text = (ROOT / "README.md").read_text()
    assert text.count('make train ARGS="') >= 1 and len(RUNNABLE) >= 4
    assert {c[0] for c in TOOLS} == {"ssl_vit.evaluate", "ssl_vit.export", "ssl_vit.visualize", "ssl_vit.cascade"}
    assert len(text.splitlines()) <= 300


@pytest.mark.parametrize("overrides", RUNNABLE, ids=[" ".join(c) or "(defaults)" for c in RUNNABLE])
def test_readme_command_trains(overrides, quick_start_run, tmp_path):
    kept = [o for o in in_tmp(overrides, quick_start_run) if not o.startswith("hydra.")]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="train", overrides=kept + APPENDED + SMALL)
    metrics = run(cfg, tmp_path / "run")
    assert metrics["global_step"] == 1 and 0.0 <= metrics["knn_top1"] <= 1.0


ERRORS = readme_error_examples()


@pytest.mark.parametrize("args, message", ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
def test_readme_error_example_fails_as_shown(args, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "ssl_vit.train", *args, f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "error: invalid configuration:" in result.stderr
    assert f"\n  {message}" in result.stderr, result.stderr


@pytest.mark.parametrize("command", TOOLS, ids=[" ".join(c[:2]) for c in TOOLS])
def test_readme_tool_command_runs(command, quick_start_run, tmp_path):
    args = in_tmp(command, quick_start_run)
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={tmp_path / 'out'}")
    result = subprocess.run([sys.executable, "-m", *args, *CHEAP[command[0]]], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    if command[0] == "ssl_vit.evaluate":
        assert re.search(r"^knn_top1=[0-9.]+$", result.stdout, flags=re.M)
