"""Feature distillation: the cosine distance between student and teacher tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean(1 - cos(student_i, teacher_i))`` over every token (the last dimension is the feature
    dimension; both tensors of the same shape), in float32 with autocast off."""
    if student.shape != teacher.shape:
        raise ValueError(f"student tokens {tuple(student.shape)} and teacher tokens {tuple(teacher.shape)} differ "
                         "in shape (project the student to the teacher's width first)")
    with torch.autocast(device_type=student.device.type, enabled=False):
        return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8)).mean()
