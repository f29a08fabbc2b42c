"""The step's fast paths change nothing beyond float rounding: one head call for [CLS] and patch
tokens equals two calls; the EMA over parameter lists built once is bit-identical to pairing by
name each step; foreach AdamW is bit-identical to the per-tensor loop and fused within rounding."""
from __future__ import annotations

import copy

import pytest
import torch

from ssl_vit.methods.ema import copy_student_to_teacher, ema_parameter_lists, ema_update, ema_update_lists
from ssl_vit.methods.param_groups import adamw
from ssl_vit.models.heads import DINOHead, cls_and_patch_logits
from ssl_vit.models.vision_transformer import VisionTransformer


def test_one_head_call_equals_two():
    torch.manual_seed(0)
    head = DINOHead(32, 256, hidden_dim=64, bottleneck_dim=16, nlayers=3)
    cls_tokens, patch_tokens = torch.randn(6, 32), torch.randn(6, 5, 32)
    cls_logits, patch_logits = cls_and_patch_logits(head, cls_tokens, head, patch_tokens)
    assert patch_logits.shape == (6, 5, 256)
    torch.testing.assert_close(cls_logits, head(cls_tokens), rtol=0, atol=1e-6)
    torch.testing.assert_close(patch_logits, head(patch_tokens), rtol=0, atol=1e-6)
    other = DINOHead(32, 128, hidden_dim=64, bottleneck_dim=16)
    separate = cls_and_patch_logits(head, cls_tokens, other, patch_tokens)
    assert torch.equal(separate[1], other(patch_tokens))  # separate heads: two calls, as before


def test_one_head_call_gives_the_same_gradients():
    torch.manual_seed(0)
    head = DINOHead(32, 256, hidden_dim=64, bottleneck_dim=16)
    twin = copy.deepcopy(head)
    cls_tokens, patch_tokens = torch.randn(6, 32), torch.randn(9, 32)
    a, b = cls_and_patch_logits(head, cls_tokens, head, patch_tokens)
    (a.logsumexp(-1).sum() + b.logsumexp(-1).mean()).backward()
    (twin(cls_tokens).logsumexp(-1).sum() + twin(patch_tokens).logsumexp(-1).mean()).backward()
    for (name, p), q in zip(head.named_parameters(), twin.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_ema_over_lists_built_once_is_bit_identical():
    torch.manual_seed(0)
    student = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4)
    teacher_a, teacher_b = copy_student_to_teacher(student), copy_student_to_teacher(student)
    lists = ema_parameter_lists(teacher_b, student)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    for momentum in (0.9, 0.99, 0.996):
        student(torch.randn(2, 3, 16, 16)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema_update(teacher_a, student, momentum)
        ema_update_lists(*lists, momentum)
    for (name, a), b in zip(teacher_a.named_parameters(), teacher_b.parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(teacher_a.cls_token, student.cls_token)  # it moved, and lags


def _trained(implementation: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4)
    optimizer = adamw([{"params": list(model.parameters()), "weight_decay": 0.04}], 1e-3, (0.9, 0.999),
                      implementation)
    for _ in range(3):
        model(torch.randn(4, 3, 16, 16)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def test_adamw_implementations_agree():
    loop, foreach, fused = (_trained(i) for i in ("for_loop", "foreach", "fused"))
    assert all(torch.equal(a, b) for a, b in zip(loop, foreach))
    # Adam's first steps normalise every gradient element (update ~ lr x sign): where a gradient
    # is near zero, the fused kernel's rounding can move that weight by up to ~lr (1e-3) per step.
    gaps = torch.cat([(a - b).abs().flatten() for a, b in zip(loop, fused)])
    assert gaps.max() < 3 * 1e-3 and (gaps > 1e-6).float().mean() < 0.5
    with pytest.raises(ValueError, match="optim.implementation='apex'; allowed: fused, foreach, for_loop"):
        adamw([{"params": [torch.zeros(1, requires_grad=True)]}], 1e-3, (0.9, 0.999), "apex")
