"""Teacher-temperature warm-up: DINO's per-epoch table (official DINO) and DINOv2's per step.

Official DINO: ``np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs),
np.ones(epochs - warmup_epochs) * temp))[epoch]``; the expected values below are that table
worked out by hand.
"""
from __future__ import annotations

import pytest

from training_helpers import compose_train
from ssl_vit.build import build_datamodule, build_method
from ssl_vit.methods.schedules import teacher_temp_schedule_for


def test_per_epoch_table_is_constant_within_each_epoch():
    # 3 warm-up epochs of 10 steps: linspace(0.04, 0.07, 3) = 0.04, 0.055, 0.07, then 0.07.
    schedule = teacher_temp_schedule_for("per_epoch", 3, 0.04, 0.07, steps_per_epoch=10, total_steps=50)
    expected = [0.04] * 10 + [0.055] * 10 + [0.07] * 30
    assert schedule.values(50) == pytest.approx(expected, abs=1e-15)
    assert schedule(10_000) == 0.07


def test_per_step_option_interpolates_every_step():
    schedule = teacher_temp_schedule_for("per_step", 3, 0.04, 0.07, steps_per_epoch=10, total_steps=50)
    expected = [0.04 + 0.03 * s / 29 for s in range(30)] + [0.07] * 20
    assert schedule.values(50) == pytest.approx(expected, abs=1e-15)


def test_fractional_warmup_runs_per_step_with_one_notice():
    notices = []
    schedule = teacher_temp_schedule_for("per_epoch", 0.2, 0.04, 0.07, steps_per_epoch=100, total_steps=400,
                                         notice=notices.append)
    assert len(notices) == 1 and "0.2" in notices[0] and "per step over 20 steps" in notices[0]
    assert schedule(0) == 0.04 and schedule(10) == pytest.approx(0.04 + 0.03 * 10 / 19) and schedule(19) == 0.07
    # Start equal to end (the CPU recipes hold their temperature): a constant, and nothing to say.
    quiet = []
    held = teacher_temp_schedule_for("per_epoch", 0.2, 0.02, 0.02, 100, 400, notice=quiet.append)
    assert held.values(400) == [0.02] * 400 and quiet == []


def test_warmup_longer_than_the_run_is_cut_to_its_epochs():
    notices = []
    schedule = teacher_temp_schedule_for("per_epoch", 30, 0.04, 0.07, steps_per_epoch=10, total_steps=25,
                                         notice=notices.append)
    # 3 planned epochs (ceil(25 / 10)): linspace(0.04, 0.07, 3) over them.
    assert [schedule(s) for s in (0, 9, 10, 20, 24)] == pytest.approx([0.04, 0.04, 0.055, 0.07, 0.07])
    assert len(notices) == 1 and "3 epochs" in notices[0]


def test_bad_mode_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="method.teacher_temp_schedule='per_batch'; allowed: per_step, per_epoch"):
        teacher_temp_schedule_for("per_batch", 3, 0.04, 0.07, 10, 50)


@pytest.mark.parametrize("name, expected", [
    # DINO: linspace(0.04, 0.07, 3) by epoch of 5 steps; DINOv2: linspace(0.04, 0.07, 15) by step.
    ("dino", [0.04, 0.04, 0.055, 0.055, 0.07, 0.07, 0.07]),
    ("dinov2", [0.04 + 0.03 * s / 14 for s in (0, 4, 5, 9, 10)] + [0.07, 0.07]),
])
def test_methods_default_to_their_papers_schedule(name, expected):
    cfg = compose_train([f"method={name}", "data=synthetic", "steps_per_epoch=5", "trainer.max_steps=40",
                         "method.warmup_teacher_temp=0.04", "method.teacher_temp=0.07",
                         "method.warmup_teacher_temp_epochs=3", "model.depth=1"])
    assert cfg.method.teacher_temp_schedule == ("per_epoch" if name == "dino" else "per_step")
    method = build_method(cfg, build_datamodule(cfg))
    assert [method.teacher_temp_at(s) for s in (0, 4, 5, 9, 10, 14, 15)] == pytest.approx(expected)
