"""Does MAE learn on Fashion-MNIST? Reconstruction, linear probes and k-NN, beside DINOv2.

    python benchmarks/mae_fashion.py [--split test] [--out DIR] [MAE overrides ...]
    python benchmarks/mae_fashion.py --runs RUN_DIR [RUN_DIR ...] [--split val]

Default mode: trains ``method=mae`` with its CPU recipe (the steps of ``experiment=cpu``, about
ten minutes of training here; extra arguments are MAE overrides), then ``method=dinov2`` for the
same training time (its seconds per step measured by two short calibration runs, as
``knn_fashion.py`` does), then scores on ``--split`` (``test`` for reports, ``val`` for tuning):

* MAE's held-out reconstruction loss (``mae_loss`` on removed patches, fixed masks) beside the
  trivial predictor's (0 with ``norm_pix_loss``, else each image's mean visible pixel);
* a linear probe (the evaluate app's: SGD on whitened frozen features, 30 epochs) and weighted
  k-NN (k=20, T=0.07) on the [CLS] token and on the mean patch token, for the trained backbone
  and for the same backbone at random init (the run's seed and the method's own initialisation).

``--runs`` mode scores existing run folders (e.g. the points of a ``-m`` sweep) the same way,
without training. Results go to OUT/results.json; a finished training run is not repeated.
Keep the machine otherwise idle: DINOv2's step count comes from a measured step time.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from knn_fashion import calibrate, train  # noqa: E402  (a sibling benchmark script)

ROOT = Path(__file__).resolve().parents[1]
FEATURE_KINDS = ("cls", "mean_patch")


def run_config(run_dir: Path):
    from omegaconf import OmegaConf

    return OmegaConf.load(run_dir / ".hydra" / "config.yaml")


def loaders_for(run_dir: Path, split: str):
    """Bank and query loaders of ``split`` with the checkpoint's preprocessing."""
    from ssl_vit.data.datamodule import SSLDataModule
    from ssl_vit.evaluate import read_preprocessing

    pre = read_preprocessing(run_dir / "checkpoints" / "last.ckpt")
    datamodule = SSLDataModule(dataset=pre["dataset"], root=pre["root"], val_size=pre["val_size"],
                               split_seed=pre["split_seed"], image_size=pre["resolution"], mean=pre["mean"],
                               std=pre["std"], eval_batch_size=512)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule.knn_dataloaders(split)


def frozen_feature_scores(backbones: dict, loaders) -> dict[str, dict[str, float]]:
    """k-NN and linear-probe top-1 on [CLS] and mean patch token of each backbone; the images
    are read once for all of them."""
    from ssl_vit.evaluation.features import BackboneFeatures
    from ssl_vit.evaluation.knn import extract_features_of_many, knn_top1
    from ssl_vit.evaluation.linear_probe import linear_probe_top1, train_linear_probe
    from ssl_vit.precision import fast_bf16

    wrapped = [BackboneFeatures(b, "cls_avgpool") for b in backbones.values()]
    dtype = torch.bfloat16 if fast_bf16("cpu") else None
    banks, bank_labels = extract_features_of_many(wrapped, loaders[0], "cpu", dtype, "bank")
    queries, query_labels = extract_features_of_many(wrapped, loaders[1], "cpu", dtype, "queries")
    scores = {}
    for name, bank, query in zip(backbones, banks, queries):
        row = {}
        for i, kind in enumerate(FEATURE_KINDS):
            b, q = bank.chunk(2, dim=1)[i], query.chunk(2, dim=1)[i]
            row[f"knn_{kind}"] = knn_top1(b, bank_labels, q, query_labels, k=20, temperature=0.07)
            probe = train_linear_probe(b, bank_labels, int(bank_labels.max()) + 1, seed=0)
            row[f"linear_{kind}"] = linear_probe_top1(probe, q, query_labels)
        scores[name] = row
    return scores


