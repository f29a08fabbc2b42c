"""Peak memory of a training step per model size and crop setting, with and without activation
checkpointing (``model.activation_checkpointing``).

    python benchmarks/memory.py                          # the table of docs/benchmarks.md
    python benchmarks/memory.py --models vit_small --steps 1 trainer.precision=32
    THP_MEM_ALLOC_ENABLE=0 python benchmarks/memory.py cpu_allocator=system   # the C library's defaults

Each configuration runs in a fresh subprocess (the CPU's peak, ``ru_maxrss``, belongs to one
process's whole life): it builds the method of the composed config (DINOv2 unless ``method=`` says
otherwise), takes one batch from the real multi-crop pipeline (synthetic images of the crop
sizes) and runs ``--steps`` full optimisation steps (teacher and student forward, backward,
clipping, AdamW, EMA). On a GPU it reports ``torch.cuda.max_memory_allocated`` instead. The
memory before the first step (model, optimizer not yet stepped, batch) is printed beside the
peak, so that the step's own share (activations, gradients, AdamW's moments) can be read off.
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
# (name, overrides): the default run's crops for the CPU preset, the papers' 2x224 + 8x96 otherwise.
SETTINGS = {
    "vit_cpu": ["model=vit_cpu"],
    "vit_small": ["model=vit_small", "method.crops.global_size=224", "method.crops.local_size=96",
                  "method.crops.n_local=8", "method.head.out_dim=65536", "method.head.hidden_dim=2048",
                  "method.head.bottleneck_dim=256", "data.batch_size=16"],
    "vit_base": ["model=vit_base", "method.crops.global_size=224", "method.crops.local_size=96",
                 "method.crops.n_local=8", "method.head.out_dim=65536", "method.head.hidden_dim=2048",
                 "method.head.bottleneck_dim=256", "data.batch_size=16"],
}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(overrides: list[str], steps: int) -> dict:
    import torch

    from ssl_vit.precision import resolve_precision

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_step import optimisation_step, prepared_step  # the step benchmarks/train_step.py times

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, _, method, optimizer, batch = prepared_step(overrides, device)
    bf16 = "bf16" in resolve_precision(cfg.trainer.precision, device.type)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = peak_mib()
    start = time.perf_counter()
    for step in range(steps):
        optimisation_step(method, optimizer, batch, step, device.type, bf16)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_mib()
    return {"before_mib": before, "peak_mib": peak, "step_s": seconds, "precision": "bf16" if bf16 else "fp32",
            "device": device.type, "batch": int(cfg.data.batch_size),
            "crops": f"2x{cfg.method.crops.global_size} + {cfg.method.crops.n_local}x{cfg.method.crops.local_size}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(SETTINGS), help="settings to run (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=2, help="optimisation steps per run (default %(default)s)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.child:
        print(json.dumps(child(overrides, args.steps)))
        return
    print(f"{'model':<10}{'crops':<16}{'batch':>6}{'precision':>10}{'act. ckpt':>10}{'before MiB':>12}"
          f"{'peak MiB':>10}{'step s':>8}", flush=True)
    for name in args.models.split(","):
        for checkpointing in ("false", "true"):
            cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps), *SETTINGS[name],
                   f"model.activation_checkpointing={checkpointing}", *overrides]
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{name}: failed\n{done.stderr[-2000:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{name:<10}{r['crops']:<16}{r['batch']:>6}{r['precision']:>10}{checkpointing:>10}"
                  f"{r['before_mib']:>12.0f}{r['peak_mib']:>10.0f}{r['step_s']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
