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
  ``VisionTransformer`` (every token through the last block, as timm computes) and of timm's
  ``VisionTransformer`` as shipped (its defaults, only the size set) on ``data.batch_size`` global
  crops.

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
import logging
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import ssl_vit  # noqa: F401  (first: it enables huge pages for large CPU blocks before Lightning allocates)
import torch

BENCH_DIR = Path(__file__).resolve().parent
CONF = str(BENCH_DIR.parent / "conf")
sys.path.insert(0, str(BENCH_DIR))
# The sibling scripts that time the steps and print the results (re-exported for the tests).
from step_speed_report import (  # noqa: E402
    FLASH_BACKWARD, ConfigResult, PrecisionResult, Timing, flash_recompute_flops, flop_agreement, format_table,
    min_ratios, parse_ratio_line, ratio_line,
)
from step_speed_timing import (  # noqa: E402
    analytic_backbone_flops, matmul_ceiling, time_backbones, time_steps, unpruned_step_flops,
)

__all__ = ["FLASH_BACKWARD", "ConfigResult", "PrecisionResult", "Timing", "flash_recompute_flops", "flop_agreement",
           "main", "min_ratios", "parse_ratio_line", "ratio_line", "resolve_precisions"]

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


def describe(cfg, batches: list[dict]) -> str:
    m, crops, head = cfg.model, cfg.method.crops, cfg.method.head
    masks = torch.cat([b["masks"] for b in batches])
    masked_crops = (masks.sum(1) > 0).float().mean().item()
    ratio = (masks.sum(1)[masks.sum(1) > 0].float() / masks.shape[1]).mean().item() if masks.any() else 0.0
    return (f"{m.name}: {m.embed_dim} wide, depth {m.depth}, {m.num_heads} heads, patch {m.patch_size}; "
            f"batch {cfg.data.batch_size}, 2x{crops.global_size} + {crops.n_local}x{crops.local_size} crops, "
            f"head {head.hidden_dim}-{head.bottleneck_dim}-{head.out_dim:,} prototypes; masks: "
            f"{masked_crops:.0%} of global crops, {ratio:.1%} of their patches on average")


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
    return ConfigResult(name, describe(cfg, batches), results, CONFIGS[name].title)


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