def score_run(run_dir: Path, split: str) -> dict:
    """Everything this benchmark reports for one training run folder."""
    import ssl_vit
    from ssl_vit.build import random_init_backbone
    from ssl_vit.evaluation.reconstruction import heldout_reconstruction
    from ssl_vit.methods import MAE

    cfg = run_config(run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    loaders = loaders_for(run_dir, split)
    scores = frozen_feature_scores({"trained": ssl_vit.load_backbone(ckpt), "random_init": random_init_backbone(cfg)},
                                   loaders)
    result = {"method": cfg.method.name, "run_dir": str(run_dir), "split": split, **scores}
    if cfg.method.name == "mae":
        result["reconstruction"] = heldout_reconstruction(MAE.load_from_checkpoint(ckpt, map_location="cpu"),
                                                          loaders[1], seed=0)
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        stored = json.loads(metrics.read_text())
        result["fit_s"], result["steps"] = stored.get("fit_seconds"), stored.get("global_step")
    return result


def print_row(result: dict, label: str) -> None:
    t, r = result["trained"], result["random_init"]
    line = (f"{label:<28} {result.get('steps') or '-':>6} {(result.get('fit_s') or 0) / 60:>5.1f} min | linear cls "
            f"{t['linear_cls']:.4f} (rand {r['linear_cls']:.4f}) mean_patch {t['linear_mean_patch']:.4f} "
            f"(rand {r['linear_mean_patch']:.4f}) | knn cls {t['knn_cls']:.4f} (rand {r['knn_cls']:.4f}) "
            f"mean_patch {t['knn_mean_patch']:.4f} (rand {r['knn_mean_patch']:.4f})")
    if "reconstruction" in result:
        rec = result["reconstruction"]
        line += (f" | reconstruction {rec['mae_loss']:.4f} vs trivial {rec['trivial_loss']:.4f} "
                 f"(ratio {rec['ratio_to_trivial']:.3f})")
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=("val", "test"), default=None,
                        help="test (default when training) or val (default with --runs)")
    parser.add_argument("--runs", nargs="+", type=Path, help="score these run folders instead of training")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "mae_fashion")
    parser.add_argument("--calibration-steps", type=int, default=50)
    args, overrides = parser.parse_known_args()
    torch.set_float32_matmul_precision("high")

    if args.runs:
        split = args.split or "val"
        for run_dir in args.runs:
            result = score_run(run_dir, split)
            hydra_overrides = run_dir / ".hydra" / "overrides.yaml"
            label = " ".join(hydra_overrides.read_text().split("\n- ")[1:]).strip() if hydra_overrides.is_file() \
                else run_dir.name
            print_row(result, label or run_dir.name)
        return

    split = args.split or "test"
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    mae_dir, dinov2_dir = args.out / "mae", args.out / "dinov2"
    if "mae" not in results:
        _, fit = train(mae_dir, ["method=mae"] + overrides)
        results["mae"] = {"overrides": overrides, "fit_s": fit}
        results_file.write_text(json.dumps(results, indent=2))
    if "dinov2" not in results:
        seconds = calibrate("dinov2", [], args.out, args.calibration_steps)
        steps = max(1, int(results["mae"]["fit_s"] / seconds))
        print(f"dinov2: {steps} steps at {seconds:.3f} s per step for MAE's {results['mae']['fit_s']:.0f} s",
              flush=True)
        _, fit = train(dinov2_dir, ["method=dinov2", f"trainer.max_steps={steps}"])
        results["dinov2"] = {"steps": steps, "fit_s": fit}
        results_file.write_text(json.dumps(results, indent=2))
    for name, run_dir in (("mae", mae_dir), ("dinov2", dinov2_dir)):
        key = f"scores_{split}"
        if key not in results[name]:
            results[name][key] = score_run(run_dir, split)
            results_file.write_text(json.dumps(results, indent=2))
        print_row(results[name][key], f"{name} ({split})")


if __name__ == "__main__":
    main()
