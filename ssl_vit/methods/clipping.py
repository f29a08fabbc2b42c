"""Gradient clipping as in the released code (both at max norm 3.0).

* DINO (:func:`clip_per_tensor`): every parameter tensor's gradient is clipped separately,
  ``g *= min(1, max_norm / (||g|| + 1e-6))``; returns the norms before clipping.
* DINOv2 (:func:`clip_global`, :func:`clip_global_per_module`): one global norm over a set of
  parameters (``torch.nn.utils.clip_grad_norm_``), applied once per student submodule
  (backbone, DINO head, iBOT head).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

Params = Iterable[torch.Tensor] | nn.Module


def _params_with_grad(params: Params) -> list[torch.Tensor]:
    if isinstance(params, nn.Module):
        params = params.parameters()
    elif isinstance(params, torch.Tensor):
        params = [params]
    return [p for p in params if p.grad is not None]


@torch.no_grad()
def clip_per_tensor(params: Params, max_norm: float) -> torch.Tensor:
    """DINO's ``clip_gradients``: clip each gradient tensor to L2 norm ``max_norm`` on its own.

    Returns a 1-D fp32 tensor with the norm of each gradient *before* clipping, in parameter
    order (parameters without a gradient are skipped).  No host sync (DINO calls ``.item()``).
    """
    with_grad = _params_with_grad(params)
    if not with_grad:
        return torch.zeros(0)
    grads = [p.grad for p in with_grad]
    norms = [n.float() for n in torch._foreach_norm(grads, 2.0)]
    coefs = [torch.clamp(float(max_norm) / (n + 1e-6), max=1.0) for n in norms]
    for g, c in zip(grads, coefs):
        g.mul_(c.to(g.dtype))
    return torch.stack([n.to(norms[0].device) for n in norms])


def clip_global(params: Params, max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``params`` jointly to total L2 norm ``max_norm``
    (``torch.nn.utils.clip_grad_norm_``); returns the total norm before clipping."""
    with_grad = _params_with_grad(params)
    if not with_grad:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(with_grad, float(max_norm))


def clip_global_per_module(named_modules: Mapping[str, nn.Module], max_norm: float) -> dict[str, torch.Tensor]:
    """DINOv2: :func:`clip_global` once per student submodule; ``{key: total norm before clipping}``."""
    return {key: clip_global(module, max_norm) for key, module in named_modules.items()}


__all__ = ["clip_global", "clip_global_per_module", "clip_per_tensor"]
