"""Forward+backward throughput and peak memory of the backbone (optionally beside timm).

    python benchmarks/backbone.py --model vit_small --batch 16 --resolution 224 --compare-timm
    python benchmarks/backbone.py --model vit_small --init-values 1e-5 --compare-timm   # with LayerScale

Each (implementation, precision) runs in a fresh subprocess so that the CPU peak memory (max
RSS) belongs to that configuration alone. Prints one line per configuration: images/s, achieved
matmul TFLOP/s by an analytic count (3x the forward FLOPs), and peak memory.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

TIMM_NAMES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_huge": "vit_huge_patch14_224",
}


def forward_flops(depth: int, dim: int, tokens: int, hidden: int) -> float:
    """Multiply-add FLOPs (x2) of one image's forward pass through the blocks."""
    per_block = 2 * tokens * dim * 3 * dim + 2 * tokens * dim * dim  # qkv + proj
    per_block += 2 * 2 * tokens * tokens * dim  # q @ k^T and attn @ v
    per_block += 2 * 2 * tokens * dim * hidden  # the two MLP layers
    return depth * per_block


def build(impl: str, model: str, resolution: int, patch_size: int | None, init_values: float | None = None):
    import torch

    if impl == "ssl_vit":
        from ssl_vit.models import build_backbone, preset

        overrides = {"img_size": resolution}
        if patch_size:
            overrides["patch_size"] = patch_size
        if init_values:
            overrides["init_values"] = init_values
        return build_backbone(preset(model, **overrides))
    import timm

    if model not in TIMM_NAMES:
        raise SystemExit(f"--compare-timm supports {sorted(TIMM_NAMES)}, got {model!r}")
    return timm.create_model(TIMM_NAMES[model], pretrained=False, num_classes=0, img_size=resolution,
                             init_values=init_values)


def measure(args) -> dict:
    import torch

    device = torch.device(args.device)
    torch.manual_seed(0)
    net = build(args.impl, args.model, args.resolution, args.patch_size, args.init_values).to(device).train()
    images = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step():
        with autocast:
            out = net(images)
        out.float().square().mean().backward()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    images_per_s = args.batch * args.steps / elapsed

    p = net.patch_embed.patch_size
    p = p if isinstance(p, int) else p[0]
    dim = net.embed_dim
    tokens = 1 + (args.resolution // p) ** 2
    hidden = int(dim * 4)
    flops = 3 * forward_flops(len(net.blocks), dim, tokens, hidden) * images_per_s
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        peak_kind = "peak CUDA alloc"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        peak_kind = "peak RSS"
    return dict(impl=args.impl, precision=args.precision, images_per_s=images_per_s,
                tflops=flops / 1e12, peak_mib=peak, peak_kind=peak_kind, device=str(device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small", help="preset name (ssl_vit.models.PRESETS)")
    parser.add_argument("--patch-size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--compare-timm", action="store_true", help="also time timm's ViT of the same size")
    parser.add_argument("--init-values", type=float, default=None,
                        help="LayerScale with this initial value, on both sides (default: none, as the presets)")
    parser.add_argument("--impl", default=None, help=argparse.SUPPRESS)  # set for the child process
    args = parser.parse_args()

    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.impl is not None:  # child: one configuration
        print(json.dumps(measure(args)))
        return

    impls = ["ssl_vit"] + (["timm"] if args.compare_timm else [])
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    print(f"{args.model} batch {args.batch} at {args.resolution}px on {args.device}, "
          f"forward+backward, {args.steps} timed steps after {args.warmup} warm-up")
    for precision in precisions:
        for impl in impls:
            cmd = [sys.executable, __file__, "--impl", impl, "--precision", precision]
            for flag in ("model", "batch", "resolution", "steps", "warmup", "device", "patch_size", "init_values"):
                value = getattr(args, flag)
                if value is not None:
                    cmd += [f"--{flag.replace('_', '-')}", str(value)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode:
                print(result.stderr, file=sys.stderr)
                raise SystemExit(f"{impl} {precision} failed")
            r = json.loads(result.stdout.strip().splitlines()[-1])
            print(f"  {r['impl']:8s} {r['precision']:5s} {r['images_per_s']:8.2f} images/s  "
                  f"{r['tflops'] * 1000:7.1f} GFLOP/s  {r['peak_kind']} {r['peak_mib']:8.0f} MiB")


if __name__ == "__main__":
    main()
