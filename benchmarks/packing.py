"""Packed vs unpacked multi-crop forward (``model.pack_crops``): which is faster on this machine?

    python benchmarks/packing.py [--steps 7] [--settings cpu vits16] [--precisions fp32 bf16]

For each setting and precision, one DINOv2 method on one fixed batch from the real multi-crop
pipeline runs full optimisation steps (``train_step.optimisation_step``: forward, backward,
clipping, AdamW, EMA) with its backbones packed and unpacked in turn, step by step, so that
both see the same machine state; the first two steps of each side are warm-up. Prints the
median and min-max step time per side and the ratio unpacked / packed (> 1: packing is faster).

Settings (``step_speed.py``'s): ``cpu``: the default run (CPU preset, batch 32, 2 x 24 px + 6 x
12 px crops); ``vit_small``: ViT-S/16, batch 16, 2 x 224 px + 8 x 96 px crops, 65,536 prototypes;
``tiny``: a smoke test. bf16 runs only where the CPU has it natively (or on CUDA). Keep the
machine otherwise idle.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_speed import CONFIGS  # noqa: E402  (sibling benchmark scripts)
from train_step import optimisation_step, prepared_step  # noqa: E402

from ssl_vit.models.vision_transformer import VisionTransformer  # noqa: E402
from ssl_vit.precision import fast_bf16  # noqa: E402

SETTINGS = {name: list(CONFIGS[name].overrides) for name in ("cpu", "vit_small", "tiny")}


def set_packing(method, enable: bool) -> None:
    for module in method.modules():
        if isinstance(module, VisionTransformer):
            module.set_crop_packing(enable)


def compare(setting: str, precision: str, steps: int, device: torch.device) -> float:
    _, _, method, optimizer, batch = prepared_step(["method=dinov2"] + SETTINGS[setting], device)
    bf16 = precision == "bf16"
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(steps + 2):
        for packed in (False, True):
            set_packing(method, packed)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            optimisation_step(method, optimizer, batch, 0, device.type, bf16)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times[packed].append(time.perf_counter() - start)
    unpacked, packed = (statistics.median(times[k]) for k in (False, True))
    for name, key in (("unpacked", False), ("packed", True)):
        print(f"  {name:8s} median {statistics.median(times[key]):.3f} s  "
              f"(min {min(times[key]):.3f}, max {max(times[key]):.3f})", flush=True)
    ratio = unpacked / packed
    print(f"{setting} {precision}: unpacked / packed = {ratio:.3f}", flush=True)
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=7, help="timed steps per side (after 2 warm-up)")
    parser.add_argument("--settings", nargs="+", default=["cpu", "vit_small"], choices=list(SETTINGS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, threads {torch.get_num_threads()}, native bf16: {fast_bf16(device.type)}")
    for setting in args.settings:
        for precision in args.precisions:
            if precision == "bf16" and not fast_bf16(device.type):
                print(f"{setting} bf16: skipped (bf16 is emulated on this CPU)")
                continue
            print(f"{setting} {precision}:", flush=True)
            compare(setting, precision, args.steps, device)


if __name__ == "__main__":
    main()
