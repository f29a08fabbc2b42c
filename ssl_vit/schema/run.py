"""The run's own keys and the groups every method shares: trainer, data, logger, eval."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from omegaconf import MISSING

from ssl_vit.cpu_memory import CPU_ALLOCATORS
from ssl_vit.methods.finite_check import FINITE_CHECKS
from ssl_vit.schema.fields import int_at_least, one_of, rule, setting

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = ("auto", "64", "64-true", "32", "32-true", "16", "16-mixed", "16-true", "bf16", "bf16-mixed",
              "bf16-true")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp", "deepspeed")
DATA_SETS = ("fashion_mnist", "imagefolder", "synthetic")
LOGGERS = ("csv", "wandb", "tensorboard")
WANDB_MODES = ("auto", "online", "offline", "disabled")
RESUME_SCHEDULES = ("error", "extend", "restart")


def _devices_ok(value: Any) -> bool:
    """A count >= 1, -1 (all), "auto", a list of device ids or a string of either ("2", "0,1")."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 1 or value == -1
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        return value == "auto" or (bool(parts) and all(p.lstrip("-").isdigit() for p in parts)
                                   and (len(parts) > 1 or int(parts[0]) >= 1 or int(parts[0]) == -1))
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return len(value) > 0 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)
    return False


def _val_size_ok(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    return isinstance(value, float) and (value.is_integer() and value >= 0 or 0.0 < value < 1.0)


@dataclass
class TrainerConfig:
    """Arguments of ``lightning.Trainer`` that this framework plans with."""

    accelerator: str = setting("auto", "the device kind", **rule(one_of(ACCELERATORS)))
    devices: Any = setting(1, "devices per node: a count, -1 (all), auto, or a list of ids",
                           allowed="an integer >= 1, -1, auto or a list of device ids", ok=_devices_ok)
    num_nodes: int = setting(1, "machines", **rule(int_at_least(1)))
    strategy: str = setting("auto", "Lightning's strategy (trainer=ddp selects DDP)", **rule(one_of(STRATEGIES)))
    precision: Any = setting("auto", "auto: bf16-mixed where bf16 is native (CUDA, AMX / AVX512-BF16 CPUs), else 32",
                             allowed="one of " + ", ".join(PRECISIONS), ok=lambda v: str(v) in PRECISIONS)
    max_steps: int = setting(400, "the planned run length in optimizer steps: every schedule is laid over it "
                             "(-1: use max_epochs)", allowed="an integer >= 1, or -1 with trainer.max_epochs",
                             ok=lambda v: isinstance(v, int) and (v >= 1 or v == -1))
    max_epochs: Optional[int] = setting(None, "the run length in passes over the data (with max_steps=-1)",
                                        **rule(int_at_least(1)))
    max_time: Optional[str] = setting(None, "a safety cut-off (DD:HH:MM:SS); never changes a schedule")
    log_every_n_steps: int = setting(10, "logging interval in steps", **rule(int_at_least(1)))
    accumulate_grad_batches: int = setting(1, "micro-batches per optimizer step", **rule(int_at_least(1)))
    enable_progress_bar: bool = setting(True, "the tqdm progress bar (false: quiet logs)")
    deterministic: Any = setting(False, "deterministic algorithms only (true; warn: 'warn'): bit-identical reruns "
                                 "on the same machine", allowed="true, false or warn",
                                 ok=lambda v: v in (True, False, "warn"))


@dataclass
class DataConfig:
    name: str = setting(MISSING, "the data set", **rule(one_of(DATA_SETS)))
    root: Optional[str] = setting(None, "where the images are (imagefolder: a folder of images, one subfolder "
                                  "per class for evaluation)")
    batch_size: int = setting(128, "images per process and step", **rule(int_at_least(1)))
    num_workers: int = setting(2, "DataLoader worker processes", **rule(int_at_least(0)))
    batched_augmentation: bool = setting(False, "multi-crop: workers only cut the crops; colour, blur, solarisation "
                                         "and normalisation run per batch in the training process, on its "
                                         "device (same crops)")
    val_size: Any = setting(None, "validation carve-out of the training data: a count or a fraction in (0, 1)",
                            allowed="an integer >= 0 or a fraction in (0, 1)", ok=_val_size_ok)
    split_seed: int = setting(0, "which images form the validation split (independent of seed)")
    options: Dict[str, Any] = setting(help="the data set's own options (see conf/data/NAME.yaml)", factory=dict)


@dataclass
class LoggerConfig:
    name: str = setting(MISSING, "csv | wandb | tensorboard", **rule(one_of(LOGGERS)))
    project: Optional[str] = setting(None, "wandb project")
    mode: Optional[str] = setting(None, "wandb: auto (online with credentials, else offline) | online | offline "
                                  "| disabled", **rule(one_of(WANDB_MODES)))


IMAGE_COUNT = {"allowed": "a positive number of images, or null for all", "ok": int_at_least(1)[1]}


@dataclass
class PicturesConfig:
    every_n_steps: int = setting(200, "interval in optimizer steps (0: never)", **rule(int_at_least(0)))
    num_images: int = setting(8, "fixed validation images per picture", **rule(int_at_least(1)))


@dataclass
class EvalConfig:
    knn_every_n_steps: int = setting(100, "k-NN of the evaluated backbone on a validation subset during "
                                     "training (0: never)", **rule(int_at_least(0)))
    knn_max_train: Optional[int] = setting(10000, "its bank size (null: all)", **IMAGE_COUNT)
    knn_max_eval: Optional[int] = setting(2000, "its query count (null: all)", **IMAGE_COUNT)
    final_knn: bool = setting(True, "after training: k-NN on the full validation split, trained vs random init")
    final_knn_max_train: Optional[int] = setting(20000, "its bank: a fixed stratified subset of the train split "
                                                 "(null: all)", **IMAGE_COUNT)
    pictures: PicturesConfig = setting(help="[CLS] attention and PCA pictures", factory=PicturesConfig)


@dataclass
class ResumeConfig:
    schedule: str = setting("error", "when the checkpoint was planned for another length or batch: error | "
                            "extend (re-plan the schedules, continue) | restart (new schedules from step 0 with "
                            "the checkpoint's weights)", **rule(one_of(RESUME_SCHEDULES)))


@dataclass
class TrainConfig:
    """The top level of ``conf/train.yaml``; the groups have their own schemas."""

    method: Any = MISSING
    model: Any = MISSING
    # Typed here rather than in conf/data/*.yaml: the evaluate app merges those files into a node
    # of its own (with keys such as image_size) that this schema does not describe.
    data: DataConfig = setting(help="the data set (conf/data/)", factory=DataConfig)
    optim: Any = MISSING
    trainer: Any = MISSING
    logger: Any = MISSING
    seed: int = setting(0, "the seed of initialisation, augmentation and masking")
    ckpt_path: Optional[str] = setting(None, "resume from this checkpoint (default: DIR/checkpoints/last.ckpt "
                                       "if present)")
    steps_per_epoch: Optional[int] = setting(None, "optimizer steps per schedule epoch (null: one pass over the "
                                             "training data)", **rule(int_at_least(1)))
    checkpoint_every_n_steps: int = setting(50, "checkpoint interval in optimizer steps (0: only at the end)",
                                            **rule(int_at_least(0)))
    checkpoint_every_n_minutes: Optional[float] = setting(
        None, "also checkpoint when this many minutes have passed since the last one (null: by steps only)",
        allowed="a positive number of minutes, or null", ok=lambda v: isinstance(v, (int, float))
        and not isinstance(v, bool) and v > 0)
    checkpoint_keep: int = setting(2, "checkpoints kept in DIR/checkpoints/ (step-*.ckpt, the newest also as "
                                   "last.ckpt); a resume falls back to an older one when the newest is cut short",
                                   **rule(int_at_least(1)))
    resume: ResumeConfig = setting(help="resuming a run whose plan changed", factory=ResumeConfig)
    eval: EvalConfig = setting(help="evaluation during and after training", factory=EvalConfig)
    cpu_allocator: str = setting("reuse", "training on the CPU: reuse (freed memory stays in the process: no page "
                                 "faults on each step's fresh tensors; ssl_vit/cpu_memory.py) | system (the C "
                                 "library's defaults)",
                                 **rule(one_of(CPU_ALLOCATORS)))
    finite_check: str = setting("auto", "when a non-finite loss is looked for: every_step (stops at the bad step; "
                                "on an accelerator the host waits for each step's forward pass) | logging_interval "
                                "(recorded on the device, read every trainer.log_every_n_steps steps and before each "
                                "checkpoint) | auto (every_step on the CPU, else logging_interval; "
                                "ssl_vit/methods/finite_check.py)", **rule(one_of(FINITE_CHECKS)))
    cascade: Any = setting(None, "set by cascade recipes only (python -m ssl_vit.cascade runs them)",
                           allowed="null (a cascade runs with python -m ssl_vit.cascade)", ok=lambda v: v is None)


__all__ = ["DataConfig", "EvalConfig", "LoggerConfig", "PicturesConfig", "ResumeConfig", "TrainConfig", "TrainerConfig"]
