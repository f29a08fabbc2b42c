"""Guards against non-finite loss values."""
from __future__ import annotations

import math

import torch

__all__ = ["NonFiniteLossError", "check_finite"]


class NonFiniteLossError(FloatingPointError):
    """A loss was NaN or infinite. ``weights_spoilt``: it was found after an optimizer step had
    used its gradients (``finite_check=logging_interval``), so the weights in memory must not be
    saved; otherwise the weights are still those from before the bad step."""

    def __init__(self, message: str, weights_spoilt: bool = False):
        super().__init__(message)
        self.weights_spoilt = weights_spoilt


def check_finite(name: str, value: torch.Tensor | float, step: int) -> None:
    """Raise ``NonFiniteLossError("non-finite {name} loss ({value}) at step {step}")`` if any
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
    raise NonFiniteLossError(f"non-finite {name} loss ({shown}) at step {step}")
