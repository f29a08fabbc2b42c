"""The results of ``benchmarks/step_speed.py`` and their printout: medians, FLOP agreement between
the two sides of each comparison, and the closing ratio line."""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field

RATIO_LINE = re.compile(r"^ratio ssl_vit/lightly=(?P<x>\S+) backbone ssl_vit/timm=(?P<y>\S+)$")


def median_range(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


@dataclass
class Timing:
    label: str
    seconds: list[float]
    flops: dict[str, int] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())


@dataclass
class PrecisionResult:
    precision: str
    ssl_step: Timing
    ref_step: Timing
    ssl_backbone: Timing | None = None
    timm_backbone: Timing | None = None
    ssl_backbone_pruned: Timing | None = None  # the [CLS] forward as shipped (model.prune_last_block)
    analytic_backbone_flops: float = 0.0
    # FLOPs of the ssl_vit step with model.prune_last_block=false (every token through the last
    # block, as the peers compute): the check that both sides do the same work before the saving.
    unpruned_step_flops: dict[str, int] = field(default_factory=dict)
    changed: dict[str, float] = field(default_factory=dict)  # fraction of parameters a run changed
    losses: dict[str, float] = field(default_factory=dict)

    @property
    def step_ratio(self) -> float:
        return self.ref_step.median / self.ssl_step.median

    @property
    def backbone_ratio(self) -> float | None:
        if self.ssl_backbone is None or self.timm_backbone is None:
            return None
        return self.timm_backbone.median / self.ssl_backbone.median


@dataclass
@dataclass
class ConfigResult:
    name: str
    description: str
    results: list[PrecisionResult]
    title: str = ""  # the configuration's title (step_speed.CONFIGS)


FLASH_BACKWARD = "aten._scaled_dot_product_flash_attention_for_cpu_backward"


def flash_recompute_flops(flops: dict[str, int]) -> int:
    """FLOPs the CPU flash-attention backward spends recomputing q @ k^T: one of the five equal
    products of its count (torch's formula; q, k, v of one head width), work that an explicit
    softmax(q k^T) v keeps from its forward pass."""
    return flops.get(FLASH_BACKWARD, 0) // 5


def flop_agreement(a: Timing, b: Timing, tolerance: float) -> tuple[float, list[str]]:
    """The FLOP ratio b/a without the flash backward's recomputation, and lines reporting it
    (op by op where the two differ by more than ``tolerance``)."""
    ta, tb = a.total_flops, b.total_flops
    if not ta or not tb:
        return math.nan, [f"    FLOPs: not counted ({a.label}: {ta}, {b.label}: {tb})"]
    name_a, name_b = a.label.split()[0], b.label.split()[0]
    adjusted = (tb - flash_recompute_flops(b.flops)) / (ta - flash_recompute_flops(a.flops))
    agree = abs(adjusted - 1) <= tolerance
    line = f"    FLOPs {name_b}/{name_a} = {tb / ta:.4f}"
    if flash_recompute_flops(a.flops) or flash_recompute_flops(b.flops):
        line += (f"; {adjusted:.4f} without the CPU flash-attention backward's recomputation of q@k^T "
                 f"(an explicit softmax(qk^T)v keeps the scores)")
    lines = [line + f": {'agree' if agree else 'DIFFER'} within {tolerance:.0%}"]
    if not agree:
        lines.append("    by op (GFLOP): " + ", ".join(
            f"{op} {a.flops.get(op, 0) / 1e9:.3f} vs {b.flops.get(op, 0) / 1e9:.3f}"
            for op in sorted(set(a.flops) | set(b.flops))))
    return adjusted, lines


