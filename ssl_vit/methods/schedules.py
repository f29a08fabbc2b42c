"""Per-optimizer-step schedules (learning rate, weight decay, EMA momentum, teacher temperature).

Every schedule is a small immutable object called with the global optimizer step
(``schedule(step) -> float``), computed in float64 with :mod:`math`; ``schedule.values()`` lists
the value of every step of the run (handy to plot or compare with the released numpy arrays).

Definitions followed (exactly those of the released code, not the "textbook" variants):

* :func:`cosine_schedule` is DINO's ``utils.cosine_scheduler`` / DINOv2's ``CosineScheduler``
  (numpy arrays indexed by step)::

      warmup   = np.linspace(warmup_start, base, warmup_steps)
      iters    = np.arange(total_steps - warmup_steps)
      cosine   = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
      schedule = np.concatenate((warmup, cosine))

  Consequences, kept on purpose:

  - ``linspace`` includes its end point, so the *last warm-up step* (``warmup_steps - 1``) is
    already exactly ``base``, and the first cosine step (``warmup_steps``) is ``base`` again;
    step 0 is ``warmup_start`` (with a single warm-up step, step 0 is ``warmup_start``, not base).
  - The cosine divides by ``len(iters)``, not ``len(iters) - 1``, so the **last step
    (``total_steps - 1``) is not exactly ``final``**: it is
    ``final + 0.5 * (base - final) * (1 + cos(pi * (n - 1) / n))`` with ``n = total - warmup``,
    i.e. ``final`` plus a term of order ``(base - final) * (pi / 2n)^2``.  (For the EMA momentum
    0.996 -> 1 over 100k steps this is 1 - 1e-12-ish; it matters only for tiny toy runs.)
  - Steps at or beyond ``total_steps`` return ``final`` (DINOv2's ``__getitem__``; DINO's array
    would raise IndexError there).

* :func:`linear_warmup_then_constant` is DINOv2's teacher-temperature schedule, a
  ``CosineScheduler`` with ``total_iters == warmup_iters``: ``np.linspace(start, end,
  warmup_steps)`` followed by ``end`` for every later step.  The value therefore reaches ``end``
  at step ``warmup_steps - 1`` (``start + (end - start) * step / (warmup_steps - 1)``).
  DINO's own teacher-temperature warm-up is the same linspace but per *epoch*
  (``np.linspace(start, end, warmup_epochs)`` indexed by the epoch, so the value is constant
  within an epoch): :class:`PerEpoch` looks a schedule up at ``step // steps_per_epoch``, and
  :func:`teacher_temp_schedule_for` picks per step (DINOv2) or per epoch (DINO).

Recipe helpers (:func:`lr_schedule`, :func:`weight_decay_schedule`, :func:`momentum_schedule`,
:func:`teacher_temp_schedule`) just fill in the papers' defaults, and :func:`scaled_lr` applies
the batch-size scaling rules. :class:`HalfCycleCosineSchedule` is MAE's learning rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def _check_step(step: int) -> int:
    step = int(step)
    if step < 0:
        raise ValueError(f"schedule step must be >= 0, got {step}")
    return step


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warm-up (``linspace`` incl. end point) then the released code's cosine base -> final.

    See the module docstring for the exact definition; build one with :func:`cosine_schedule`.
    """

    base: float
    final: float
    total_steps: int
    warmup_steps: int = 0
    warmup_start: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}"
            )

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        if step >= self.total_steps:
            return float(self.final)
        if step < self.warmup_steps:
            if self.warmup_steps == 1:  # np.linspace(a, b, 1) == [a]
                return float(self.warmup_start)
            frac = step / (self.warmup_steps - 1)
            return float(self.warmup_start + (self.base - self.warmup_start) * frac)
        i = step - self.warmup_steps
        n = self.total_steps - self.warmup_steps  # len(iters); > 0 here
        return float(self.final + 0.5 * (self.base - self.final) * (1.0 + math.cos(math.pi * i / n)))

    def __len__(self) -> int:
        return self.total_steps

    def values(self) -> list[float]:
        """The value at every step 0 .. total_steps - 1."""
        return [self(s) for s in range(self.total_steps)]


@dataclass(frozen=True)
class LinearWarmupThenConstant:
    """``linspace(start, end, warmup_steps)`` then ``end`` forever (see the module docstring)."""

    start: float
    end: float
    warmup_steps: int

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        if step >= self.warmup_steps:
            return float(self.end)
        if self.warmup_steps == 1:
            return float(self.start)
        return float(self.start + (self.end - self.start) * step / (self.warmup_steps - 1))

    def values(self, total_steps: int) -> list[float]:
        return [self(s) for s in range(int(total_steps))]


