"""Model-FLOPs utilisation (MFU) and peak memory of the DINOv2 training step on a GPU.

    python benchmarks/gpu_utilisation.py                              # the settings below, bf16
    python benchmarks/gpu_utilisation.py --settings vit_base --batch 32 --steps 10
    python benchmarks/gpu_utilisation.py --settings tiny --peak-tflops 0.4   # a check on the CPU

Each setting runs in a fresh subprocess (its own peak memory): the optimisation step that
``benchmarks/train_step.py`` times (teacher and student forward, losses, backward, clipping, fused
AdamW, EMA and centers) on one batch of the real multi-crop pipeline, bf16 autocast on a GPU.

* **Model FLOPs** per step: counted by ``torch.utils.flop_counter`` on a step of the same
  batch. With activation checkpointing the count includes the blocks' recomputation, which is
  work the hardware does, not the model: it is measured at a small batch (``--count-batch``) as
  the count with checkpointing minus the count without, scaled to the batch (the recomputed
  forward is linear in it) and subtracted. (Counting at the full batch without checkpointing
  would not fit in memory for ViT-L.)
* **Step time**: the mean of ``--steps`` steps after ``--warmup``, the device synchronised around
  them.
* **Peak memory**: ``torch.cuda.max_memory_allocated`` over the timed steps (on the CPU: the
  process's ``ru_maxrss``), beside the memory held before them (weights, AdamW state, batch).
* **MFU** = model FLOPs / step time / the device's peak dense bf16 rate: ``--peak-tflops``, or by
  the device's name (H100 and H200: 989.4 TFLOP/s, NVIDIA's dense bf16 figure for the SXM parts).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER_CROPS = ["method.crops.global_size=224", "method.crops.local_size=96", "method.crops.n_local=8",
               "method.head.out_dim=65536", "method.head.hidden_dim=2048", "method.head.bottleneck_dim=256"]
SETTINGS = {
    "vit_base": ["model=vit_base"] + PAPER_CROPS,
    "vit_large_checkpointed": ["model=vit_large", "model.activation_checkpointing=true"] + PAPER_CROPS,
    # A check that the script runs (not a measurement).
    "tiny": ["model=vit_cpu", "model.depth=2", "method.crops.n_local=2", "method.head.out_dim=256"],
}
DEFAULT_SETTINGS = ("vit_base", "vit_large_checkpointed")
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4}  # dense, SXM


def peak_tflops_of(device_name: str) -> float | None:
    return next((rate for key, rate in PEAK_BF16_TFLOPS.items() if key in device_name), None)


def count_step_flops(overrides: list[str], batch: int, device) -> int:
    """FLOPs of one optimisation step at ``batch`` (the first batch of the setting's data)."""
    import torch
    from flops import count_flops
    from train_step import optimisation_step, prepared_step

    from ssl_vit.precision import resolve_precision

    cfg, _, method, optimizer, prepared = prepared_step(overrides + [f"data.batch_size={batch}"], device)
    bf16 = "bf16" in resolve_precision(cfg.trainer.precision, device.type)
    flops = sum(count_flops(lambda: optimisation_step(method, optimizer, prepared, 0, device.type, bf16)).values())
    del method, optimizer, prepared
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return flops


def model_flops(overrides: list[str], batch: int, count_batch: int, checkpointing: bool, device) -> float:
    """Model FLOPs of a step at ``batch``: the counted FLOPs less, with activation checkpointing,
    the recomputation (measured at ``count_batch`` and scaled to ``batch``)."""
    counted = count_step_flops(overrides, batch, device)
    if not checkpointing:
        return counted
    recomputed = (count_step_flops(overrides, count_batch, device)
                  - count_step_flops(overrides + ["model.activation_checkpointing=false"], count_batch, device))
    return counted - recomputed * batch / count_batch


def child(overrides: list[str], batch: int, count_batch: int, warmup: int, steps: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_step import optimisation_step, prepared_step

    from ssl_vit.precision import resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, _, method, optimizer, prepared = prepared_step(overrides + [f"data.batch_size={batch}"], device)
    bf16 = "bf16" in resolve_precision(cfg.trainer.precision, device.type)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for step in range(warmup):
        optimisation_step(method, optimizer, prepared, step, device.type, bf16)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
        optimisation_step(method, optimizer, prepared, step, device.type, bf16)
    sync()
    step_s = (time.perf_counter() - start) / steps
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    # Counted after the timing, with the timed step's memory freed (the counts build their own).
    del method, optimizer, prepared
    if device.type == "cuda":
        torch.cuda.empty_cache()
    checkpointing = bool(cfg.model.activation_checkpointing)
    flops = model_flops(overrides, batch, count_batch, checkpointing, device)
    crops = cfg.method.crops
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "model": cfg.model.name, "checkpointing": checkpointing,
            "precision": "bf16" if bf16 else "fp32", "batch": batch,
            "crops": f"2x{crops.global_size} + {crops.n_local}x{crops.local_size}", "prototypes": cfg.method.head.out_dim,
            "model_gflop_per_step": flops / 1e9,
            "step_s": step_s, "memory_before_mib": before, "peak_mib": peak}


def report(result: dict, peak_tflops: float | None) -> str:
    achieved = result["model_gflop_per_step"] / result["step_s"] / 1e3  # TFLOP/s
    peak = peak_tflops or peak_tflops_of(result["device"])
    mfu = f"{achieved / peak:.1%} of {peak:g} TFLOP/s" if peak else "unknown (give --peak-tflops for this device)"
    return (f"{result['model']}{' + activation checkpointing' if result['checkpointing'] else ''}, "
            f"{result['precision']}, batch {result['batch']}, {result['crops']} crops, {result['prototypes']:,} prototypes "
            f"on {result['device']}\n"
            f"  step {result['step_s']:.3f} s ({result['batch'] / result['step_s']:.1f} images/s); model FLOPs "
            f"{result['model_gflop_per_step']:.0f} GFLOP/step -> {achieved:.3g} TFLOP/s, MFU {mfu}\n"
            f"  peak memory {result['peak_mib'] / 1024:.2f} GiB (held before the step: "
            f"{result['memory_before_mib'] / 1024:.2f} GiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                        help=f"comma-separated, of {', '.join(SETTINGS)} (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=64, help="images per step (default %(default)s)")
    parser.add_argument("--count-batch", type=int, default=4,
                        help="with checkpointing: the batch its recomputation is measured at (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak dense bf16 TFLOP/s")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if not 1 <= args.count_batch <= args.batch:
        parser.error(f"--count-batch must be between 1 and --batch={args.batch}, got {args.count_batch}")
    if args.child:
        result = child(SETTINGS[args.child] + overrides, args.batch, args.count_batch, args.warmup, args.steps)
        print("RESULT " + json.dumps(result), flush=True)
        return
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        parser.error(f"--settings: unknown {unknown}; available: {', '.join(SETTINGS)}")
    results = []
    for name in names:
        command = [sys.executable, __file__, "--child", name, "--batch", str(args.batch), "--count-batch",
                   str(args.count_batch), "--warmup", str(args.warmup), "--steps", str(args.steps), *overrides]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{name}: failed (exit code {done.returncode})\n{done.stderr[-3000:]}", flush=True)
            continue
        results.append(json.loads(lines[-1][len("RESULT "):]))
        print(report(results[-1], args.peak_tflops), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
