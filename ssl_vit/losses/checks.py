"""Guards against non-finite loss values."""
from __future__ import annotations

import math

import torch

__all__ = ["check_finite"]


def check_finite(name: str, value: torch.Tensor | float, step: int) -> None:
    """Raise ``FloatingPointError("non-finite {name} loss ({value}) at step {step}")`` if any
    element of ``value`` is NaN or infinite. (On an accelerator this synchronises.)"""
    if isinstance(value, torch.Tensor):
        v = value.detach()
        if bool(torch.isfinite(v).all()):
            return
        shown = v.item() if v.numel() == 1 else v.float().cpu().tolist()
    else:
        if math.isfinite(float(value)):
            return
        shown = float(value)
    raise FloatingPointError(f"non-finite {name} loss ({shown}) at step {step}")
