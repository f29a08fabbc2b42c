"""Killed at random points (SIGKILL mid-step, mid-epoch, in the middle of a checkpoint write,
with the newest checkpoint then cut short), the same command resumes each time and ends with
final weights bit-identical to an uninterrupted run: data order, augmentation, masks and the
step's own randomness are functions of (seed, rank, epoch, image, step), not of process history.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssl_vit.checkpoints import LAST, step_checkpoints

ROOT = Path(__file__).resolve().parents[2]
HOOK = Path(__file__).resolve().parent / "kill_in_save"
STEPS, EVERY = 20, 3  # 48 images / batch 8 = 6 batches per epoch: the run crosses 3 epoch boundaries
ARGS = [
    "method=dinov2", "data=synthetic", "data.options.num_samples=48", "data.val_size=16", "data.batch_size=8",
    "data.num_workers=1", "model.depth=1", "method.crops.n_local=2", "method.head.out_dim=64",
    "method.head.hidden_dim=32", "method.head.bottleneck_dim=16", "method.ibot.head.out_dim=64",
    "method.ibot.head.hidden_dim=32", "method.ibot.head.bottleneck_dim=16", "model.drop_path_rate=0.1",
    "trainer.precision=32", "trainer.deterministic=true", f"trainer.max_steps={STEPS}",
    f"checkpoint_every_n_steps={EVERY}", "checkpoint_keep=2", "eval.final_knn=false", "eval.knn_every_n_steps=0",
    "eval.pictures.every_n_steps=0", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
]


def _start(out: Path, **env_extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HOOK), str(ROOT)]), **env_extra}
    return subprocess.Popen([sys.executable, "-m", "ssl_vit.train", f"hydra.run.dir={out}", *ARGS], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def _kill_after_checkpoint(process: subprocess.Popen, out: Path, step: int) -> str:
    """SIGKILL as soon as the checkpoint of ``step`` (or a later one) exists: the process is
    then somewhere in the steps after it (a step, a data fetch, an epoch boundary)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        saved = step_checkpoints(out / "checkpoints") if (out / "checkpoints").is_dir() else []
        if saved and int(saved[0].stem.split("-")[1]) >= step:
            process.send_signal(signal.SIGKILL)
            return process.communicate()[0]
        if process.poll() is not None:
            pytest.fail(f"the run ended before step {step}: {process.communicate()[0][-3000:]}")
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"no checkpoint of step {step} within 300 s")


def _restored_from(output: str) -> int:
    """The step of the checkpoint a run resumed from (train.py names it)."""
    match = re.search(r"resuming from (\S+) at step (\d+)", output)
    assert match, "the run did not resume:\n" + output[-3000:]
    return int(match.group(2))


def _weights(out: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(out / "checkpoints" / LAST, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == STEPS
    return checkpoint["state_dict"]


@pytest.mark.slow
def test_killed_runs_resume_to_bit_identical_weights(tmp_path):
    rng = random.Random(os.environ.get("SSL_VIT_TEST_KILL_SEED", "0"))
    reference = tmp_path / "uninterrupted"
    _finish(_start(reference))

    out = tmp_path / "killed"
    first_kill = rng.randrange(EVERY, 2 * EVERY + 1, EVERY)  # after the checkpoint of step 3 or 6
    _kill_after_checkpoint(_start(out), out, first_kill)
    resumed_at = int(step_checkpoints(out / "checkpoints")[0].stem.split("-")[1])

    # Killed while writing the next checkpoint: a half-written temporary file, never renamed.
    write_kill = resumed_at + EVERY
    process = _start(out, SSL_VIT_TEST_KILL_IN_SAVE_AT_STEP=str(write_kill))
    output = process.communicate(timeout=300)[0]
    assert process.returncode == -signal.SIGKILL
    assert _restored_from(output) == resumed_at
    assert list((out / "checkpoints").glob("*.tmp")), "the hook should have left a half-written file"
    assert step_checkpoints(out / "checkpoints")[0].name == f"step-{resumed_at:07d}.ckpt"

    # Resumes from the previous checkpoint (the temporary file is removed), killed again later.
    last_kill = write_kill + rng.randrange(1, 3) * EVERY
    output = _kill_after_checkpoint(_start(out), out, last_kill)
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert _restored_from(output) == resumed_at

    # The newest checkpoint cut short (a full disk, an interrupted copy): the run says so and
    # falls back to the one before.
    newest = out / "checkpoints" / LAST
    os.truncate(newest, newest.stat().st_size // 3)  # a hard link: its step file is cut too
    fallback = step_checkpoints(out / "checkpoints")[1]
    output = _finish(_start(out))
    assert "unreadable (cut short?): resuming from" in output
    assert _restored_from(output) == int(fallback.stem.split("-")[1])

    expected, got = _weights(reference), _weights(out)
    assert expected.keys() == got.keys()
    different = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not different, f"{len(different)} of {len(expected)} tensors differ, e.g. {different[:3]}"
