"""DINOv2 training-step speed: ssl_vit through a Lightning Trainer beside a step built from lightly.

    python benchmarks/step_speed.py                                   # the full run (both configurations)
    python benchmarks/step_speed.py --configs cpu --steps 1 --warmup 1 --matmul-size 1024   # a quick check

For each configuration (``--configs``) and precision (``--precisions``; ``auto``: fp32, plus bf16
autocast where the CPU has native bf16, AMX or AVX512-BF16) the script times, alternating in one
process (reference, ssl_vit, reference, ssl_vit, ...), on the same pre-collated batches held in
memory (no data loading is timed):

* **ssl_vit**: the DINOv2 method and data module built by ``ssl_vit.build`` from the composed
  Hydra config, trained by the Trainer of ``ssl_vit.build.build_trainer`` (the callbacks, CSV
  logger and precision plugin of a user's run; k-NN, pictures and progress bar off, and the
  checkpoint callback removed: it writes nothing during these steps, only at the end). One step
  is the time from the end of the reference step run in this benchmark's first
  ``on_train_batch_start`` hook to that hook of the next batch: all callbacks' batch hooks, the
  training step (teacher and student forward, losses, monitoring and logging), backward,
  clipping, AdamW, the EMA teacher and loss centers, the logger, Lightning's loop, and fetching
  the next in-memory batch. The Trainer runs one extra, untimed step at the end to close the
  last interval.
* **lightly**: the same step assembled from lightly's components in a plain PyTorch loop, after
  lightly's own DINOv2 benchmark (``benchmarks/imagenet/vitb16/dinov2.py`` of lightly): a timm
  ``VisionTransformer`` of the same size wrapped in ``MaskedVisionTransformerTIMM``,
  ``DINOv2ProjectionHead``, ``DINOLoss``, ``IBOTPatchLoss``, ``KoLeoLoss``, AdamW with
  lightly's per-parameter groups (layer-wise lr decay, patch-embed multiplier, no decay on
  biases / norms), one global gradient-norm clip, and the EMA by ``update_momentum``. Timed: the
  lr / weight-decay update, forward, backward, clipping, AdamW, zero_grad and EMA.
* **backbones**: forward + backward (loss: mean square of the [CLS] output) of ssl_vit's
  ``VisionTransformer`` (every token through the last block, as timm computes) and of timm's ``VisionTransformer`` as shipped (its defaults, only the
  size set) on ``data.batch_size`` global crops.

Both steps get the same model size, crops, batch, prototypes, masks (the project's collator:
same masking ratio), precision and thread count; neither uses ``torch.compile``. Both run with
the CPU allocator an ssl_vit run sets up (``--cpu-allocator``, default ``reuse``: see
``ssl_vit/cpu_memory.py``; it speeds both sides alike, so the ratios compare the steps' code). The first step
of each side is run under ``torch.utils.flop_counter.FlopCounterMode`` (CPU attention kernels
registered) and is not timed; then ``--warmup`` and ``--steps`` steps. ssl_vit's step skips
the last block's work for the tokens no loss reads (``model.prune_last_block``, the default) and,
with drop path, the residual branches of the samples it drops (DINOv2's subset law,
``model.drop_path_law``), so its count is lower; the check that both sides do the same work
before those savings counts one more, untimed, bare ssl_vit step with
``model.prune_last_block=false model.drop_path_law=bernoulli``. Medians and min-max are
printed, with the GFLOP/s reached against the machine's matrix-product ceiling (a large
``torch.mm``, fp32 and, where native, bf16). The last line is

    ratio ssl_vit/lightly=<x> backbone ssl_vit/timm=<y>

with x = lightly step time / ssl_vit step time and y = timm time / ssl_vit backbone time (> 1:
ssl_vit faster), each the minimum over the configurations and precisions run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import logging
import math
import re
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import ssl_vit  # noqa: F401  (first: it enables huge pages for large CPU blocks before Lightning allocates)
import lightning as L
import torch

BENCH_DIR = Path(__file__).resolve().parent
CONF = str(BENCH_DIR.parent / "conf")

# Every configuration composes train.yaml (experiment=cpu, method=dinov2) with these overrides:
# synthetic images (the step only sees pre-collated tensors of the configured shapes), the CPU,
# no k-NN / pictures / progress bar.
BASE_OVERRIDES = [
    "data=synthetic", "data.num_workers=0", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
    "eval.knn_every_n_steps=0", "eval.final_knn=false", "eval.pictures.every_n_steps=0", "logger=csv",
]


@dataclass(frozen=True)
class Config:
    title: str
    overrides: tuple[str, ...]


VIT_SMALL = ("model=vit_small", "method.crops.global_size=224", "method.crops.local_size=96", "method.crops.n_local=8",
             "method.head.out_dim=65536", "method.head.hidden_dim=2048", "method.head.bottleneck_dim=256",
             "data.batch_size=16")
CONFIGS: dict[str, Config] = {
    # The model of lightly's own DINOv2 benchmark: LayerScale 1e-5, the student's drop path 0.1 in
    # every block (each side draws it its own way: timm's per-sample masks on every sample, ssl_vit
    # DINOv2's subsets with the branches computed on the kept samples only).
    "vit_small": Config("ViT-S/16 as in lightly's DINOv2 benchmark (LayerScale 1e-5, drop path 0.1 uniform), "
                        "2x224 + 8x96 crops, batch 16, 65,536 prototypes", VIT_SMALL + (
                            "model.init_values=1e-5", "model.drop_path_rate=0.1", "model.drop_path_uniform=true")),
    # The configuration of the earlier runs (docs/benchmarks.md): no LayerScale, no drop path.
    "vit_small_plain": Config("ViT-S/16 without LayerScale or drop path, 2x224 + 8x96 crops, batch 16, "
                              "65,536 prototypes", VIT_SMALL),
    "cpu": Config("the CPU preset of the default run (experiment=cpu, model=vit_cpu) with its default crops", ()),
    # Not in the default set: a model small enough for the test and for checking that the script runs.
    "tiny": Config("a tiny smoke-test model (not a measurement)", (
        "model.depth=2", "model.embed_dim=64", "model.num_heads=2", "data.batch_size=4", "method.crops.n_local=2",
        "method.head.out_dim=128", "method.head.hidden_dim=64", "method.head.bottleneck_dim=32",
    )),
}
DEFAULT_CONFIGS = ("vit_small", "cpu")
LIGHTNING_PRECISION = {"fp32": "32", "bf16": "bf16-mixed"}
RATIO_LINE = re.compile(r"^ratio ssl_vit/lightly=(?P<x>\S+) backbone ssl_vit/timm=(?P<y>\S+)$")


# ---------------------------------------------------------------------------------------------- helpers
def _sibling(name: str):
    """A module of benchmarks/ (not a package) by file name."""
    spec = importlib.util.spec_from_file_location(f"_ssl_vit_benchmarks_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_flops = _sibling("flops")  # FLOP counting with the CPU attention kernels registered
count_flops, flop_counter, flops_by_op = _flops.count_flops, _flops.flop_counter, _flops.flops_by_op
_reference = _sibling("lightly_dinov2")  # the lightly-built DINOv2 step
_train_step = _sibling("train_step")  # the bare ssl_vit step (no Trainer)
LightlyDINOv2, timm_vit = _reference.LightlyDINOv2, _reference.timm_vit


def cpu_description() -> tuple[str, list[str]]:
    """The CPU's model name and which of its bf16 / vector flags are present (/proc/cpuinfo)."""
    name, flags = "unknown CPU", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown CPU":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    shown = [f for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2") if f in flags]
    return name, shown


