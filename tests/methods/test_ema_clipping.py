"""EMA teacher update / initial copy, and the two gradient-clipping conventions."""
import math

import pytest
import torch
from torch import nn

from ssl_vit.methods.clipping import clip_global, clip_global_per_module, clip_per_tensor
from ssl_vit.methods.ema import copy_student_to_teacher, ema_update
from ssl_vit.models import build_backbone, preset
from ssl_vit.models.heads import DINOHead


# ----------------------------------------------------------------------------------- EMA
def two_linears():
    student, teacher = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[3.0, -1.0], [0.0, 2.0]]))
        student.bias.copy_(torch.tensor([1.0, 5.0]))
        teacher.weight.copy_(torch.tensor([[1.0, 1.0], [4.0, -2.0]]))
        teacher.bias.copy_(torch.tensor([0.0, 1.0]))
    return teacher, student


def test_ema_one_update_hand_values():
    teacher, student = two_linears()
    ema_update(teacher, student, momentum=0.75)
    # 0.75 * t + 0.25 * s, by hand
    assert torch.equal(teacher.weight, torch.tensor([[1.5, 0.5], [3.0, -1.0]]))
    assert torch.equal(teacher.bias, torch.tensor([0.25, 2.0]))
    # the student is untouched
    assert torch.equal(student.weight, torch.tensor([[3.0, -1.0], [0.0, 2.0]]))


def test_ema_matches_naive_formula_on_a_backbone_and_head():
    torch.manual_seed(0)
    student = nn.ModuleDict(
        {"backbone": build_backbone(preset("vit_cpu", depth=2, init_values=1e-5)), "head": DINOHead(192, 16, 32, 8)}
    )
    teacher = copy_student_to_teacher(student)
    with torch.no_grad():  # the student has moved on
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    m = 0.996
    expected = {
        n: [m * float(t) + (1 - m) * float(s) for t, s in zip(tp.flatten()[:50], sp.detach().flatten()[:50])]
        for (n, tp), (_, sp) in zip(teacher.named_parameters(), student.named_parameters())
    }
    ema_update(teacher, student, m)
    for n, tp in teacher.named_parameters():
        torch.testing.assert_close(tp.flatten()[:50], torch.tensor(expected[n]), rtol=1e-6, atol=1e-7)
        assert not tp.requires_grad


def test_ema_momentum_one_and_zero():
    teacher, student = two_linears()
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), before))
    ema_update(teacher, student, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))
    with pytest.raises(ValueError):
        ema_update(teacher, student, 1.5)
    with pytest.raises(ValueError):
        ema_update(teacher, nn.Linear(2, 2, bias=False), 0.5)


def test_copy_student_to_teacher():
    torch.manual_seed(0)
    student = build_backbone(preset("vit_cpu", depth=2, drop_path_rate=0.5, drop_path_uniform=True)).train()
    x = torch.randn(2, 3, 32, 32)
    student(x).sum().backward()
    teacher = copy_student_to_teacher(student)
    assert not teacher.training
    for (n, t), (_, s) in zip(teacher.named_parameters(), student.named_parameters()):
        assert torch.equal(t, s) and t.data_ptr() != s.data_ptr(), n
        assert not t.requires_grad and t.grad is None
        assert s.requires_grad
    # The teacher never uses drop path, even put back in train mode; the student keeps it.
    assert all(getattr(m, "drop_prob", 0.0) == 0.0 for m in teacher.modules())
    assert any(getattr(m, "drop_prob", 0.0) == 0.5 for m in student.modules())
    teacher.train()
    torch.testing.assert_close(teacher(x), teacher.eval()(x))
    # Changing the student does not change the teacher.
    with torch.no_grad():
        student.norm.weight.add_(1.0)
    assert not torch.equal(teacher.norm.weight, student.norm.weight)


# ------------------------------------------------------------------------------ clipping
def two_params():
    big, small = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    big.grad = torch.tensor([6.0, 8.0])  # norm 10
    small.grad = torch.tensor([0.6, 0.8])  # norm 1
    return big, small


def test_clip_per_tensor_clips_each_tensor_alone():
    big, small = two_params()
    norms = clip_per_tensor([big, small], 3.0)
    torch.testing.assert_close(norms, torch.tensor([10.0, 1.0]))
    coef = 3.0 / (10.0 + 1e-6)  # DINO's clip_coef
    torch.testing.assert_close(big.grad, torch.tensor([6.0 * coef, 8.0 * coef]))  # ~[1.8, 2.4]
    torch.testing.assert_close(big.grad.norm(), torch.tensor(3.0))
    assert torch.equal(small.grad, torch.tensor([0.6, 0.8]))  # under the limit: unchanged


def test_clip_global_scales_all_jointly():
    big, small = two_params()
    total = clip_global([big, small], 3.0)
    assert float(total) == pytest.approx(math.sqrt(101.0))
    coef = 3.0 / (math.sqrt(101.0) + 1e-6)
    torch.testing.assert_close(big.grad, torch.tensor([6.0 * coef, 8.0 * coef]))
    torch.testing.assert_close(small.grad, torch.tensor([0.6 * coef, 0.8 * coef]))  # also shrunk
    joint = torch.cat([big.grad, small.grad]).norm()
    torch.testing.assert_close(joint, torch.tensor(3.0))


def test_clip_global_per_module_and_missing_grads():
    a, b = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)
    a.weight.grad = torch.tensor([[30.0, 40.0]])  # norm 50 -> clipped to 3
    b.weight.grad = torch.tensor([[0.3, 0.4]])  # norm 0.5 -> untouched
    norms = clip_global_per_module({"backbone": a, "dino_head": b}, 3.0)
    assert set(norms) == {"backbone", "dino_head"}
    assert float(norms["backbone"]) == pytest.approx(50.0) and float(norms["dino_head"]) == pytest.approx(0.5)
    torch.testing.assert_close(a.weight.grad, torch.tensor([[30.0, 40.0]]) * 3.0 / (50.0 + 1e-6))
    assert torch.equal(b.weight.grad, torch.tensor([[0.3, 0.4]]))
    # Parameters without gradients are skipped (e.g. DINO's frozen last layer).
    c = nn.Parameter(torch.ones(3))
    big, _ = two_params()
    assert clip_per_tensor([c, big], 3.0).shape == (1,)
    assert c.grad is None
    assert clip_per_tensor(nn.Linear(2, 2), 3.0).numel() == 0
