"""The checkpoint folder: retention, a cut-short newest checkpoint skipped with a warning,
temporary files of a killed write removed."""
from __future__ import annotations

import logging

import pytest
import torch

from ssl_vit.callbacks.checkpoint import LastCheckpoint
from ssl_vit.checkpoints import (
    LAST, is_complete, newest_complete_checkpoint, remove_stale_temporaries, step_checkpoints,
)


class FakeTrainer:
    """What LastCheckpoint uses of a Trainer: the step, rank 0, and save_checkpoint."""

    is_global_zero = True

    def __init__(self):
        self.global_step = 0

    def save_checkpoint(self, path, weights_only=None):
        assert weights_only is False  # the full state, to resume from
        torch.save({"global_step": self.global_step, "w": torch.full((100,), float(self.global_step))}, path)


def test_keeps_the_newest_and_links_last(tmp_path):
    saver, trainer = LastCheckpoint(tmp_path, every_n_steps=1, keep=2), FakeTrainer()
    for step in (1, 2, 3, 4):
        trainer.global_step = step
        saver.save(trainer)
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step-0000004.ckpt", "step-0000003.ckpt"]
    assert torch.load(tmp_path / LAST)["global_step"] == 4
    assert not list(tmp_path.glob("*.tmp"))


def test_a_cut_short_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    saver, trainer = LastCheckpoint(tmp_path, every_n_steps=1, keep=3), FakeTrainer()
    for step in (5, 10):
        trainer.global_step = step
        saver.save(trainer)
    last = tmp_path / LAST
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # also cuts step 10: same file
    assert not is_complete(last)
    with caplog.at_level(logging.WARNING, logger="ssl_vit.checkpoints"):
        assert newest_complete_checkpoint(tmp_path) == tmp_path / "step-0000005.ckpt"
    assert "unreadable (cut short?): resuming from" in caplog.text and "last.ckpt" in caplog.text


def test_no_complete_checkpoint_is_an_error_naming_the_files(tmp_path):
    (tmp_path / LAST).write_bytes(b"PK\x03\x04 not a whole archive")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint .*last.ckpt"):
        newest_complete_checkpoint(tmp_path)
    assert newest_complete_checkpoint(tmp_path / "absent") is None


def test_temporaries_of_a_killed_write_are_removed(tmp_path):
    (tmp_path / "step-0000007.ckpt.tmp").write_bytes(b"half")
    (tmp_path / "step-0000006.ckpt").write_bytes(b"kept")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == ["step-0000007.ckpt.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000006.ckpt"]


def test_minutes_interval_saves_when_time_has_passed(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("ssl_vit.callbacks.checkpoint.time.monotonic", lambda: clock[0])
    saver, trainer = LastCheckpoint(tmp_path, every_n_steps=0, every_n_minutes=2), FakeTrainer()
    saver.on_train_start(trainer, None)
    trainer.global_step = 1
    assert not saver._due(trainer)
    clock[0] += 121
    assert saver._due(trainer)
