"""Does the default recipe learn? k-NN top-1 on Fashion-MNIST's test split after N minutes.

    python benchmarks/knn_fashion.py --methods dino dinov2 --minutes 5 10 20 40 [overrides ...]

For each method: two short calibration runs (n and 2n steps) measure seconds per optimizer step
on this machine; each budget then trains a fresh run planned for minutes*60/seconds_per_step
steps (schedules are laid over the planned run, as in any run), and its row reports the minutes
it actually trained (``fit_seconds``), with a warning when they miss the budget by more than 5%.
Once a budget has run, the next one is planned from that run's own training time per step: a
run of minutes measures the step time better than the short calibration runs (which undershot
it by 10-25% on a 2-core machine).
The trained teacher backbone is evaluated by weighted k-NN (k=20, T=0.07, cosine) on the
official test split with all 60k training images as the bank, beside two floors: the same
backbone at random init (computed once for methods that build the same backbone from the same
seed) and the raw pixels (standardised), both at the recipe's global crop size. Extra arguments
are training overrides (tune on the validation split: python -m ssl_vit.train prints its k-NN
on it).

Budgets run shortest first, every method at one budget before the next budget. Results are
written to OUT/results.json after every run; running the same command again skips the runs
already there (a 2 x 75-minute benchmark can be spread over several sittings). It refuses to
mix results: the composed training config of each method is stored, and a later call whose
recipe differs (other overrides, or a changed default) stops with the differing keys. Keep the
machine otherwise idle: the step count of each budget comes from the measured step time.
At the end it draws OUT/knn_curve.png (k-NN against training minutes per method, with the
random-init and raw-pixel lines; ``knn_curve.py`` redraws it from a results file).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def train(out_dir: Path, overrides: list[str]) -> tuple[float, float]:
    """Runs python -m ssl_vit.train in a fresh directory; returns its wall time and its training
    time (``fit_seconds`` from metrics.json: without start-up), in seconds."""
    cmd = [sys.executable, "-m", "ssl_vit.train", f"hydra.run.dir={out_dir}", "eval.final_knn=false",
           "eval.knn_every_n_steps=0", "trainer.enable_progress_bar=false"] + overrides
    if (out_dir / "checkpoints").exists():  # an interrupted earlier attempt: start over, not resume
        shutil.rmtree(out_dir)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        print(result.stdout[-3000:], result.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"training failed: {' '.join(cmd)}")
    wall = time.perf_counter() - start
    return wall, json.loads((out_dir / "metrics.json").read_text())["fit_seconds"]


def compose_recipe(method: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="train", overrides=[f"method={method}"] + overrides)


def recipe_differences(stored: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    keys = sorted(set(stored) | set(current))
    out = []
    for key in keys:
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += recipe_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def test_loaders(image_size: int, batch_size: int = 512):
    from ssl_vit.data.datamodule import SSLDataModule

    datamodule = SSLDataModule(dataset="fashion_mnist", image_size=image_size, eval_batch_size=batch_size)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule.knn_dataloaders("test")


def knn_of(backbone, loaders) -> float:
    from ssl_vit.callbacks.knn import knn_accuracy

    from ssl_vit.precision import fast_bf16

    return knn_accuracy(backbone, *loaders, "cpu", autocast_dtype=torch.bfloat16 if fast_bf16("cpu") else None)


def raw_pixel_knn(loaders) -> float:
    from ssl_vit.evaluation.knn import knn_top1

    def pixels(loader):
        xs, ys = zip(*[(images[:, 0].flatten(1), labels) for images, labels in loader])
        return torch.cat(xs), torch.cat(ys)

    return knn_top1(*pixels(loaders[0]), *pixels(loaders[1]))


def random_init_knn(cfg, loaders) -> float:
    import lightning as L

    from ssl_vit.config import build_backbone_from_config

    L.seed_everything(cfg.seed, verbose=False)
    return knn_of(build_backbone_from_config(cfg.model), loaders)


def calibrate(method: str, overrides: list[str], out: Path, steps: int) -> float:
    """Seconds per optimizer step: the training times of the same run for 2n and n steps differ
    by n steps, without the first steps' one-off costs (worker start, first batches)."""
    base = [f"method={method}"] + overrides
    _, short = train(out / f"{method}_cal1", base + [f"trainer.max_steps={steps}"])
    _, long = train(out / f"{method}_cal2", base + [f"trainer.max_steps={2 * steps}"])
    return max((long - short) / steps, 1e-3)


