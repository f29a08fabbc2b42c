"""Declaring a config key: its default, a one-line help and the values it allows.

``setting(default, help, allowed=..., ok=...)`` is a dataclass field whose metadata carries the
help text (shown by ``--help``) and a rule: ``ok(value) -> bool`` with ``allowed``, the phrase an
error prints ("allowed: an integer >= 1"). Types are the dataclass annotations: OmegaConf
converts and refuses a wrong type when the override is merged; the rules add ranges and choices.
``None`` passes the rule of an ``Optional`` key.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, field
from numbers import Real
from typing import Any, Callable, Sequence

Rule = Callable[[Any], bool]


def setting(default: Any = MISSING, help: str = "", allowed: str | None = None, ok: Rule | None = None,
            factory: Callable[[], Any] | None = None):
    """A config key (a dataclass field) with its help and its rule."""
    metadata = {"help": help, "allowed": allowed, "ok": ok}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def int_at_least(low: int) -> tuple[str, Rule]:
    return f"an integer >= {low}", lambda v: _integer(v) and v >= low


def number_at_least(low: float, inclusive: bool = True) -> tuple[str, Rule]:
    if inclusive:
        return f"a number >= {low:g}", lambda v: _number(v) and v >= low
    return f"a number > {low:g}", lambda v: _number(v) and v > low


def number_in(low: float, high: float, low_open: bool = False, high_open: bool = False) -> tuple[str, Rule]:
    left, right = "(" if low_open else "[", ")" if high_open else "]"

    def ok(v: Any) -> bool:
        if not _number(v):
            return False
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return above and below

    return f"a number in {left}{low:g}, {high:g}{right}", ok


def one_of(choices: Sequence[Any]) -> tuple[str, Rule]:
    return "one of " + ", ".join(str(c) for c in choices), lambda v: v in choices


def pair_in(low: float, high: float, low_open: bool = True) -> tuple[str, Rule]:
    """A pair (lo, hi) with low < lo <= hi <= high (``low_open``) or low <= lo."""
    left = "<" if low_open else "<="

    def ok(v: Any) -> bool:
        if not (isinstance(v, Sequence) and not isinstance(v, str) and len(v) == 2 and all(_number(x) for x in v)):
            return False
        lo, hi = float(v[0]), float(v[1])
        return (lo > low if low_open else lo >= low) and lo <= hi <= high

    return f"a pair [lo, hi] with {low:g} {left} lo <= hi <= {high:g}", ok


def rule(pair: tuple[str, Rule]) -> dict[str, Any]:
    """``setting(..., **rule(int_at_least(1)))``."""
    allowed, ok = pair
    return {"allowed": allowed, "ok": ok}