def format_table(result: ConfigResult, ceilings: dict[str, float], tolerance: float) -> str:
    lines = [f"== {result.name}: {result.title}", f"   {result.description}"]
    header = f"   {'':30s} {'median s':>9s} {'min - max s':>17s} {'GFLOP/step':>11s} {'GFLOP/s':>8s} {'of ceiling':>10s}"
    for r in result.results:
        ceiling = ceilings.get(r.precision)
        lines.append(f"  {r.precision}" + (f" (matmul ceiling {ceiling:.0f} GFLOP/s)" if ceiling else ""))
        lines.append(header)
        pairs = [(r.ssl_step, r.ref_step, "step", r.step_ratio)]
        if r.ssl_backbone is not None:
            pairs.append((r.ssl_backbone, r.timm_backbone, "backbone", r.backbone_ratio))
        for ours, theirs, what, ratio in pairs:
            for t in (ours, theirs):
                med, lo, hi = median_range(t.seconds)
                gflop = t.total_flops / 1e9
                rate = gflop / med
                of = f"{rate / ceiling:.0%}" if ceiling else "-"
                lines.append(f"   {t.label:30s} {med:9.3f} {lo:8.3f} - {hi:6.3f} {gflop:11.2f} {rate:8.1f} {of:>10s}")
            if what == "step" and r.unpruned_step_flops:
                saved = 1 - ours.total_flops / sum(r.unpruned_step_flops.values())
                lines.append(f"    FLOPs {theirs.label.split()[0]}/{ours.label.split()[0]} = "
                             f"{theirs.total_flops / ours.total_flops:.4f} as timed: ssl_vit skips {saved:.1%} of "
                             "its step's FLOPs (model.prune_last_block: the last block on the tokens a loss reads; "
                             "with drop path, model.drop_path_law=subset: residual branches on the samples it keeps)")
                unpruned = Timing("ssl_vit step, every token and sample", [], r.unpruned_step_flops)
                lines.extend(flop_agreement(unpruned, theirs, tolerance)[1])
            else:
                lines.extend(flop_agreement(ours, theirs, tolerance)[1])
            if what == "backbone" and r.analytic_backbone_flops:
                lines.append(f"    analytic count of the blocks (benchmarks/backbone.py, 3x forward): "
                             f"{r.analytic_backbone_flops / 1e9:.2f} GFLOP")
            lines.append(f"    {what} ratio {theirs.label.split()[0]}/{ours.label.split()[0]} time = {ratio:.3f}"
                         f"  (> 1: ssl_vit faster)")
            if what == "backbone" and r.ssl_backbone_pruned is not None:
                pruned = r.ssl_backbone_pruned
                med, lo, hi = median_range(pruned.seconds)
                lines.append(f"   {pruned.label:30s} {med:9.3f} {lo:8.3f} - {hi:6.3f} {pruned.total_flops / 1e9:11.2f}")
                lines.append(f"    the [CLS] forward as shipped (model.prune_last_block: the last block on the "
                             f"[CLS] tokens only): timm/ssl_vit time = {theirs.median / med:.3f}; not in the ratio line")
        changed = ", ".join(f"{k} {v:.0%}" for k, v in r.changed.items())
        lines.append(f"    parameters changed by the run: {changed}")
        lines.append(f"    loss after the run: ssl_vit {r.losses.get('ssl_vit', float('nan')):.4f}, "
                     f"lightly {r.losses.get('lightly', float('nan')):.4f} (different initialisations)")
    return "\n".join(lines)


def min_ratios(results: list[ConfigResult]) -> tuple[float, float]:
    """(min lightly/ssl_vit step-time ratio, min timm/ssl_vit backbone-time ratio) over every
    configuration and precision run; nan where nothing was measured."""
    steps = [r.step_ratio for c in results for r in c.results]
    backbones = [r.backbone_ratio for c in results for r in c.results if r.backbone_ratio is not None]
    return (min(steps) if steps else math.nan), (min(backbones) if backbones else math.nan)


def ratio_line(x: float, y: float) -> str:
    return f"ratio ssl_vit/lightly={x:.3f} backbone ssl_vit/timm={y:.3f}"


def parse_ratio_line(text: str) -> tuple[float, float]:
    """The (x, y) of the last line of a run's output."""
    last = text.strip().splitlines()[-1]
    match = RATIO_LINE.match(last)
    if not match:
        raise ValueError(f"the output does not end with a ratio line: {last!r}")
    return float(match["x"]), float(match["y"])
