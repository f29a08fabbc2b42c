"""Where a run was launched (SLURM, torchrun or a plain process) and what follows from it.

* :func:`default_run_dir`, the ``ssl_vit_run_dir`` resolver behind the default ``hydra.run.dir``
  (and ``hydra.sweep.dir``): every process of one run must compute the same folder, and a requeued
  SLURM job must find the folder (and ``checkpoints/last.ckpt``) of its first start. A timestamp
  does neither: each process resolves it at its own second. So the default is derived from what
  the launcher gives every process alike: ``ROOT/slurm/<job id>`` (``<array job id>_<task id>``
  for array jobs) under SLURM, ``ROOT/torchrun/<rendezvous id>`` under torchrun, and
  ``ROOT/<date>/<time>`` for a plain process.
* :func:`slurm_plugins`: under SLURM the Trainer takes the ranks from SLURM, with Lightning's own
  requeue handler off (:class:`ssl_vit.callbacks.requeue.RequeueOnSignal` does it at a step
  boundary instead).
* :func:`check_launch`: ``-m`` (Hydra multirun) with a strategy whose processes Lightning would
  start itself is refused: Lightning starts each extra process with the script's command line,
  which with ``-m`` is the whole sweep again. Under SLURM (the submitit launcher with
  ``tasks_per_node=N``) or torchrun, the processes exist before the run, and a sweep is fine.
"""
from __future__ import annotations

import os
import sys
from datetime import datetime
from typing import Any

RESOLVER = "ssl_vit_run_dir"
INTERACTIVE_JOB_NAMES = ("bash", "interactive")  # Lightning's rule: an allocation used by hand
STATIC_RENDEZVOUS_ID = "none"  # torchrun's --rdzv-id default (static rendezvous, several nodes)


def slurm_job_id(env: dict[str, str] | None = None) -> str | None:
    """The SLURM job of this process, the same for every task and after a requeue: ``<job>``, or
    ``<array job>_<task>`` for an array task; None outside a batch job (or in an interactive one)."""
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_ID") or env.get("SLURM_JOB_NAME") in INTERACTIVE_JOB_NAMES:
        return None
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def default_run_dir(root: str = "outputs", env: dict[str, str] | None = None, now: datetime | None = None) -> str:
    """The default run folder under ``root`` (module docstring). torchrun's static rendezvous,
    used for several nodes without ``--rdzv-id``, names every run ``none``: no folder can be
    derived from that, so it is refused (a folder shared by unrelated runs would resume one run
    from another's checkpoint)."""
    env = os.environ if env is None else env
    job = slurm_job_id(env)
    if job is not None:
        return f"{root}/slurm/{job}"
    rendezvous = env.get("TORCHELASTIC_RUN_ID")
    if rendezvous == STATIC_RENDEZVOUS_ID:
        raise ValueError(
            "torchrun with a static rendezvous (several nodes, --master-addr, no --rdzv-id) gives every run the id "
            "'none', so the run folder cannot be derived from it: give torchrun --rdzv-id=NAME (the same on every "
            "node, new for each run) or the run a folder, hydra.run.dir=DIR (the same on every node)")
    if rendezvous:
        return f"{root}/torchrun/{rendezvous}"
    now = now or datetime.now()
    return f"{root}/{now:%Y-%m-%d}/{now:%H-%M-%S}"


def register_resolvers() -> None:
    """``${ssl_vit_run_dir:ROOT}`` for the conf files (cached like Hydra's ``now``: resolved once
    per config, so the folder does not change when the clock's second does)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, _run_dir_or_exit, use_cache=True)


def _run_dir_or_exit(root: str = "outputs") -> str:
    """The resolver: a folder that cannot be derived ends the command with exit code 2 and one
    line (Hydra would otherwise print its interpolation traceback)."""
    try:
        return default_run_dir(str(root))
    except ValueError as error:
        from ssl_vit.cli import CONFIG_ERROR_EXIT_CODE

        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(CONFIG_ERROR_EXIT_CODE) from None


def under_slurm() -> bool:
    """Whether the Trainer will take its ranks from SLURM (Lightning's own test)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect()


def slurm_plugins() -> list[Any]:
    """The Trainer's plugins: under SLURM, Lightning's SLURM environment without its requeue
    handler (its checkpoint, written inside the signal handler, could land mid-step, and our
    resume reads ``last.ckpt``); elsewhere none."""
    if not under_slurm():
        return []
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)]


def lightning_reruns_command(trainer) -> bool:
    """Whether ``trainer.fit`` would start its other processes by running this process's command
    line again (Lightning's launcher for DDP / FSDP with several devices and no outside launcher
    such as torchrun or srun; ``ddp_spawn`` forks the fit call instead)."""
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    return isinstance(launcher, _SubprocessScriptLauncher) \
        and not trainer.strategy.cluster_environment.creates_processes_externally and trainer.world_size > 1


def check_launch(cfg, trainer) -> None:
    """Refuse ``-m`` where Lightning would start the run's other processes by running the command
    line again (module docstring); raises ValueError naming the ways out."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or not lightning_reruns_command(trainer):
        return
    target = str(hydra_cfg.launcher.get("_target_", "")).rsplit(".", 1)[-1] or "the basic launcher"
    raise ValueError(
        f"-m (a Hydra sweep) with trainer.strategy={cfg.trainer.strategy} and {trainer.world_size} processes: on "
        f"{target} Lightning would start each extra process with the whole sweep's command line. Sweep on "
        "SLURM instead (hydra/launcher=slurm: each point a job of hydra.launcher.tasks_per_node=N tasks, "
        "launch/README.md), or start each point as its own command (torchrun, or without -m)")
