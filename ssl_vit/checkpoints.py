"""The checkpoint folder of a run (DIR/checkpoints/): names, and the choice of the checkpoint to
resume from.

``last.ckpt`` is the newest checkpoint; ``step-XXXXXXX.ckpt`` are the retained ones, newest
first by step. A checkpoint is a zip archive (``torch.save``); one cut short (a full disk, a
copy interrupted by hand) has no central directory at its end and is recognised without loading
it. A resume takes the newest complete one and says which it skipped; temporary files left by a
write that was killed are removed.
"""
from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path

log = logging.getLogger("ssl_vit.checkpoints")
LAST = "last.ckpt"
_STEP_FILE = re.compile(r"^step-(\d+)\.ckpt$")


def step_file_name(step: int) -> str:
    return f"step-{step:07d}.ckpt"


def step_checkpoints(directory: Path) -> list[Path]:
    """The retained ``step-*.ckpt`` files of ``directory``, newest (highest step) first."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob("step-*.ckpt") if (m := _STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a whole checkpoint archive (its zip directory reads, no member cut off)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the ``*.tmp`` files a killed write left in ``directory``; returns them."""
    stale = sorted(Path(directory).glob("*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
        log.warning("removed %s, left by a checkpoint write that did not finish", path)
    return stale


def newest_complete_checkpoint(directory: Path) -> Path | None:
    """``last.ckpt``, or if it is cut short, the newest complete retained checkpoint (with a
    warning naming what was skipped); None when the folder holds no checkpoint at all."""
    directory = Path(directory)
    candidates = [directory / LAST] if (directory / LAST).is_file() else []
    candidates += step_checkpoints(directory)
    skipped = []
    for path in candidates:
        if is_complete(path):
            if skipped:
                log.warning("%s %s unreadable (cut short?): resuming from %s instead",
                            ", ".join(str(p) for p in skipped), "is" if len(skipped) == 1 else "are", path)
            return path
        skipped.append(path)
    if skipped:
        raise FileNotFoundError(f"no complete checkpoint in {directory}: {', '.join(p.name for p in skipped)} "
                                "cannot be read; move them away to start afresh, or give ckpt_path=")
    return None
