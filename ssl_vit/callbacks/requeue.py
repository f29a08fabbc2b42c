"""Requeue on a scheduler's warning signal, at an optimizer-step boundary.

SLURM sends ``#SBATCH --signal=USR1@120`` (120 s before the time limit, or on preemption where
the cluster is set up so) to every task. Lightning's own handler would write a checkpoint from
inside the signal handler, possibly in the middle of a step, under another name than the
``checkpoints/last.ckpt`` that a restart resumes from. Here the handler only sets a flag; after
the next optimizer step the processes agree (any rank that got the signal counts, one tiny
all-reduce per step under DDP) and every rank writes ``last.ckpt`` through
:class:`~ssl_vit.callbacks.LastCheckpoint`; once that step is logged, rank 0 asks SLURM to
requeue the job (``scontrol requeue``, which also ends the running one) and fit stops with
:class:`RequeueStop`, which ``ssl_vit.train`` turns into an exit. The requeued job runs the same command: the run folder
derives from the job id (``ssl_vit.cluster``), so it resumes from that checkpoint, with the same
logs. Outside SLURM the signal still writes the checkpoint and stops the run (nothing to requeue).

Under the submitit launcher (``hydra/launcher=slurm``), the signal submitit asks SLURM for
(``SUBMITIT_PREEMPT_SIGNAL``, USR2 by default) is handled the same way during fit.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from types import FrameType

import lightning as L

from ssl_vit.callbacks.checkpoint import LastCheckpoint
from ssl_vit.callbacks.step_tracking import OptimizerStepCallback
from ssl_vit.cluster import slurm_job_id


class RequeueStop(Exception):
    """Fit stopped on a requeue signal after writing ``path`` at ``step``; ``job``: the SLURM job
    requeued (None: not under SLURM, or the requeue failed, see ``error``)."""

    def __init__(self, signum: int, step: int, path: str, job: str | None, error: str | None = None):
        self.signum, self.step, self.path, self.job, self.error = signum, step, path, job, error
        super().__init__(self.describe())

    @property
    def requeued(self) -> bool:
        return self.job is not None and self.error is None

    def describe(self) -> str:
        head = f"stopped by {signal.Signals(self.signum).name} at step {self.step}: wrote {self.path}; "
        if self.requeued:
            return head + f"requeued SLURM job {self.job}, which resumes from it"
        if self.error:
            return head + f"could not requeue SLURM job {self.job} ({self.error}); start the same command again to resume"
        return head + "not a SLURM batch job, nothing to requeue; start the same command again to resume"


def requeue_signals() -> tuple[signal.Signals, ...]:
    """SIGUSR1 (the launch/slurm scripts' ``--signal``), and submitit's signal in its jobs."""
    signals = [signal.SIGUSR1]
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
        if name in signal.Signals.__members__ and signal.Signals[name] not in signals:
            signals.append(signal.Signals[name])
    return tuple(signals)


def requeue_slurm_job(job: str) -> str | None:
    """``scontrol requeue JOB``; the error text, or None when it was accepted."""
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    return None if done.returncode == 0 else (done.stderr or done.stdout).strip() or f"exit code {done.returncode}"


class RequeueOnSignal(OptimizerStepCallback):
    """Module docstring. ``checkpoint``: the run's :class:`LastCheckpoint`."""

    def __init__(self, checkpoint: LastCheckpoint, signals: tuple[signal.Signals, ...] | None = None):
        self.checkpoint = checkpoint
        self.signals = requeue_signals() if signals is None else tuple(signals)
        self.received: int | None = None  # the signal number, once one came
        self._stop: tuple[int, int] | None = None  # (signal, step) agreed on, stop at the next batch
        self._previous: dict[int, object] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum  # only a flag: the work waits for the end of the current step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return  # Python lets only the main thread set signal handlers
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._stop is not None or not self.optimizer_stepped(trainer):
            return
        # Every rank takes part in the vote at every step, so that all stop after the same step.
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        self.checkpoint.save(trainer)  # where LastCheckpoint writes its periodic ones: the same state
        self._stop = (self.received or self.signals[0], trainer.global_step)  # a rank without the signal follows

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """The stop itself waits for the next batch, so that the step saved above is logged
        (Lightning logs a step's metrics after its on_train_batch_end hooks). Had that step been
        the last one, training ends normally instead and there is nothing to requeue."""
        if self._stop is None:
            return
        signum, step = self._stop
        for logger in trainer.loggers:  # on disk before SLURM's kill of the requeued job can come
            logger.save()
        # A requeue ends the running job with SIGTERM. Everything is saved by now: let the
        # processes wind down without Lightning's SIGTERM handler (a broadcast to ranks that may
        # be gone already); Lightning's teardown puts the default action back.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        trainer.strategy.barrier("requeue")
        job, error = slurm_job_id(), None
        if trainer.is_global_zero:
            if job is not None:
                error = requeue_slurm_job(job)
            stop = RequeueStop(signum, step, str(self.checkpoint.path), job, error)
            print(stop.describe(), flush=True)
            raise stop
        raise RequeueStop(signum, step, str(self.checkpoint.path), job)
