"""Is the default run input-bound? Step time through the Trainer with the real data pipeline
(augmentation and collation in W DataLoader workers) against the same run fed pre-collated
batches held in memory.

    python benchmarks/input_bound.py                     # the default run's config (experiment=cpu)
    python benchmarks/input_bound.py --workers 0,1,2 --steps 60 method=dino
    python benchmarks/input_bound.py --workers 0,1 data.batched_augmentation=true   # augmentation in the step

Each measurement runs in a fresh subprocess, pipeline and memory alternating (two rounds), so
that workers, caches and threads of one do not disturb the other. A step is timed from one
``on_train_batch_start`` to the next (the wait for the batch included), after ``--warmup`` steps;
the figure is the median. Threads: torch's compute threads (``--threads``, default torch's) plus
the W workers share the machine's cores; the memory run uses the same compute threads and no
worker. The last line: ``pipeline/memory=<x>`` for the default worker count (``data.num_workers``
of the config), the ratio the issue bounds by 1.15.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["eval.knn_every_n_steps=0", "eval.pictures.every_n_steps=0", "eval.final_knn=false",
         "trainer.enable_progress_bar=false", "checkpoint_every_n_steps=0", "logger=csv"]


def measure(mode: str, overrides: list[str], workers: int, steps: int, warmup: int, threads: int | None) -> dict:
    """In this process: build the run of ``overrides`` and time ``steps`` steps fed by the real
    pipeline (``mode="pipeline"``) or by pre-collated batches in memory (``mode="memory"``)."""
    import lightning as L
    import torch
    from hydra import compose, initialize_config_dir
    from torch.utils.data import DataLoader

    from ssl_vit.build import build_datamodule, build_method, build_trainer, validate
    from ssl_vit.cpu_memory import use_cpu_allocator_of_run

    if threads:
        torch.set_num_threads(threads)
    total = warmup + steps
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="train", overrides=overrides + QUIET + [
            f"data.num_workers={workers if mode == 'pipeline' else 0}", f"trainer.max_steps={total}"])
    validate(cfg)
    use_cpu_allocator_of_run(cfg)  # as ssl_vit.train does
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    starts: list[float] = []

    class StepClock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            starts.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(cfg, Path(out), datamodule, knn=False)
        trainer.callbacks.append(StepClock())
        method = build_method(cfg, datamodule)
        if mode == "pipeline":
            trainer.fit(method, datamodule=datamodule)
        else:
            source = iter(datamodule.train_dataloader())
            # a few distinct batches, cycled; finished as the Trainer would (data.batched_augmentation)
            held = [datamodule.on_after_batch_transfer(next(source), 0) for _ in range(4)]

            class Held(torch.utils.data.Dataset):
                def __len__(self):
                    return total + 1

                def __getitem__(self, index):
                    return held[index % len(held)]

            trainer.fit(method, train_dataloaders=DataLoader(Held(), batch_size=None))
    gaps = [b - a for a, b in zip(starts[warmup:], starts[warmup + 1:])]
    return {"mode": mode, "workers": workers if mode == "pipeline" else 0, "threads": torch.get_num_threads(),
            "median_s": statistics.median(gaps), "min_s": min(gaps), "max_s": max(gaps), "steps": len(gaps),
            "batch": cfg.data.batch_size, "default_workers": int(cfg.data.num_workers) if mode == "pipeline" else None}


def run_child(mode: str, overrides: list[str], workers: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--workers", str(workers), "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--threads", str(args.threads)] if args.threads else []) + overrides
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default=None, help="worker counts to try, e.g. 0,1,2 (default: the config's)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed first steps (default %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch compute threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=2, help="pipeline/memory alternations (default %(default)s)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.child:
        workers = int(args.workers) if args.workers is not None else 0
        print(json.dumps(measure(args.child, overrides, workers, args.steps, args.warmup, args.threads)))
        return
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    print(f"CPU: {model}; overrides: {' '.join(overrides) or '(the default run)'}", flush=True)
    from hydra import compose, initialize_config_dir

    import ssl_vit  # noqa: F401  (registers the config schemas the composition needs)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        default_workers = int(compose(config_name="train", overrides=overrides).data.num_workers)
    worker_counts = [int(w) for w in args.workers.split(",")] if args.workers else [default_workers]
    rows: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for workers in worker_counts:
            rows.setdefault(f"pipeline, {workers} workers", []).append(run_child("pipeline", overrides, workers, args))
            rows.setdefault("memory", []).append(run_child("memory", overrides, 0, args))
    print(f"{'feeding':<24}{'threads':>8}  {'median s/step':>14}  per run")
    medians = {}
    for name, results in rows.items():
        medians[name] = statistics.median(r["median_s"] for r in results)
        per_run = ", ".join(f"{r['median_s']:.3f}" for r in results)
        print(f"{name:<24}{results[0]['threads']:>8}  {medians[name]:>14.3f}  {per_run}")
    for workers in worker_counts:
        print(f"pipeline with {workers} workers / memory = {medians[f'pipeline, {workers} workers'] / medians['memory']:.3f}")
    key = f"pipeline, {default_workers} workers"
    if key in medians:
        print(f"pipeline/memory={medians[key] / medians['memory']:.3f}")


if __name__ == "__main__":
    main()