@dataclass(frozen=True)
class ConstantSchedule:
    """The same value at every step (e.g. DINO's default teacher temperature 0.04)."""

    value: float

    def __call__(self, step: int) -> float:
        _check_step(step)
        return float(self.value)

    def values(self, total_steps: int) -> list[float]:
        return [float(self.value)] * int(total_steps)


@dataclass(frozen=True)
class PerEpoch:
    """``schedule(step // steps_per_epoch)``: a per-epoch table (DINO) looked up by optimizer step."""

    per_epoch: LinearWarmupThenConstant | ConstantSchedule
    steps_per_epoch: int

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")

    def __call__(self, step: int) -> float:
        return self.per_epoch(_check_step(step) // self.steps_per_epoch)

    def values(self, total_steps: int) -> list[float]:
        return [self(s) for s in range(int(total_steps))]


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> CosineSchedule:
    """Linear warm-up ``warmup_start -> base`` over ``warmup_steps`` steps, then cosine ``base -> final``.

    Exactly DINO's ``cosine_scheduler`` / DINOv2's ``CosineScheduler`` (without its
    ``freeze_iters``), per optimizer step: ``base`` is reached at step ``warmup_steps - 1``; the
    last step ``total_steps - 1`` is close to but NOT exactly ``final`` (the released cosine uses
    ``len(iters)``, not ``len(iters) - 1``); steps ``>= total_steps`` return ``final``.
    """
    return CosineSchedule(float(base), float(final), int(total_steps), int(warmup_steps), float(warmup_start))


def linear_warmup_then_constant(start: float, end: float, warmup_steps: int) -> LinearWarmupThenConstant:
    """``np.linspace(start, end, warmup_steps)`` then ``end`` (DINOv2's teacher-temperature schedule)."""
    return LinearWarmupThenConstant(float(start), float(end), int(warmup_steps))


# ----------------------------------------------------------------------------- recipe helpers
def lr_schedule(base_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 1e-6) -> CosineSchedule:
    """Learning rate: linear warm-up from 0 to ``base_lr`` (already batch-scaled), cosine to ``min_lr``."""
    return cosine_schedule(base_lr, min_lr, total_steps, warmup_steps, 0.0)


def weight_decay_schedule(total_steps: int, base: float = 0.04, final: float = 0.4) -> CosineSchedule:
    """Weight decay: cosine 0.04 -> 0.4 over the run, no warm-up (DINO and DINOv2)."""
    return cosine_schedule(base, final, total_steps)


def momentum_schedule(total_steps: int, base: float = 0.996, final: float = 1.0) -> CosineSchedule:
    """EMA teacher momentum: cosine ``base -> 1`` (DINO 0.996, DINOv2 0.992), no warm-up."""
    return cosine_schedule(base, final, total_steps)


def teacher_temp_schedule(
    warmup_steps: int, start: float = 0.04, end: float = 0.07
) -> LinearWarmupThenConstant | ConstantSchedule:
    """Teacher temperature: ``start -> end`` linearly over ``warmup_steps`` (DINOv2: 30 epochs' worth
    of steps), then held at ``end``.  With ``warmup_steps=0`` it is the constant ``end``."""
    if warmup_steps <= 0:
        return ConstantSchedule(float(end))
    return linear_warmup_then_constant(start, end, warmup_steps)


TEACHER_TEMP_SCHEDULES = ("per_step", "per_epoch")


def teacher_temp_schedule_for(
    mode: str, warmup_epochs: float, start: float, end: float, steps_per_epoch: int, total_steps: int,
    notice=None,
) -> LinearWarmupThenConstant | ConstantSchedule | PerEpoch:
    """The teacher temperature of a run: ``start -> end`` over ``warmup_epochs``, then ``end``.

    * ``mode="per_step"`` (DINOv2): linear per optimizer step over
      ``round(warmup_epochs * steps_per_epoch)`` steps (cut to the run if longer);
    * ``mode="per_epoch"`` (DINO): DINO's table ``linspace(start, end, warmup_epochs)`` indexed by
      the schedule epoch ``step // steps_per_epoch``, constant within an epoch (a warm-up longer
      than the planned epochs is cut to them). A fractional ``warmup_epochs`` (short recipes)
      cannot index a per-epoch table: it warms up per step instead, and ``notice`` (a callable
      taking one line of text) is told so.

    ``notice`` also hears about a warm-up cut to the run.
    """
    if mode not in TEACHER_TEMP_SCHEDULES:
        raise ValueError(f"method.teacher_temp_schedule={mode!r}; allowed: {', '.join(TEACHER_TEMP_SCHEDULES)}")
    warmup_epochs = float(warmup_epochs)
    if warmup_epochs < 0:
        raise ValueError(f"method.warmup_teacher_temp_epochs={warmup_epochs!r} must be >= 0")
    say = notice or (lambda _line: None)
    if warmup_epochs == 0 or start == end:
        return ConstantSchedule(float(end))
    if mode == "per_epoch" and warmup_epochs.is_integer():
        planned_epochs = math.ceil(total_steps / steps_per_epoch)
        epochs = int(warmup_epochs)
        if epochs > planned_epochs:
            say(f"the teacher-temperature warm-up of {epochs} epochs is longer than the planned "
                f"{planned_epochs} epochs; using {planned_epochs}")
            epochs = planned_epochs
        return PerEpoch(linear_warmup_then_constant(start, end, epochs), int(steps_per_epoch))
    steps = int(round(warmup_epochs * steps_per_epoch))
    if mode == "per_epoch":
        say(f"method.warmup_teacher_temp_epochs={warmup_epochs:g} is not a whole number of epochs: the "
            f"teacher temperature warms up per step over {steps} steps instead of DINO's per-epoch table")
    if steps > total_steps:
        say(f"a teacher-temperature warm-up of {warmup_epochs:g} epochs ({steps} steps) is longer than the "
            f"planned run of {total_steps} steps; using {total_steps}")
        steps = int(total_steps)
    return teacher_temp_schedule(steps, start, end)


def scaled_lr(base_lr: float, batch_size: int, rule: str = "linear") -> float:
    """Scale a base learning rate by the *global* batch size (summed over all processes).

    * ``'linear'`` (DINO, MAE): ``base_lr * batch_size / 256``  (DINO base 5e-4);
    * ``'sqrt'`` (DINOv2): ``base_lr * sqrt(batch_size / 1024)``  (DINOv2 base 0.004);
    * ``'none'``: ``base_lr`` unchanged.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if rule == "linear":
        return float(base_lr) * batch_size / 256.0
    if rule == "sqrt":
        return float(base_lr) * math.sqrt(batch_size / 1024.0)
    if rule == "none":
        return float(base_lr)
    raise ValueError(f"unknown lr scaling rule {rule!r}; use 'linear', 'sqrt' or 'none'")


@dataclass(frozen=True)
class HalfCycleCosineSchedule:
    """MAE's ``util/lr_sched.adjust_learning_rate``, evaluated at fractional epochs
    ``t = step / steps_per_epoch`` (the released code passes ``data_iter_step / len(loader) + epoch``)::

        lr(t) = base * t / warmup_epochs                                        if t < warmup_epochs
              = min + (base - min) * 0.5 * (1 + cos(pi * (t - warmup_epochs) / (epochs - warmup_epochs)))

    with ``epochs = total_steps / steps_per_epoch``. Step 0 has lr 0, as in the paper's code.
    """

    base: float
    final: float
    warmup_epochs: float
    total_steps: int
    steps_per_epoch: int

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1 or self.total_steps < 1:
            raise ValueError(f"steps_per_epoch={self.steps_per_epoch} and total_steps={self.total_steps} "
                             "must be positive")
        if not 0 <= self.warmup_epochs < self.total_steps / self.steps_per_epoch:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be >= 0 and shorter than the run "
                             f"({self.total_steps / self.steps_per_epoch:g} epochs)")

    def __call__(self, step: int) -> float:
        t = _check_step(step) / self.steps_per_epoch
        if t < self.warmup_epochs:
            return self.base * t / self.warmup_epochs
        epochs = self.total_steps / self.steps_per_epoch
        progress = min(1.0, (t - self.warmup_epochs) / (epochs - self.warmup_epochs))
        return self.final + (self.base - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def values(self) -> list[float]:
        return [self(s) for s in range(self.total_steps)]


def freeze_last_layer_active(step: int, freeze_steps: int) -> bool:
    """True while the head's last layer is frozen: the first ``freeze_steps`` optimizer steps
    (DINO / DINOv2: one epoch's worth).  DINO then drops its gradients; DINOv2 sets its lr to 0."""
    return int(step) < int(freeze_steps)


__all__ = [
    "ConstantSchedule",
    "CosineSchedule",
    "HalfCycleCosineSchedule",
    "LinearWarmupThenConstant",
    "PerEpoch",
    "TEACHER_TEMP_SCHEDULES",
    "cosine_schedule",
    "freeze_last_layer_active",
    "linear_warmup_then_constant",
    "lr_schedule",
    "momentum_schedule",
    "scaled_lr",
    "teacher_temp_schedule",
    "teacher_temp_schedule_for",
    "weight_decay_schedule",
]
