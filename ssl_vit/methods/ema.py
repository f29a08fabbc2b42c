"""EMA teacher (DINO / DINOv2 "momentum encoder").

``teacher <- m * teacher + (1 - m) * student`` on every parameter, once per optimizer step,
with the momentum ``m`` from :func:`ssl_vit.methods.schedules.momentum_schedule`.  Buffers are
not averaged (the released code updates parameters only; the ViT has no running statistics).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def _unwrap(module: nn.Module) -> nn.Module:
    # DistributedDataParallel / torch.compile wrappers keep the real module here.
    while True:
        if hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: ``teacher_p = momentum * teacher_p + (1 - momentum) * student_p`` for every parameter.

    Parameters are paired by name (a mismatch in names or shapes raises).  Uses
    ``torch._foreach_mul_`` / ``torch._foreach_add_`` as DINOv2 does.
    """
    m = float(momentum)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {m}")
    t_named = list(_unwrap(teacher).named_parameters())
    s_named = list(_unwrap(student).named_parameters())
    if [n for n, _ in t_named] != [n for n, _ in s_named]:
        t_names = {n for n, _ in t_named}
        s_names = {n for n, _ in s_named}
        raise ValueError(
            "teacher and student parameters differ: only in teacher "
            f"{sorted(t_names - s_names)[:5]}, only in student {sorted(s_names - t_names)[:5]}"
        )
    t_params, s_params = [], []
    for (name, t), (_, s) in zip(t_named, s_named):
        if t.shape != s.shape:
            raise ValueError(f"shape mismatch for {name}: teacher {tuple(t.shape)} vs student {tuple(s.shape)}")
        t_params.append(t)
        s_params.append(s.detach().to(dtype=t.dtype, device=t.device))
    if not t_params or m == 1.0:
        return
    torch._foreach_mul_(t_params, m)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - m)


def copy_student_to_teacher(student: nn.Module) -> nn.Module:
    """The initial teacher: a deep copy of the student, frozen (requires_grad False, no grads),
    in eval mode, and with every DropPath rate set to 0 (the teacher never uses drop path, even
    if something later puts it back in train mode)."""
    teacher = copy.deepcopy(_unwrap(student))
    for p in teacher.parameters():
        p.requires_grad_(False)
        p.grad = None
    for mod in teacher.modules():
        if type(mod).__name__ == "DropPath" and hasattr(mod, "drop_prob"):
            mod.drop_prob = 0.0
    teacher.eval()
    return teacher


__all__ = ["copy_student_to_teacher", "ema_update"]