def native_bf16() -> bool:
    from ssl_vit.precision import cpu_has_fast_bf16

    return cpu_has_fast_bf16()


def resolve_precisions(spec: str) -> tuple[list[str], list[str]]:
    """``--precisions`` -> (precisions to run, notes on those skipped). ``auto``: fp32, plus bf16
    where it is native; an emulated bf16 (AVX2 CPUs) is never run (minutes per step)."""
    wanted = ["fp32", "bf16"] if spec == "auto" else [p.strip() for p in spec.split(",") if p.strip()]
    for p in wanted:
        if p not in LIGHTNING_PRECISION:
            raise SystemExit(f"--precisions: {p!r} is not one of auto, fp32, bf16")
    run, notes = [], []
    for p in dict.fromkeys(wanted):
        if p == "bf16" and not native_bf16():
            if spec != "auto":
                notes.append("bf16 skipped: this CPU emulates bf16 (no AMX / AVX512-BF16); it would take minutes")
            continue
        run.append(p)
    return run, notes


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def median_range(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def param_checksums(module: torch.nn.Module) -> list[float]:
    with torch.no_grad():
        return [float(p.detach().double().sum()) for p in module.parameters()]


def changed_fraction(before: list[float], after: list[float]) -> float:
    return sum(b != a for b, a in zip(before, after)) / max(len(before), 1)


# ---------------------------------------------------------------------------------------------- config and data
def compose_config(name: str, precision: str = "fp32", extra: tuple[str, ...] = ()):
    """The composed training config of configuration ``name`` at ``precision`` (fp32 | bf16)."""
    from hydra import compose, initialize_config_dir

    from ssl_vit.build import validate  # importing ssl_vit.build also registers the config schemas

    overrides = [*BASE_OVERRIDES, *CONFIGS[name].overrides, f"trainer.precision={LIGHTNING_PRECISION[precision]}",
                 *extra]
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose(config_name="train", overrides=overrides)
    validate(cfg)
    if cfg.method.name != "dinov2":
        raise SystemExit(f"configuration {name}: method={cfg.method.name}, this benchmark times DINOv2")
    return cfg


def collated_batches(cfg, n: int):
    """The data module of ``cfg`` and its first ``n`` training batches (the real multi-crop
    pipeline and mask collator), held in memory, finished as the Trainer finishes them
    (``data.batched_augmentation``): both sides get the same float crops and no augmentation is timed."""
    from ssl_vit.build import build_datamodule

    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = iter(datamodule.train_dataloader())
    return datamodule, [datamodule.on_after_batch_transfer(next(loader), 0) for _ in range(n)]


class InMemoryBatches(torch.utils.data.Dataset):
    """``length`` items cycling over pre-collated batches (a DataLoader with batch_size=None)."""

    def __init__(self, batches: list[dict], length: int):
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.batches[index % len(self.batches)]


def describe(cfg, batches: list[dict]) -> str:
    m, crops, head = cfg.model, cfg.method.crops, cfg.method.head
    masks = torch.cat([b["masks"] for b in batches])
    masked_crops = (masks.sum(1) > 0).float().mean().item()
    ratio = (masks.sum(1)[masks.sum(1) > 0].float() / masks.shape[1]).mean().item() if masks.any() else 0.0
    return (f"{m.name}: {m.embed_dim} wide, depth {m.depth}, {m.num_heads} heads, patch {m.patch_size}; "
            f"batch {cfg.data.batch_size}, 2x{crops.global_size} + {crops.n_local}x{crops.local_size} crops, "
            f"head {head.hidden_dim}-{head.bottleneck_dim}-{head.out_dim:,} prototypes; masks: "
            f"{masked_crops:.0%} of global crops, {ratio:.1%} of their patches on average")


# ---------------------------------------------------------------------------------------------- lightly reference
# (LightlyDINOv2, timm_vit: benchmarks/lightly_dinov2.py)


# ---------------------------------------------------------------------------------------------- the alternation
class Alternate(L.Callback):
    """First callback of the ssl_vit Trainer: before each of the first ``n`` Trainer steps it
    runs (and times) one reference step; it times each Trainer step from the end of that
    reference step to the start of the next batch's hooks. Step 0 of each side is run under a
    FLOP counter and not timed."""

    def __init__(self, reference: LightlyDINOv2, n: int):
        self.reference, self.n = reference, n
        self.ssl_s: list[float] = []
        self.ref_s: list[float] = []
        self.ssl_flops: dict[str, int] = {}
        self.ref_flops: dict[str, int] = {}
        self.last_ref_loss: torch.Tensor | None = None
        self.threads: int | None = None  # torch's thread count inside the Trainer's loop
        self._index = 0
        self._t0: float | None = None
        self._counter = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._t0 is not None:
            self.ssl_s.append(now - self._t0)
            self._t0 = None
        i = self._index
        self.threads = torch.get_num_threads()
        if i < self.n:
            if i == 0:
                self.ref_flops = count_flops(lambda: self.reference.step(batch))
            else:
                start = time.perf_counter()
                self.last_ref_loss = self.reference.step(batch)
                self.ref_s.append(time.perf_counter() - start)
            if i == 0:
                self._counter = flop_counter()
                self._counter.__enter__()
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.ssl_flops = flops_by_op(self._counter)
            self._counter = None
        self._index += 1


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
class ConfigResult:
    name: str
    description: str
    results: list[PrecisionResult]


def time_steps(cfg, datamodule, batches: list[dict], precision: str, warmup: int, steps: int,
               out_dir: str) -> PrecisionResult:
    """The ssl_vit Trainer and the lightly reference, alternating (see :class:`Alternate`)."""
    from lightning.pytorch.callbacks import ModelSummary

    from ssl_vit.build import build_method, build_trainer
    from ssl_vit.callbacks import LastCheckpoint

    bf16 = precision == "bf16"
    n = 1 + warmup + steps  # FLOP-counted + warm-up + timed, per side
    L.seed_everything(cfg.seed, verbose=False)
    method = build_method(cfg, datamodule)  # its schedules planned over the configured run
    reference = LightlyDINOv2(cfg, bf16)
    trainer_cfg = copy.deepcopy(cfg)
    trainer_cfg.trainer.max_steps = n + 1  # + 1 untimed step that closes the last interval
    trainer = build_trainer(trainer_cfg, Path(out_dir), datamodule, knn=False)
    # Out: the checkpoint callback (writes only at the end of these short fits) and the model summary (printed once).
    trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, (LastCheckpoint, ModelSummary))]
    alternate = Alternate(reference, n)
    trainer.callbacks.insert(0, alternate)
    loader = torch.utils.data.DataLoader(InMemoryBatches(batches, n + 1), batch_size=None, shuffle=False)

    before = {"ssl_vit student": param_checksums(method.student), "ssl_vit teacher": param_checksums(method.teacher),
              "lightly student": param_checksums(reference.student),
              "lightly teacher": param_checksums(reference.teacher)}
    trainer.fit(method, train_dataloaders=loader)
    if len(alternate.ssl_s) != n or len(alternate.ref_s) != n - 1:
        raise RuntimeError(f"the Trainer ran {len(alternate.ssl_s)} timed steps, expected {n}")
    if alternate.threads != torch.get_num_threads():  # both sides run in the Trainer's loop: a change hits both
        print(f"    note: torch used {alternate.threads} threads inside the Trainer, {torch.get_num_threads()} outside")
    after = {"ssl_vit student": param_checksums(method.student), "ssl_vit teacher": param_checksums(method.teacher),
             "lightly student": param_checksums(reference.student),
             "lightly teacher": param_checksums(reference.teacher)}
    last_ref = alternate.last_ref_loss
    losses = {"ssl_vit": float(trainer.callback_metrics.get("loss", float("nan"))),
              "lightly": float("nan") if last_ref is None else float(last_ref)}
    return PrecisionResult(
        precision,
        Timing("ssl_vit step (Trainer)", alternate.ssl_s[1 + warmup:], alternate.ssl_flops),
        Timing("lightly step (plain loop)", alternate.ref_s[warmup:], alternate.ref_flops),
        changed={k: changed_fraction(before[k], after[k]) for k in before},
        losses=losses,
    )


