"""Per-step schedules: hand-computed values and the released numpy-array definitions."""
import math

import numpy as np
import pytest

from ssl_vit.methods.schedules import (
    cosine_schedule,
    freeze_last_layer_active,
    linear_warmup_then_constant,
    lr_schedule,
    momentum_schedule,
    scaled_lr,
    teacher_temp_schedule,
    weight_decay_schedule,
)


def released_cosine(base, final, total, warmup=0, start=0.0):
    """The released numpy definition (DINO utils.cosine_scheduler, per step), written out again."""
    warm = np.linspace(start, base, warmup) if warmup > 0 else np.array([])
    iters = np.arange(total - warmup)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warm, cos))


def test_warmup_and_cosine_hand_values():
    s = cosine_schedule(1.0, 0.0, total_steps=10, warmup_steps=5, warmup_start=0.0)
    # linspace(0, 1, 5) includes its end: base is reached on the last warm-up step (4).
    for step, want in enumerate([0.0, 0.25, 0.5, 0.75, 1.0]):
        assert s(step) == pytest.approx(want, abs=1e-15)
    assert s(5) == pytest.approx(1.0)  # first cosine step: base again
    assert s(6) == pytest.approx(0.5 * (1 + math.cos(math.pi / 5)))  # 0.9045085
    assert s(6) == pytest.approx(0.9045085, abs=1e-7)
    assert s(7) == pytest.approx(0.6545085, abs=1e-7)
    # The released cosine divides by len(iters): the last step is NOT exactly final ...
    assert s(9) == pytest.approx(0.0954915, abs=1e-7)
    # ... and every step past the end is final (DINOv2's __getitem__).
    assert s(10) == 0.0 and s(10**6) == 0.0
    assert len(s) == 10


def test_nonzero_warmup_start():
    s = cosine_schedule(0.5, 0.1, total_steps=20, warmup_steps=3, warmup_start=0.2)
    assert [s(0), s(1), s(2)] == pytest.approx([0.2, 0.35, 0.5])
    one = cosine_schedule(0.5, 0.1, total_steps=5, warmup_steps=1, warmup_start=0.2)
    assert one(0) == pytest.approx(0.2)  # np.linspace(a, b, 1) == [a]
    assert one(1) == pytest.approx(0.5)


def test_cosine_mid_run_weight_decay():
    wd = weight_decay_schedule(100)  # 0.04 -> 0.4
    assert wd(0) == pytest.approx(0.04)
    assert wd(50) == pytest.approx(0.22)  # 0.4 + 0.5 * (0.04 - 0.4) * (1 + cos(pi / 2))
    assert wd(25) == pytest.approx(0.4 - 0.18 * (1 + math.sqrt(0.5)))
    assert wd(100) == pytest.approx(0.4)


@pytest.mark.parametrize(
    "args",
    [(1.0, 0.0, 10, 5, 0.0), (5e-4, 1e-6, 1000, 100, 0.0), (0.04, 0.4, 37, 0, 0.0), (0.996, 1.0, 250, 0, 0.0),
     (0.3, 0.7, 12, 12, 0.1)],
)
def test_matches_released_numpy_definition(args):
    s = cosine_schedule(*args)
    np.testing.assert_allclose(np.array(s.values()), released_cosine(*args), rtol=1e-12, atol=1e-15)


def test_lr_warmup_then_cosine_to_min_lr():
    lr = lr_schedule(1e-3, total_steps=1000, warmup_steps=100, min_lr=1e-6)
    assert lr(0) == 0.0
    assert lr(50) == pytest.approx(1e-3 * 50 / 99)
    assert lr(99) == pytest.approx(1e-3) and lr(100) == pytest.approx(1e-3)
    assert lr(550) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))  # half-way through the cosine
    # last step: min_lr + 0.5 * (base - min_lr) * (1 + cos(pi * 899 / 900)) ~ min_lr + 3.04e-9
    assert lr(999) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 899 / 900)), rel=1e-12)
    assert 1e-6 < lr(999) < 1e-6 + 4e-9
    assert lr(1000) == 1e-6


def test_teacher_temperature_warmup():
    total = 1000
    temp = teacher_temp_schedule(int(0.3 * total))  # 0.04 -> 0.07 over the first 30%
    assert temp(0) == pytest.approx(0.04)
    # 15% of the run: linspace(0.04, 0.07, 300)[150] = 0.04 + 0.03 * 150 / 299
    assert temp(150) == pytest.approx(0.04 + 0.03 * 150 / 299)
    assert temp(150) == pytest.approx(0.055, abs=1e-4)
    assert temp(299) == pytest.approx(0.07)
    assert all(temp(s) == pytest.approx(0.07) for s in range(300, total))
    # With 301 warm-up points the midpoint is exactly 0.055.
    assert linear_warmup_then_constant(0.04, 0.07, 301)(150) == pytest.approx(0.055, abs=1e-15)
    # Monotone warm-up, and no warm-up means the constant final value (DINO's default recipe).
    vals = temp.values(total)
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    assert teacher_temp_schedule(0, end=0.04)(0) == pytest.approx(0.04)


def test_momentum_schedule():
    m = momentum_schedule(1000)
    assert m(0) == pytest.approx(0.996)
    assert m(500) == pytest.approx(0.998)
    assert 0.99999 < m(999) < 1.0
    assert m(1000) == 1.0
    vals = m.values()
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    assert momentum_schedule(1000, base=0.992)(0) == pytest.approx(0.992)  # DINOv2


def test_scaled_lr_rules():
    assert scaled_lr(5e-4, 64, "linear") == pytest.approx(1.25e-4)  # DINO: 5e-4 * 64 / 256
    assert scaled_lr(0.004, 64, "sqrt") == pytest.approx(0.001)  # DINOv2: 0.004 * sqrt(64 / 1024)
    assert scaled_lr(5e-4, 256, "linear") == pytest.approx(5e-4)
    assert scaled_lr(0.004, 1024, "sqrt") == pytest.approx(0.004)
    assert scaled_lr(0.004, 4096, "sqrt") == pytest.approx(0.008)
    assert scaled_lr(1e-3, 64, "none") == 1e-3
    with pytest.raises(ValueError):
        scaled_lr(1e-3, 64, "cubic")


def test_freeze_last_layer_active():
    assert freeze_last_layer_active(0, 10) and freeze_last_layer_active(9, 10)
    assert not freeze_last_layer_active(10, 10)
    assert not freeze_last_layer_active(0, 0)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, total_steps=5, warmup_steps=6)
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, total_steps=0)
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, total_steps=5)(-1)
