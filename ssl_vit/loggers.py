"""Loggers of a training run: CSV (default, no account needed) and wandb, both resumable.

A run restarted in the same folder continues its logs instead of starting them over:

* CSV: Lightning's ``CSVLogger`` deletes ``logs/metrics.csv`` when it opens an existing folder.
  :class:`ResumableCSVLogger` keeps it; the first step this process logs tells where training
  resumed, and the rows the crashed process logged from that step on (steps after its last
  checkpoint, trained again now) are dropped, so every step appears once.
* wandb: one run id per output folder (``wandb_run_id.txt``), resumed with ``resume="allow"``.
"""
from __future__ import annotations

import csv
import secrets
import string
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _ResumableWriter(ExperimentWriter):
    """Lightning's CSV writer, minus the deletion of an existing ``metrics.csv``."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self._resumed = False

    def _check_log_dir_exists(self) -> None:
        """Lightning deletes an existing metrics.csv here; a resumed run continues it instead."""

    def log_metrics(self, metrics_dict, step=None) -> None:
        if not self._resumed:
            self._resumed = True
            if step is not None:
                self._drop_rows_from(int(step))
        super().log_metrics(metrics_dict, step)

    def _drop_rows_from(self, step: int) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if row.get("step") not in (None, "") and int(row["step"]) < step]
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(header)  # new keys extend the existing header


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to the ``metrics.csv`` of a resumed run (module docstring)."""

    @property
    def experiment(self) -> _ResumableWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumableWriter(log_dir=self.log_dir)
        return self._experiment


def new_wandb_run_id(length: int = 8) -> str:
    """A wandb-style run id (lowercase letters and digits); made here so that it does not
    depend on wandb's internal helpers, which moved between releases."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def wandb_run_id(out_dir: Path) -> str:
    """The run folder's wandb id: read from ``wandb_run_id.txt``, or made and stored there."""
    id_file = out_dir / "wandb_run_id.txt"
    if id_file.exists():
        return id_file.read_text().strip()
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = new_wandb_run_id()
    id_file.write_text(run_id)
    return run_id
