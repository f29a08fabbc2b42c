"""No host synchronisation in the training hot path (issue 22): between two logging steps, a
training step through the real Trainer (progress bar, logger, every callback of a run) never
reads a tensor's value on the host nor asks for a size that depends on one. On an accelerator
each such read waits for the device to finish the work queued so far, so the host can no
longer queue the next kernels ahead.

On the CPU a read costs nothing, so the test records the calls that would read on an
accelerator (``torch.overrides.TorchFunctionMode`` sees every tensor operation): ``.item()``,
``bool()`` / ``float()`` / ``int()`` of a tensor, ``.tolist()``, ``nonzero`` / ``masked_select`` /
boolean indexing (output size from the data), and the like. Work of the data loader (collate,
per-image transforms, on the host by design) is left out; batched augmentation in the training
process (``data.batched_augmentation``) is in.
"""
from __future__ import annotations

import collections
import traceback

import lightning as L
import pytest
import torch
from torch.overrides import TorchFunctionMode

import ssl_vit.train as train_module
from training_helpers import TINY, compose_train
from tests.methods.test_distill import DISTILL, save_teacher
from tests.methods.test_mae import MAE_TINY

READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "argwhere",
         "masked_select", "unique", "unique_consecutive", "bincount", "histc"}
RECORDED_BATCHES = (2, 3)  # steps 3 and 4 of 6; the logging interval (50) falls on none of them


def _is_host_read(func, args, kwargs) -> bool:
    name = getattr(func, "__name__", "")
    if name == "repeat_interleave":
        return isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor) \
            and kwargs.get("output_size") is None
    if name in ("__getitem__", "__setitem__"):
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    return name in READS


class HostReads(TorchFunctionMode):
    """Counts the host reads, by operation and the innermost project frames that made them."""

    def __init__(self):
        super().__init__()
        self.seen: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_host_read(func, args, kwargs):
            stack = traceback.extract_stack()[:-1]
            if not any("torch/utils/data/" in frame.filename for frame in stack):  # the data loader's own work
                where = [f"{frame.filename.rsplit('/', 1)[-1]}:{frame.name}:{frame.lineno}" for frame in stack[-4:]]
                self.seen[(getattr(func, "__name__", str(func)), " <- ".join(reversed(where)))] += 1
        return func(*args, **kwargs)


class RecordSteps(L.Callback):
    """Records from the start of each batch in RECORDED_BATCHES to the start of the next one
    (the step, backward, optimizer, EMA, every callback and the next batch's transfer)."""

    def __init__(self):
        self.mode: HostReads | None = None
        self.seen: collections.Counter = collections.Counter()
        self.recorded = 0

    def _stop(self):
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.seen += self.mode.seen
            self.mode, self.recorded = None, self.recorded + 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._stop()
        if batch_idx in RECORDED_BATCHES:
            self.mode = HostReads()
            self.mode.__enter__()

    def on_train_end(self, trainer, pl_module):
        self._stop()


class ErrorOnDeviceSyncs(L.Callback):
    """On CUDA: ``torch.cuda.set_sync_debug_mode("error")`` over the same windows as
    ``RecordSteps``, so that any call that waits for the device raises there."""

    def __init__(self):
        self.recorded = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if torch.cuda.get_sync_debug_mode():
            torch.cuda.set_sync_debug_mode("default")
            self.recorded += 1
        if batch_idx in RECORDED_BATCHES:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_end(self, trainer, pl_module):
        self.on_train_batch_start(trainer, pl_module, None, -1)


def _run_recorded(overrides: list[str], tmp_path, monkeypatch, recorder=None):
    recorder = recorder or RecordSteps()
    build_trainer = train_module.build_trainer

    def with_recorder(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        trainer.callbacks.insert(0, recorder)  # first: its window opens before the other callbacks' hooks
        return trainer

    monkeypatch.setattr(train_module, "build_trainer", with_recorder)
    cfg = compose_train(overrides + ["trainer.max_steps=6", "trainer.log_every_n_steps=50", "eval.final_knn=false",
                                     "eval.knn_every_n_steps=0", "eval.pictures.every_n_steps=0",
                                     "checkpoint_every_n_steps=0", "trainer.enable_progress_bar=true"])
    assert train_module.run(cfg, tmp_path)["global_step"] == 6
    assert recorder.recorded == len(RECORDED_BATCHES)
    return recorder


MAE_BASE = [o for o in MAE_TINY if "max_steps" not in o]
RUNS = {
    "dinov2": TINY + ["method=dinov2", "data.batched_augmentation=true"],
    "dinov2-per-image-augmentation": TINY + ["method=dinov2", "data.batched_augmentation=false"],
    "dino": TINY + ["method=dino"],
    "mae": MAE_BASE + ["method.pictures.every_n_steps=0"],
}


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    return save_teacher(tmp_path_factory, "teacher", ["method=dinov2"])


@pytest.mark.parametrize("run", list(RUNS) + ["distill-heads", "distill-features"])
def test_steps_between_logging_steps_never_read_on_the_host(run, tmp_path, monkeypatch, request):
    if run.startswith("distill"):
        teacher = request.getfixturevalue("teacher_checkpoint")
        overrides = DISTILL + [f"method.teacher.checkpoint={teacher}", f"method.teacher.target={run.split('-')[1]}"]
    else:
        overrides = RUNS[run]
    recorder = _run_recorded(overrides + ["finite_check=logging_interval"], tmp_path, monkeypatch)
    assert dict(recorder.seen) == {}


def test_the_recorder_sees_the_finite_check_read_every_step(tmp_path, monkeypatch):
    """finite_check=every_step reads the total once per step, and the recorder sees it there
    (so an empty record above means no read, not a blind recorder)."""
    recorder = _run_recorded(RUNS["dinov2"] + ["finite_check=every_step"], tmp_path, monkeypatch)
    assert [(name, where.split(" <- ")[0].rsplit(":", 1)[0], count) for (name, where), count in recorder.seen.items()] \
        == [("__bool__", "finite_check.py:checked_total", len(RECORDED_BATCHES))]


@pytest.mark.gpu
@pytest.mark.parametrize("run", ["dinov2", "mae"])
def test_cuda_steps_between_logging_steps_never_wait_for_the_device(run, tmp_path, monkeypatch, cuda_device):
    """The same windows on a GPU in bf16 with ``finite_check=auto`` (the deferred read there):
    CUDA's own sync debugging raises on any synchronising call."""
    recorder = _run_recorded(RUNS[run] + ["trainer.accelerator=cuda", "trainer.precision=bf16-mixed"], tmp_path,
                             monkeypatch, ErrorOnDeviceSyncs())
    assert recorder.recorded == len(RECORDED_BATCHES)
