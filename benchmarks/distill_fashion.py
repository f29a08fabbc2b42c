"""Does distillation pay? A small cascade on Fashion-MNIST against from-scratch twins.

    python benchmarks/distill_fashion.py [--teacher-minutes 10] [--stage-minutes 5] [--out DIR]

1. The teacher: ``method=dinov2`` on the CPU preset (width 192, depth 6) for ``--teacher-minutes``
   of training.
2. Two distillation stages, as ``experiment=cascade_cpu`` chains them: the teacher distils a
   student of width 128 and depth 4 ("base"), which distils one of width 96 and depth 3
   ("small"), each for ``--stage-minutes`` (one ordinary ``method=distill`` run per stage, its
   teacher the stage before).
3. Each student's twin: the same architecture trained from scratch with ``method=dinov2`` for
   the same training time as the stage itself (the teacher's time is not counted).

    python benchmarks/distill_fashion.py --distill-overrides method.teacher_temp=0.02 ...   # distillation runs only
    python benchmarks/distill_fashion.py --split val --teacher-from OUT --stages base --no-twins ...   # tuning

Step counts come from measured seconds per step (two short calibration runs of each setting, as
``knn_fashion.py`` does); the reported minutes are the runs' own training times. Every backbone
is scored by weighted k-NN (k=20, T=0.07) on the official test split, the bank a fixed stratified
subset of ``--knn-bank`` training images, beside the same architecture at random init. Extra
arguments are overrides for every run. Results go to OUT/results.json after every run; the
same command again skips what is done. Keep the machine otherwise idle.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from knn_fashion import train  # noqa: E402  (a sibling benchmark script)

ROOT = Path(__file__).resolve().parents[1]
STUDENTS = {  # the stages of conf/experiment/cascade_cpu.yaml
    "base": ["model.embed_dim=128", "model.num_heads=2", "model.depth=4"],
    "small": ["model.embed_dim=96", "model.num_heads=2", "model.depth=3"],
}


def seconds_per_step(out: Path, name: str, overrides: list[str], steps: int) -> float:
    """Training seconds per optimizer step: runs of n and 2n steps differ by n steps, without the
    first steps' one-off costs."""
    _, short = train(out / f"cal_{name}_1", overrides + [f"trainer.max_steps={steps}"])
    _, long = train(out / f"cal_{name}_2", overrides + [f"trainer.max_steps={2 * steps}"])
    return max((long - short) / steps, 1e-3)


