"""Training-step throughput of a method at a model and crop setting.

    python benchmarks/train_step.py method=dinov2 model=vit_small method.crops.global_size=224 \
        method.crops.local_size=96 data=synthetic data.batch_size=32

Arguments are the training config's overrides. Times the optimisation step alone (teacher and
student forward, backward, clipping, AdamW, EMA) on one fixed batch from the real multi-crop
pipeline, and separately the data pipeline (augmentation + collate, one process). bf16 autocast
when trainer.precision resolves to bf16-mixed (``auto``, the default: where bf16 is native, e.g.
CUDA or a CPU with AMX or AVX512-BF16), on CUDA when a GPU is present.
"""
from __future__ import annotations

import sys
import time

import torch
from hydra import compose, initialize_config_dir

from ssl_vit.build import build_datamodule, build_method, validate
from ssl_vit.cpu_memory import use_cpu_allocator_of_run
from ssl_vit.methods.param_groups import apply_lr_wd
from ssl_vit.precision import resolve_precision

CONF = __file__.rsplit("/benchmarks/", 1)[0] + "/conf"


def optimisation_step(method, optimizer, batch: dict, step: int, device_type: str, bf16: bool) -> None:
    """One full step of a self-distillation method without a Trainer: this step's lr / wd, teacher
    and student forward (bf16 autocast if asked), backward, clipping, AdamW, EMA and centers."""
    apply_lr_wd(optimizer, method.lr_at(step), method.wd_at(step))
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        loss = method.training_step(batch, 0)
    loss.backward()
    method.clip_gradients_as_in_paper()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    method.update_teacher_and_centers(step)


def prepared_step(overrides: list[str], device: torch.device):
    """(cfg, datamodule, method, optimizer, batch) of a training config's step on synthetic data,
    without a Trainer: the method on ``device`` and one batch of the real multi-crop pipeline,
    finished as the Trainer would (``data.batched_augmentation``)."""
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose(config_name="train", overrides=["data=synthetic", "data.num_workers=0",
                                                      "data.options.num_samples=256"] + overrides)
    validate(cfg)
    use_cpu_allocator_of_run(cfg)  # as ssl_vit.train does
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    method = build_method(cfg, datamodule).to(device)
    method.log = method.log_dict = lambda *args, **kwargs: None  # no Trainer attached
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    batch = datamodule.on_after_batch_transfer(batch, 0)
    return cfg, datamodule, method, method.configure_optimizers(), batch


def main(overrides: list[str], steps: int = 5, warmup: int = 2) -> None:
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose(config_name="train", overrides=["data.num_workers=0"] + overrides)
    validate(cfg)
    use_cpu_allocator_of_run(cfg)  # as ssl_vit.train does
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = iter(datamodule.train_dataloader())
    batch = next(loader)  # the first batch pays one-off costs (file reads, caches): not timed
    start = time.perf_counter()
    data_batches = 0
    while data_batches < steps and next(loader, None) is not None:  # a small data set may end first
        data_batches += 1
    data_s = (time.perf_counter() - start) / max(data_batches, 1)
    batch_size = batch["global_crops"].shape[0] // 2

    method = build_method(cfg, datamodule).to(device)
    method.log = method.log_dict = lambda *args, **kwargs: None  # no Trainer attached
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    batch = datamodule.on_after_batch_transfer(batch, 0)  # data.batched_augmentation: finish it here
    optimizer = method.configure_optimizers()
    precision = resolve_precision(cfg.trainer.precision, device.type)
    bf16 = "bf16" in precision
    print(f"precision: {precision}", flush=True)

    def step() -> None:
        optimisation_step(method, optimizer, batch, 0, device.type, bf16)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    step_s = (time.perf_counter() - start) / steps
    crops = cfg.method.crops
    print(f"{cfg.method.name} {cfg.model.name} batch {batch_size}, {2} x {crops.global_size}px + "
          f"{crops.n_local} x {crops.local_size}px crops, {'bf16' if bf16 else 'fp32'} on {device}")
    print(f"  training step: {step_s:.3f} s  ->  {batch_size / step_s:.1f} images/s")
    if data_batches:
        print(f"  data pipeline (1 process, mean of {data_batches} batches): {data_s:.3f} s per batch  ->  "
              f"{batch_size / data_s:.1f} images/s")
    else:
        print("  data pipeline: not timed (the data set holds a single batch)")


if __name__ == "__main__":
    main(sys.argv[1:])
