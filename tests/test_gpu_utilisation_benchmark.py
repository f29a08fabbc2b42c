"""benchmarks/gpu_utilisation.py on the CPU: its model FLOPs leave out activation checkpointing's
recomputation, and a run prints the figures the GPU closing note quotes (step time, MFU against
the given peak, peak memory)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_utilisation.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_utilisation

    yield gpu_utilisation
    sys.path.remove(str(ROOT / "benchmarks"))


def test_model_flops_with_checkpointing_leave_out_the_recomputation(bench):
    """With activation checkpointing the count less the recomputation (measured at batch 2,
    scaled) equals the count of the same step without checkpointing, at batch 8."""
    overrides = bench.SETTINGS["tiny"] + ["trainer.precision=32"]
    cpu = torch.device("cpu")
    without = bench.count_step_flops(overrides + ["model.activation_checkpointing=false"], 8, cpu)
    checkpointed = overrides + ["model.activation_checkpointing=true"]
    assert bench.count_step_flops(checkpointed, 8, cpu) > 1.1 * without  # the recomputed forwards
    model = bench.model_flops(checkpointed, 8, 2, True, cpu)
    assert abs(model - without) / without < 0.005  # the pruned last block's rows vary with the masks
    assert bench.model_flops(overrides, 8, 2, False, cpu) == without


def test_a_run_prints_step_time_mfu_and_peak_memory(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--settings", "tiny", "--batch", "8", "--count-batch", "2",
                           "--warmup", "1", "--steps", "1", "--peak-tflops", "0.5", "--json", str(tmp_path / "r.json"),
                           "trainer.precision=32"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"vit_cpu, fp32, batch 8, 2x24 \+ 2x12 crops, 256 prototypes on cpu", done.stdout)
    mfu = re.search(r"-> ([0-9.]+) TFLOP/s, MFU ([0-9.]+)% of 0.5 TFLOP/s", done.stdout)
    assert mfu and abs(float(mfu.group(1)) / 0.5 * 100 - float(mfu.group(2))) < 0.15
    assert re.search(r"peak memory [0-9.]+ GiB \(held before the step: [0-9.]+ GiB\)", done.stdout)
    assert (tmp_path / "r.json").read_text().count('"model_gflop_per_step"') == 1


def test_unknown_settings_are_named(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--settings", "vit_huge"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "unknown ['vit_huge']; available: vit_base, vit_large_checkpointed, tiny" \
        in done.stderr
