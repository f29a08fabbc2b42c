"""benchmarks/step_speed.py without timing anything: on a tiny configuration the ssl_vit step
(through the Trainer) and the lightly-built step do the same matrix work, both really train, and
the run ends with the ratio line its minima give."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightly")
pytest.importorskip("timm")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_speed.py"


@pytest.fixture(scope="module")
def bench():
    name = "step_speed_under_test"
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(name, None)


def fake_result(bench, ratios: list[tuple[float, float | None]]):
    """A ConfigResult whose precisions have the given (step, backbone) time ratios (ssl_vit time 1)."""
    results = []
    for step, backbone in ratios:
        r = bench.PrecisionResult("fp32", bench.Timing("ssl_vit step", [1.0]), bench.Timing("lightly step", [step]))
        if backbone is not None:
            r.ssl_backbone = bench.Timing("ssl_vit backbone", [1.0, 1.0, 1.0])
            r.timm_backbone = bench.Timing("timm backbone", [backbone, 9.0, 0.0])  # median: backbone
        results.append(r)
    return bench.ConfigResult("cpu", "", results)


def test_min_ratios_and_the_ratio_line(bench):
    results = [fake_result(bench, [(1.25, 1.5), (1.4, 1.12)]), fake_result(bench, [(1.1, 1.3)])]
    x, y = bench.min_ratios(results)
    assert (x, y) == pytest.approx((1.1, 1.12))
    text = "table\n" + bench.ratio_line(x, y) + "\n"
    assert bench.parse_ratio_line(text) == pytest.approx((1.1, 1.12))
    # Without backbone timings the backbone ratio is nan, and still parses.
    x, y = bench.min_ratios([fake_result(bench, [(0.9, None)])])
    assert x == pytest.approx(0.9) and math.isnan(y)
    assert math.isnan(bench.parse_ratio_line(bench.ratio_line(x, y))[1])
    with pytest.raises(ValueError, match="ratio line"):
        bench.parse_ratio_line("ratio ssl_vit/lightly=1.0 backbone ssl_vit/timm=1.0\nsomething after")


def test_emulated_bf16_is_never_run(bench, monkeypatch):
    monkeypatch.setattr(bench, "native_bf16", lambda: False)
    assert bench.resolve_precisions("auto") == (["fp32"], [])
    run, notes = bench.resolve_precisions("fp32,bf16")
    assert run == ["fp32"] and "emulates bf16" in notes[0]
    monkeypatch.setattr(bench, "native_bf16", lambda: True)
    assert bench.resolve_precisions("auto") == (["fp32", "bf16"], [])


def test_flash_recompute_share(bench):
    # torch's formula for the flash backward: five products of equal size when q, k, v share a width.
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    shape = (2, 3, 37, 64)
    backward = sdpa_backward_flop_count(shape, shape, shape, shape)
    assert bench.flash_recompute_flops({bench.FLASH_BACKWARD: backward}) * 2 == sdpa_flop_count(shape, shape, shape)


def test_tiny_run_same_flops_real_steps_and_ratio_line(bench, capsys):
    # --cpu-allocator system: the default (reuse) would change this test process's allocator for good.
    results = bench.main(["--configs", "tiny", "--precisions", "fp32", "--steps", "1", "--warmup", "0",
                          "--batches", "1", "--matmul-size", "128", "--cpu-allocator", "system"])
    out = capsys.readouterr().out
    (config,) = results
    (r,) = config.results
    # Both sides counted: the lightly side's attention is the CPU flash kernel, counted only
    # through the registered formulas.
    assert r.ssl_step.total_flops > 0 and r.ref_step.total_flops > 0
    assert any("flash_attention_for_cpu" in op for op in r.ref_step.flops)
    # The same work before the saving: the ssl_vit step with every token through the last block
    # counts the peers' FLOPs; the timed step (model.prune_last_block, the default) counts fewer.
    unpruned = bench.Timing("ssl_vit unpruned", [], r.unpruned_step_flops)
    step_ratio, _ = bench.flop_agreement(unpruned, r.ref_step, 0.03)
    assert 0 < r.ssl_step.total_flops < 0.99 * unpruned.total_flops
    backbone_ratio, _ = bench.flop_agreement(r.ssl_backbone, r.timm_backbone, 0.03)
    assert step_ratio == pytest.approx(1.0, abs=0.03)
    assert backbone_ratio == pytest.approx(1.0, abs=0.03)
    assert r.timm_backbone.total_flops == pytest.approx(r.ssl_backbone.total_flops, rel=0.05)  # with the recompute
    assert 0 < r.ssl_backbone_pruned.total_flops < r.ssl_backbone.total_flops  # the [CLS] forward as shipped
    # A real training step on both sides: the students and the EMA teachers moved. (Early in the
    # lr warm-up an EMA step on a weight near 1, a LayerNorm gain, can round to no change in fp32.)
    assert set(r.changed) == {"ssl_vit student", "ssl_vit teacher", "lightly student", "lightly teacher"}
    assert r.changed["ssl_vit student"] >= 0.9 and r.changed["lightly student"] >= 0.9, r.changed
    assert r.changed["ssl_vit teacher"] >= 0.75 and r.changed["lightly teacher"] >= 0.75, r.changed
    assert all(math.isfinite(v) for v in r.losses.values()), r.losses
    # One timed step per side; the run ends with the minima as its ratio line.
    assert len(r.ssl_step.seconds) == len(r.ref_step.seconds) == 1
    x, y = bench.parse_ratio_line(out)
    assert (x, y) == pytest.approx(bench.min_ratios(results), rel=1e-3, abs=1e-3)
    assert "FLOPs lightly/ssl_vit" in out and "agree within 3%" in out and "as timed" in out
    assert "CPU allocator for both sides: system" in out