def cpu_kind() -> str:
    """The bf16 flags of this CPU (what decides its precision), from /proc/cpuinfo."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    native = sorted(flags & {"amx_bf16", "avx512_bf16"})
    return ", ".join(native) if native else "no native bf16 (AVX2: fp32)"


def knn_test(run_dir: Path, model_overrides: list[str], bank: int, split: str = "test") -> tuple[float, float]:
    """(k-NN top-1 of the run's final backbone, of the same architecture at random init)."""
    import lightning as L
    from hydra import compose, initialize_config_dir

    import ssl_vit
    from ssl_vit.callbacks.knn import knn_accuracies
    from ssl_vit.config import build_backbone_from_config
    from ssl_vit.data.datamodule import SSLDataModule
    from ssl_vit.precision import fast_bf16

    trained = ssl_vit.load_backbone(run_dir / "checkpoints" / "last.ckpt")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="train", overrides=["method=dinov2"] + model_overrides)
    L.seed_everything(cfg.seed, verbose=False)
    random_init = build_backbone_from_config(cfg.model)
    datamodule = SSLDataModule(dataset="fashion_mnist", image_size=cfg.method.crops.global_size, eval_batch_size=512,
                               val_size=cfg.data.val_size, split_seed=cfg.data.split_seed)  # the runs' val split
    datamodule.prepare_data()
    datamodule.setup("fit")
    loaders = datamodule.knn_dataloaders(split, max_train=bank)
    dtype = torch.bfloat16 if fast_bf16("cpu") else None
    trained_top1, random_top1 = knn_accuracies([trained, random_init], *loaders, "cpu", autocast_dtype=dtype)
    return trained_top1, random_top1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-minutes", type=float, default=10)
    parser.add_argument("--stage-minutes", type=float, default=5)
    parser.add_argument("--knn-bank", type=int, default=20000)
    parser.add_argument("--calibration-steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "distill_fashion")
    parser.add_argument("--distill-overrides", nargs="*", default=[],
                        help="overrides for the distillation stages only (the other arguments go to every run)")
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="k-NN queries: the test split (reports) or the validation split (tuning)")
    parser.add_argument("--teacher-from", type=Path, default=None,
                        help="reuse the teacher of an earlier --out folder instead of training one")
    parser.add_argument("--stages", nargs="+", choices=list(STUDENTS), default=list(STUDENTS),
                        help="the distillation stages to run, in cascade order")
    parser.add_argument("--no-twins", action="store_true", help="skip the from-scratch twins (tuning runs)")
    args, overrides = parser.parse_known_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    settings = {"overrides": overrides, "distill_overrides": args.distill_overrides,
                "teacher_minutes": args.teacher_minutes, "stage_minutes": args.stage_minutes, "split": args.split,
                "teacher_from": str(args.teacher_from) if args.teacher_from else None}
    results = json.loads(results_file.read_text()) if results_file.exists() else {**settings, "runs": {}}
    if {k: results.get(k) for k in settings} != settings:
        raise SystemExit(f"{results_file} holds runs of other settings ({ {k: results.get(k) for k in settings} }): "
                         "use another --out")
    runs = results["runs"]

    def save() -> None:
        results_file.write_text(json.dumps(results, indent=2))

    def trained(name: str, base: list[str], seconds: float, model: list[str], folder: Path | None = None) -> dict:
        """Train ``name`` for ``seconds`` of training (planned from a measured step time), once;
        a run of another folder (``--teacher-from``) is only scored."""
        if name not in runs and folder is not None:
            runs[name] = {k: v for k, v in json.loads((folder / "results.json").read_text())["runs"][name].items()
                          if k in ("steps", "fit_s", "planned_seconds_per_step")}
        folder = folder or args.out
        if name not in runs:
            per_step = seconds_per_step(args.out, name, base + overrides, args.calibration_steps)
            steps = max(1, int(seconds / per_step))
            print(f"{name}: {steps} steps at {per_step:.3f} s per step for {seconds / 60:.1f} min", flush=True)
            _, fit = train(args.out / name, base + overrides + [f"trainer.max_steps={steps}"])
            runs[name] = {"steps": steps, "fit_s": fit, "planned_seconds_per_step": round(per_step, 4)}
            save()
        if "knn_top1" not in runs[name]:
            runs[name]["knn_top1"], runs[name]["knn_top1_random_init"] = knn_test(folder / name, model,
                                                                                  args.knn_bank, args.split)
            save()
        return runs[name]

    teacher = trained("teacher", ["method=dinov2"], args.teacher_minutes * 60, [], args.teacher_from)
    previous = (args.teacher_from or args.out) / "teacher" / "checkpoints" / "last.ckpt"
    for stage in args.stages:
        model = STUDENTS[stage]
        distilled = trained(stage, ["method=distill", f"method.teacher.checkpoint={previous}"] + model
                            + args.distill_overrides, args.stage_minutes * 60, model)
        if not args.no_twins:
            trained(f"{stage}_scratch", ["method=dinov2"] + model, distilled["fit_s"], model)
        previous = args.out / stage / "checkpoints" / "last.ckpt"

    print(f"\nk-NN top-1, {args.split} split (bank: {args.knn_bank} training images), CPU: {cpu_kind()}")
    row = "{:<14} {:>6} steps {:>5.1f} min  knn_top1={:.4f}  (random init {:.4f})"
    print(row.format("teacher", teacher["steps"], teacher["fit_s"] / 60, teacher["knn_top1"],
                     teacher["knn_top1_random_init"]))
    for stage in args.stages:
        if args.no_twins:
            r = runs[stage]
            print(row.format(stage, r["steps"], r["fit_s"] / 60, r["knn_top1"], r["knn_top1_random_init"]))
            continue
        for name in (stage, f"{stage}_scratch"):
            r = runs[name]
            print(row.format(name, r["steps"], r["fit_s"] / 60, r["knn_top1"], r["knn_top1_random_init"]))
        gain = runs[stage]["knn_top1"] - runs[f"{stage}_scratch"]["knn_top1"]
        print(f"{stage}: distilled {'beats' if gain > 0 else 'does not beat'} its from-scratch twin by "
              f"{100 * gain:+.1f} points")


if __name__ == "__main__":
    main()
