"""Does the default recipe learn? k-NN top-1 on Fashion-MNIST's test split after N minutes.

    python benchmarks/knn_fashion.py --methods dino dinov2 --minutes 5 10 20 40 [overrides ...]

For each method: a short calibration run measures seconds per optimizer step on this machine;
each budget then trains a fresh run planned for minutes*60/seconds_per_step steps (schedules
are laid over the planned run, as in any run). The trained teacher backbone is evaluated by
weighted k-NN (k=20, T=0.07, cosine) on the official test split with all 60k training images
as the bank, beside two floors: the same backbone at random init and the raw pixels
(32x32, standardised). Extra arguments are training overrides (tune on the validation split:
python -m ssl_vit.train prints its k-NN on it).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def train(out_dir: Path, overrides: list[str]) -> float:
    """Runs python -m ssl_vit.train; returns its wall time in seconds."""
    cmd = [sys.executable, "-m", "ssl_vit.train", f"hydra.run.dir={out_dir}", "eval.final_knn=false",
           "eval.knn_every_n_steps=0", "+trainer.enable_progress_bar=false"] + overrides
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        print(result.stdout[-3000:], result.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"training failed: {' '.join(cmd)}")
    return time.perf_counter() - start


def test_loaders(batch_size: int = 512):
    from ssl_vit.data.datamodule import SSLDataModule

    datamodule = SSLDataModule(dataset="fashion_mnist", image_size=32, eval_batch_size=batch_size)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule.knn_dataloaders("test")


def knn_of(backbone, loaders) -> float:
    from ssl_vit.callbacks.knn import knn_accuracy

    return knn_accuracy(backbone, *loaders, "cpu", autocast_dtype=torch.bfloat16)


def raw_pixel_knn(loaders) -> float:
    from ssl_vit.evaluation.knn import knn_top1

    def pixels(loader):
        xs, ys = zip(*[(images[:, 0].flatten(1), labels) for images, labels in loader])
        return torch.cat(xs), torch.cat(ys)

    return knn_top1(*pixels(loaders[0]), *pixels(loaders[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["dino", "dinov2"])
    parser.add_argument("--minutes", nargs="+", type=float, default=[5, 10, 20, 40])
    parser.add_argument("--calibration-steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "knn_fashion")
    args, overrides = parser.parse_known_args()

    import lightning as L

    import ssl_vit
    from ssl_vit.config import build_backbone_from_config
    from hydra import compose, initialize_config_dir

    loaders = test_loaders()
    results = {"raw_pixels": raw_pixel_knn(loaders), "runs": []}
    print(f"raw pixels (32x32, standardised): knn_top1={results['raw_pixels']:.4f}")
    for method in args.methods:
        base = [f"method={method}"] + overrides
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            cfg = compose(config_name="train", overrides=base)
        L.seed_everything(cfg.seed, verbose=False)
        random_init = knn_of(build_backbone_from_config(cfg.model), loaders)
        # Calibration: the same run twice as long minus once gives seconds per step without
        # the fixed start-up cost.
        short = train(args.out / f"{method}_cal1", base + [f"trainer.max_steps={args.calibration_steps}"])
        long = train(args.out / f"{method}_cal2", base + [f"trainer.max_steps={2 * args.calibration_steps}"])
        per_step = max((long - short) / args.calibration_steps, 1e-3)
        print(f"{method}: random init knn_top1={random_init:.4f}; {per_step:.2f} s per step")
        for minutes in args.minutes:
            steps = max(1, int(minutes * 60 / per_step))
            out_dir = args.out / f"{method}_{minutes:g}min"
            wall = train(out_dir, base + [f"trainer.max_steps={steps}"])
            accuracy = knn_of(ssl_vit.load_backbone(out_dir / "checkpoints" / "last.ckpt"), loaders)
            row = dict(method=method, minutes=minutes, steps=steps, wall_s=round(wall, 1),
                       knn_top1=accuracy, random_init=random_init)
            results["runs"].append(row)
            print(f"  {minutes:>4g} min ({steps} steps, {wall / 60:.1f} min wall): knn_top1={accuracy:.4f} "
                  f"({100 * (accuracy - random_init):+.1f} points over random init)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