def planning_seconds_per_step(calibrated: float, runs: list[dict]) -> tuple[float, str]:
    """The step time to plan the next budget of one method with, and where it comes from: the
    training seconds per step of its longest finished run (rows without ``fit_s``, carried over
    from older sittings, do not count), else the calibration."""
    measured = [r for r in runs if r.get("fit_s") and r.get("steps")]
    if not measured:
        return calibrated, "calibration"
    longest = max(measured, key=lambda r: r["steps"])
    return longest["fit_s"] / longest["steps"], f"the {longest['minutes']:g}-min run"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["dino", "dinov2"])
    parser.add_argument("--minutes", nargs="+", type=float, default=[5, 10, 20, 40])
    parser.add_argument("--calibration-steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "knn_fashion")
    args, overrides = parser.parse_known_args()

    import ssl_vit
    from omegaconf import OmegaConf

    recipes = {m: compose_recipe(m, overrides) for m in args.methods}
    sizes = {m: int(recipes[m].method.crops.global_size) for m in args.methods}
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if results and "recipes" not in results:
        raise SystemExit(f"{results_file} was written by an older version of this benchmark (no recipe "
                         "stored): use another --out")
    results.setdefault("overrides", overrides)  # for the reader; the recipes below decide what may be mixed
    results.setdefault("methods", {})
    results.setdefault("runs", [])
    results.setdefault("recipes", {})
    for method, cfg in recipes.items():
        recipe = OmegaConf.to_container(cfg, resolve=False)
        stored = results["recipes"].setdefault(method, recipe)
        if stored != recipe:
            raise SystemExit(f"{results_file} holds {method} runs of another recipe:\n  "
                             + "\n  ".join(recipe_differences(stored, recipe)) + "\nuse another --out")

    def save() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=2))

    loaders = {size: test_loaders(size) for size in set(sizes.values())}
    results.setdefault("raw_pixels", {})
    for size in loaders:
        if str(size) not in results["raw_pixels"]:
            results["raw_pixels"][str(size)] = raw_pixel_knn(loaders[size])
            save()
        print(f"raw pixels ({size}x{size}, standardised): knn_top1={results['raw_pixels'][str(size)]:.4f}",
              flush=True)
    for method in args.methods:
        if method not in results["methods"]:
            # Methods that build the same backbone from the same seed share one random-init figure.
            random_key = json.dumps([OmegaConf.to_container(recipes[method].model, resolve=True),
                                     recipes[method].seed])
            random_init = results.setdefault("random_init", {})
            if random_key not in random_init:
                random_init[random_key] = random_init_knn(recipes[method], loaders[sizes[method]])
            results["methods"][method] = {
                "random_init": random_init[random_key],
                "seconds_per_step": calibrate(method, overrides, args.out, args.calibration_steps),
                "calibration_steps": args.calibration_steps,
            }
            save()
        info = results["methods"][method]
        print(f"{method}: random init knn_top1={info['random_init']:.4f}; "
              f"{info['seconds_per_step']:.2f} s per step", flush=True)

    for minutes in sorted(args.minutes):
        for method in args.methods:
            info = results["methods"][method]
            method_runs = [r for r in results["runs"] if r["method"] == method]
            done = [r for r in method_runs if r["minutes"] == minutes]
            if not done:
                seconds_per_step, source = planning_seconds_per_step(info["seconds_per_step"], method_runs)
                steps = max(1, int(minutes * 60 / seconds_per_step))
                print(f"{method} {minutes:g} min: {steps} steps at {seconds_per_step:.3f} s per step "
                      f"(from {source})", flush=True)
                out_dir = args.out / f"{method}_{minutes:g}min"
                wall, fit = train(out_dir, [f"method={method}", f"trainer.max_steps={steps}"] + overrides)
                accuracy = knn_of(ssl_vit.load_backbone(out_dir / "checkpoints" / "last.ckpt"),
                                  loaders[sizes[method]])
                results["runs"].append(dict(method=method, minutes=minutes, steps=steps, wall_s=round(wall, 1),
                                            fit_s=fit, knn_top1=accuracy,
                                            planned_seconds_per_step=round(seconds_per_step, 4)))
                save()
                done = results["runs"][-1:]
            row = done[0]
            # Rows carried over from an earlier sitting may lack the wall time; "source" says where from.
            wall = f", {row['wall_s'] / 60:.1f} min wall" if row.get("wall_s") else ""
            if row.get("fit_s"):
                # The budget is training time (trainer.fit), not start-up.
                trained_min = row["fit_s"] / 60
                wall += f", {trained_min:.1f} min training"
                if abs(trained_min - minutes) > 0.05 * minutes:
                    print(f"warning: {method} at {minutes:g} min trained for {trained_min:.1f} min: the step time "
                          "differed from the one it was planned with (was the machine busy?); compare with care",
                          file=sys.stderr, flush=True)
            origin = f" [{row['source']}]" if row.get("source") else ""
            print(f"{method:>7} {minutes:>4g} min ({row['steps']} steps{wall}): "
                  f"knn_top1={row['knn_top1']:.4f} ({100 * (row['knn_top1'] - info['random_init']):+.1f} points "
                  f"over random init, {100 * (row['knn_top1'] - results['raw_pixels'][str(sizes[method])]):+.1f} "
                  f"over raw pixels){origin}",
                  flush=True)
    if results["runs"]:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from knn_curve import draw_curve  # a sibling script

        print(f"curve: {draw_curve(results, args.out / 'knn_curve.png')}", flush=True)


if __name__ == "__main__":
    main()
