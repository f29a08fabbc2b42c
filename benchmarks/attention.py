"""Which attention kernel is faster on this machine? (``model.attention``: sdpa | explicit)

    python benchmarks/attention.py [--reps 20] [--precisions fp32 bf16]

Times one attention layer's forward + backward (``Attention.attend`` on q, k, v of the shapes
of a training step) with torch's ``scaled_dot_product_attention`` and with the explicit
softmax(q k^T) v, alternating call by call, at the token counts of the default run (CPU preset:
6x6 and 3x3 patches + [CLS], width 192 / 3 heads) and of ViT-S/16 (14x14 and 6x6 + [CLS], width
384 / 6 heads), batches as in their steps. Prints medians and the ratio sdpa / explicit (> 1:
explicit is faster, which is what ``model.attention=auto`` assumes on the CPU). bf16 runs
only where it is native. Keep the machine otherwise idle.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ssl_vit.models.attention import Attention
from ssl_vit.precision import fast_bf16

# (title, width, heads, [(sequences, tokens), ...]) : the crop groups of one student forward
SHAPES = [
    ("CPU preset, 2x24 px + 6x12 px crops, batch 32", 192, 3, [(64, 37), (192, 10)]),
    ("ViT-S/16, 2x224 px + 8x96 px crops, batch 16", 384, 6, [(32, 197), (128, 37)]),
]


def time_kernel(attn: Attention, qkv: torch.Tensor, batch: int, tokens: int, dtype) -> float:
    qkv = qkv.detach().requires_grad_(True)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        out = attn.attend(qkv, batch, tokens, None)
    out.float().square().mean().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20, help="timed calls per kernel (after 3 warm-up)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--sweep", nargs="*", type=int, default=[17, 37, 65, 101, 145, 197, 257],
                        help="also time single groups of these token counts (width 384, 6 heads, ~6k tokens "
                             "per call) to find where the kernels cross over")
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}, native bf16: {fast_bf16('cpu')}")
    for precision in args.precisions:
        if precision == "bf16" and not fast_bf16("cpu"):
            print("bf16: skipped (emulated on this CPU)")
            continue
        dtype = torch.bfloat16 if precision == "bf16" else None
        for title, width, heads, groups in SHAPES:
            attn = Attention(width, heads)
            times = {"sdpa": [], "explicit": []}
            inputs = [(torch.randn(b * t, 3 * width).view(b, t, 3 * width), b, t) for b, t in groups]
            for rep in range(args.reps + 3):
                for kernel in times:
                    attn.kernel = kernel
                    seconds = sum(time_kernel(attn, qkv, b, t, dtype) for qkv, b, t in inputs)
                    if rep >= 3:
                        times[kernel].append(seconds)
            report(f"{precision} {title}", times)
        for tokens in args.sweep:
            attn, batch = Attention(384, 6), max(1, 6144 // tokens)
            qkv = torch.randn(batch, tokens, 3 * 384)
            times = {"sdpa": [], "explicit": []}
            for rep in range(args.reps + 3):
                for kernel in times:
                    attn.kernel = kernel
                    seconds = time_kernel(attn, qkv, batch, tokens, dtype)
                    if rep >= 3:
                        times[kernel].append(seconds)
            report(f"{precision} {tokens} tokens x {batch} sequences, width 384, 6 heads", times)


def report(title: str, times: dict[str, list[float]]) -> None:
    sdpa, explicit = (statistics.median(times[k]) for k in ("sdpa", "explicit"))
    print(f"{title}: sdpa {1e3 * sdpa:.1f} ms, explicit {1e3 * explicit:.1f} ms (fwd+bwd); "
          f"sdpa/explicit = {sdpa / explicit:.2f}", flush=True)


if __name__ == "__main__":
    main()
