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


def ema_parameter_lists(teacher: nn.Module, student: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The teacher's and the student's parameters, paired by name (a mismatch in names or shapes
    raises): build once, then :func:`ema_update_lists` every step."""
    t_named = list(_unwrap(teacher).named_parameters())
    s_named = list(_unwrap(student).named_parameters())
    if [n for n, _ in t_named] != [n for n, _ in s_named]:
        t_names = {n for n, _ in t_named}
        s_names = {n for n, _ in s_named}
        raise ValueError(
            "teacher and student parameters differ: only in teacher "
            f"{sorted(t_names - s_names)[:5]}, only in student {sorted(s_names - t_names)[:5]}"
        )
    for (name, t), (_, s) in zip(t_named, s_named):
        if t.shape != s.shape:
            raise ValueError(f"shape mismatch for {name}: teacher {tuple(t.shape)} vs student {tuple(s.shape)}")
    return [t for _, t in t_named], [s for _, s in s_named]


@torch.no_grad()
def ema_update_lists(t_params: list[torch.Tensor], s_params: list[torch.Tensor], momentum: float) -> None:
    """In place: ``t = momentum * t + (1 - momentum) * s`` over paired parameter lists, with
    ``torch._foreach_mul_`` / ``torch._foreach_add_`` as DINOv2 does."""
    m = float(momentum)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {m}")
    if not t_params or m == 1.0:
        return
    sources = [s.detach().to(dtype=t.dtype, device=t.device) for t, s in zip(t_params, s_params)]
    torch._foreach_mul_(t_params, m)
    torch._foreach_add_(t_params, sources, alpha=1.0 - m)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: ``teacher_p = momentum * teacher_p + (1 - momentum) * student_p`` for every
    parameter, paired by name (the lists are built on each call; a training loop keeps them from
    :func:`ema_parameter_lists` instead)."""
    ema_update_lists(*ema_parameter_lists(teacher, student), momentum)


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


__all__ = ["copy_student_to_teacher", "ema_parameter_lists", "ema_update", "ema_update_lists"]
