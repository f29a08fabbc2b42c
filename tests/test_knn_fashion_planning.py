"""benchmarks/knn_fashion.py plans each budget's step count from a measured step time; the
choice of which measurement to trust decides whether a "10-minute" row trains ten minutes."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "knn_fashion.py"


@pytest.fixture(scope="module")
def knn_fashion():
    spec = importlib.util.spec_from_file_location("knn_fashion", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_first_budget_is_planned_from_the_calibration(knn_fashion):
    assert knn_fashion.planning_seconds_per_step(0.39, []) == (0.39, "calibration")


def test_later_budgets_use_the_longest_finished_run(knn_fashion):
    runs = [dict(minutes=5, steps=769, fit_s=374.5), dict(minutes=10, steps=1538, fit_s=875.6)]
    seconds, source = knn_fashion.planning_seconds_per_step(0.39, runs)
    assert seconds == pytest.approx(875.6 / 1538)
    assert source == "the 10-min run"


def test_rows_without_training_time_are_ignored(knn_fashion):
    # Rows carried over from older sittings may lack fit_s; they cannot say the step time.
    runs = [dict(minutes=5, steps=700, fit_s=320.9), dict(minutes=10, steps=1400, source="older sitting")]
    seconds, source = knn_fashion.planning_seconds_per_step(0.43, runs)
    assert seconds == pytest.approx(320.9 / 700)
    assert source == "the 5-min run"
