"""Per-image cost of the multi-crop augmentation, single-threaded (as in a DataLoader worker).

    python benchmarks/transforms.py                # MultiCropTransform
    python benchmarks/transforms.py --reference    # also the composed torchvision v2 pipeline
                                                   # (ReferenceMultiCrop: the pre-fast-path code)

Cases:

* ``fmnist_L``:   28x28 PIL 'L' image, 2 x 32 px global + 6 x 16 px local crops (the default
  CPU recipe, Fashion-MNIST normalisation);
* ``fmnist_RGB``: the same image as PIL 'RGB' with three equal channels (what the DataModule
  passes today: it converts to RGB before the transform);
* ``photo_224``:  a 256x320 photo-like RGB image (smooth colour blobs plus texture), the papers'
  setting: 2 x 224 px global + 8 x 96 px local crops, ImageNet normalisation.

Prints ms per image: the median over ``--repeats`` timed runs of ``--images`` calls each (after a
warm-up), the runs of the two implementations alternating, so that a busy machine skews the
numbers and their ratio less. To time an older version of the module (e.g. git HEAD), run this
script with that version first on ``PYTHONPATH``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import List

import numpy as np
import torch
from PIL import Image

from ssl_vit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, MultiCropTransform

try:  # the composed torchvision pipeline the fast path is tested against
    from ssl_vit.data.transforms import ReferenceMultiCrop
except ImportError:  # pragma: no cover - older versions of the module
    ReferenceMultiCrop = None

FMNIST_MEAN, FMNIST_STD = (0.2860,) * 3, (0.3530,) * 3


def photo_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random colour field plus fine texture, uint8 (h, w, 3)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // 16, w // 16, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    texture = 0.08 * torch.randn(1, 3, h, w, generator=g)
    img = (smooth + texture).clamp(0, 1)[0].permute(1, 2, 0).mul(255).round().to(torch.uint8)
    return img.numpy()


def cases():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    small = dict(global_size=32, local_size=16, n_local=6, mean=FMNIST_MEAN, std=FMNIST_STD)
    big = dict(global_size=224, local_size=96, n_local=8, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return [
        ("fmnist_L", small, Image.fromarray(gray, mode="L")),
        ("fmnist_RGB", small, Image.fromarray(gray, mode="L").convert("RGB")),
        ("photo_224", big, Image.fromarray(photo_like(256, 320), mode="RGB")),
    ]


def time_per_image(fns, img, n_images: int, repeats: int) -> List[float]:
    """ms per image of each callable; the timed runs alternate between them, so that a change
    in the machine's load affects them alike."""
    for fn in fns:
        for _ in range(max(2, n_images // 5)):
            fn(img)
    runs: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, r in zip(fns, runs):
            t0 = time.perf_counter()
            for _ in range(n_images):
                fn(img)
            r.append((time.perf_counter() - t0) / n_images)
    return [1e3 * statistics.median(r) for r in runs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100, help="calls per timed run (224 px: a fifth)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--reference", action="store_true", help="also time the composed v2 pipeline")
    ap.add_argument("--only", default=None, help="comma-separated case names")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    only = set(args.only.split(",")) if args.only else None
    print(f"torch {torch.__version__}, 1 thread; ms per image (median of {args.repeats} runs)")
    for name, kwargs, img in cases():
        if only and name not in only:
            continue
        n = args.images if name.startswith("fmnist") else max(1, args.images // 5)
        t = MultiCropTransform(**kwargs)
        fns = [t]
        if args.reference and ReferenceMultiCrop is not None:
            fns.append(ReferenceMultiCrop(t))
        times = time_per_image(fns, img, n, args.repeats)
        line = f"{name:12s} MultiCropTransform {times[0]:8.3f} ms"
        if len(times) > 1:
            line += f"   v2 composition {times[1]:8.3f} ms   speed-up {times[1] / times[0]:5.1f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