def unpruned_step_flops(cfg, datamodule, batch: dict, precision: str) -> dict[str, int]:
    """FLOPs by op of one bare ssl_vit step (``train_step.optimisation_step``) of ``cfg`` with
    ``model.prune_last_block=false`` and ``model.drop_path_law=bernoulli``: the work the peers do,
    for the FLOP agreement."""
    from ssl_vit.build import build_method

    unpruned = copy.deepcopy(cfg)
    unpruned.model.prune_last_block = False
    unpruned.model.drop_path_law = "bernoulli"  # every sample through every branch, as the peers compute it
    method = build_method(unpruned, datamodule)
    method.log = method.log_dict = lambda *args, **kwargs: None  # no Trainer attached
    optimizer = method.configure_optimizers()
    return count_flops(lambda: _train_step.optimisation_step(method, optimizer, batch, 0, "cpu", precision == "bf16"))


def time_backbones(cfg, images: torch.Tensor, precision: str, warmup: int,
                   steps: int) -> tuple[Timing, Timing, Timing]:
    """Forward+backward of ssl_vit's VisionTransformer (every token through the last block, as
    timm), timm's, and ssl_vit's as shipped (the [CLS] output computed with the last block
    pruned), alternating."""
    from ssl_vit.config import build_backbone_from_config

    bf16 = precision == "bf16"
    torch.manual_seed(cfg.seed)
    # The architecture timm ships at this size: no LayerScale, no drop path.
    plain = copy.deepcopy(cfg.model)
    plain.init_values, plain.drop_path_rate = None, 0.0
    ours = build_backbone_from_config(plain).train()
    ours.set_attention_kernel(cfg.model.attention)  # as the training run sets it
    ours.set_last_block_pruning(False)  # timm's work: every token through the last block
    shipped = copy.deepcopy(ours)
    shipped.set_last_block_pruning(True)
    nets = {"ssl_vit backbone fwd+bwd": ours, "timm backbone fwd+bwd": timm_vit(cfg.model).train(),
            "ssl_vit backbone, pruned": shipped}

    def step(net) -> None:
        net.zero_grad(set_to_none=True)
        with autocast(bf16):
            out = net(images)
        out.float().square().mean().backward()

    flops = {label: count_flops(lambda net=net: step(net)) for label, net in nets.items()}
    times: dict[str, list[float]] = {label: [] for label in nets}
    for i in range(warmup + steps):
        for label, net in nets.items():
            start = time.perf_counter()
            step(net)
            if i >= warmup:
                times[label].append(time.perf_counter() - start)
    return tuple(Timing(label, times[label], flops[label]) for label in nets)  # type: ignore[return-value]


def analytic_backbone_flops(model_cfg, images: int) -> float:
    """3x the forward FLOPs of the blocks (``forward_flops`` of benchmarks/backbone.py)."""
    tokens = 1 + (model_cfg.img_size // model_cfg.patch_size) ** 2 + model_cfg.num_register_tokens
    hidden = int(model_cfg.embed_dim * model_cfg.mlp_ratio)
    return 3 * images * _sibling("backbone").forward_flops(model_cfg.depth, model_cfg.embed_dim, tokens, hidden)


def matmul_ceiling(n: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """GFLOP/s of the best of ``repeats`` n x n x n products (after one warm-up)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def run_config(name: str, precisions: list[str], warmup: int, steps: int, n_batches: int, backbone: bool,
               extra: tuple[str, ...] = ()) -> ConfigResult:
    cfg = compose_config(name, "fp32", extra)
    datamodule, batches = collated_batches(cfg, n_batches)
    results = []
    with tempfile.TemporaryDirectory(prefix="step_speed_") as out_dir:
        for precision in precisions:
            cfg = compose_config(name, precision, extra)
            print(f"  [{name} {precision}] timing the steps ...", flush=True)
            result = time_steps(cfg, datamodule, batches, precision, warmup, steps, f"{out_dir}/{precision}")
            if cfg.model.prune_last_block or cfg.model.drop_path_rate:  # ssl_vit skips work: count what it skips
                result.unpruned_step_flops = unpruned_step_flops(cfg, datamodule, batches[0], precision)
            if backbone:
                print(f"  [{name} {precision}] timing the backbones ...", flush=True)
                images = batches[0]["global_crops"][: cfg.data.batch_size]
                result.ssl_backbone, result.timm_backbone, result.ssl_backbone_pruned = time_backbones(
                    cfg, images, precision, warmup, steps)
                result.analytic_backbone_flops = analytic_backbone_flops(cfg.model, images.shape[0])
            results.append(result)
    return ConfigResult(name, describe(cfg, batches), results)


# ---------------------------------------------------------------------------------------------- report
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
    lines = [f"== {result.name}: {CONFIGS[result.name].title}", f"   {result.description}"]
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


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated, of {', '.join(CONFIGS)} (default: %(default)s)")
    parser.add_argument("--precisions", default="auto",
                        help="auto (fp32, plus bf16 where native), fp32, bf16 or fp32,bf16 (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per side, after the FLOP-counted "
                        "one (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, here "
                        f"{torch.get_num_threads()})")
    parser.add_argument("--batches", type=int, default=2, help="distinct pre-collated batches, cycled "
                        "(default: %(default)s)")
    parser.add_argument("--matmul-size", type=int, default=4096, help="n of the n x n x n ceiling product; 0: skip "
                        "(default: %(default)s)")
    parser.add_argument("--no-backbone", action="store_true", help="skip the backbone forward+backward timing")
    parser.add_argument("--flop-tolerance", type=float, default=0.03, help="relative FLOP difference accepted "
                        "(default: %(default)s)")
    parser.add_argument("--cpu-allocator", default="reuse", choices=("reuse", "system"),
                        help="the process's CPU allocator, for both sides (ssl_vit.train's cpu_allocator; "
                        "default: %(default)s, as an ssl_vit run)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra Hydra override for every configuration (repeatable)")
    args = parser.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in args.configs:
        if c not in CONFIGS:
            parser.error(f"--configs: unknown {c!r}; available: {', '.join(CONFIGS)}")
    if args.steps < 1 or args.warmup < 0 or args.batches < 1:
        parser.error("--steps >= 1, --warmup >= 0 and --batches >= 1")
    return args


def quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "ssl_vit"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (r".*does not have many workers.*", r".*torch.nn.utils.weight_norm.*", r".*in eval mode.*",
                    r".*warm-up of .* is longer than the planned run.*", r".*LeafSpec.*", r".*isinstance\(treespec.*",
                    r".*smaller than the logging interval.*", r".*srun. command is available.*"):
        warnings.filterwarnings("ignore", message=message)


def main(argv: list[str] | None = None) -> list[ConfigResult]:
    args = parse_args(argv)
    with warnings.catch_warnings():  # the filters stay inside this run (tests call main)
        quiet()
        return run(args)


def run(args) -> list[ConfigResult]:
    from ssl_vit.cpu_memory import use_cpu_allocator

    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = use_cpu_allocator(args.cpu_allocator)  # process-wide: both sides run with it
    precisions, notes = resolve_precisions(args.precisions)
    import lightly
    import timm

    cpu, flags = cpu_description()
    print(f"CPU: {cpu}; flags: {' '.join(flags) or 'none of amx_bf16 avx512_bf16 avx512f avx2'}; "
          f"native bf16: {native_bf16()}")
    print(f"torch {torch.__version__}, lightly {lightly.__version__}, timm {timm.__version__}; "
          f"threads: {torch.get_num_threads()}; precisions: {', '.join(precisions) or 'none'}")
    print(f"per side: 1 FLOP-counted step, {args.warmup} warm-up, {args.steps} timed; "
          f"{args.batches} distinct pre-collated batches in memory; no torch.compile")
    print(f"CPU allocator for both sides: {args.cpu_allocator} ({allocator})")
    for note in notes:
        print(note)
    if not precisions:
        raise SystemExit("no precision to run")

    ceilings: dict[str, float] = {}
    if args.matmul_size:
        for precision in precisions:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            ceilings[precision] = matmul_ceiling(args.matmul_size, dtype)
        print("matmul ceiling (" + f"{args.matmul_size}^3, best of 3): " +
              ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in ceilings.items()))

    results = []
    for name in args.configs:
        result = run_config(name, precisions, args.warmup, args.steps, args.batches, not args.no_backbone,
                            tuple(args.override))
        print(format_table(result, ceilings, args.flop_tolerance), flush=True)
        results.append(result)
    x, y = min_ratios(results)
    print(ratio_line(x, y), flush=True)
    return results


if __name__ == "__main__":
    main()
