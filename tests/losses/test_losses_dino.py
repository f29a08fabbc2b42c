"""DINOLoss: pair selection, pair count, centering, center EMA and its timing."""
import math

import pytest
import torch

import loss_naive_refs as ref
from ssl_vit.losses import DINOLoss


def _crops(n, B, K, gen, scale=1.0):
    return [torch.randn(B, K, generator=gen, dtype=torch.float64) * scale for _ in range(n)]


@pytest.mark.parametrize("n_local", [0, 1, 4])
def test_loss_matches_naive_pair_loop(n_local):
    gen = torch.Generator().manual_seed(n_local)
    B, K = 3, 5
    student = _crops(2 + n_local, B, K, gen)
    teacher = [torch.softmax(t, -1) for t in _crops(2, B, K, gen)]
    expected, n_pairs, pairs = ref.dino_loss([ref.to_lists(s) for s in student], [ref.to_lists(t) for t in teacher])

    n_crops = 2 + n_local
    assert n_pairs == 2 * (n_crops - 1)
    assert (0, 0) not in pairs and (1, 1) not in pairs  # a global crop never meets itself
    assert all((0, v) in pairs and (1, v) in pairs for v in range(2, n_crops))  # locals see both

    got = DINOLoss(K)(student, teacher)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # stacked-tensor input and float32 give the same value
    got_stacked = DINOLoss(K)(torch.stack(student).float(), torch.stack(teacher).float())
    assert got_stacked.item() == pytest.approx(expected, rel=1e-5)


def test_gradients_pin_down_pairs_and_pair_count():
    """Hand computation. With zero student logits (uniform u) and one-hot teachers p0, p1, the
    gradient of the loss w.r.t. student crop s is sum over the teachers it is paired with of
    (u - p_t) / (student_temp * B * n_pairs). So global 0 only sees teacher 1, global 1 only
    teacher 0, each local sees both, and n_pairs = 2 * (n_crops - 1) = 6 for 2 + 2 crops."""
    B, K, T = 2, 4, 0.1
    student = [torch.zeros(B, K, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    p0 = torch.zeros(B, K, dtype=torch.float64)
    p0[:, 0] = 1
    p1 = torch.zeros(B, K, dtype=torch.float64)
    p1[:, 1] = 1
    loss = DINOLoss(K)(student, [p0, p1])
    # every pair has CE = log K with uniform student predictions
    assert loss.item() == pytest.approx(math.log(K), rel=1e-12)
    loss.backward()
    u = torch.full((B, K), 1.0 / K, dtype=torch.float64)
    scale = 1.0 / (T * B * 6)
    torch.testing.assert_close(student[0].grad, (u - p1) * scale)
    torch.testing.assert_close(student[1].grad, (u - p0) * scale)
    for s in student[2:]:
        torch.testing.assert_close(s.grad, (2 * u - p0 - p1) * scale)


def test_student_temperature_is_0_1_by_default():
    # Hand computation: one pair per teacher, K=2, student logits [0.1, 0] -> /0.1 -> [1, 0],
    # teacher one-hot on class 0: CE = -log(e / (e + 1)) = log(1 + e^-1) = 0.31326168751822286.
    s = torch.tensor([[0.1, 0.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    loss = DINOLoss(2)([s, s], [t, t])
    assert loss.item() == pytest.approx(0.31326168751822286, rel=1e-12)


def test_center_is_subtracted_before_the_temperature():
    # Hand computation: t = [1, 0], center = [0.5, 0], temp = 0.5:
    # (t - c) / temp = [1, 0] -> p0 = e / (e + 1) = 0.7310585786300049
    # (the wrong order t / temp - c = [1.5, 0] would give 0.8175744761936437).
    loss = DINOLoss(2)
    loss.center.copy_(torch.tensor([[0.5, 0.0]]))
    p = loss.softmax_center_teacher(torch.tensor([[1.0, 0.0]]), teacher_temp=0.5)
    assert p[0, 0].item() == pytest.approx(0.7310585786300049, rel=1e-6)
    assert p.dtype == torch.float32


def test_centered_softmax_matches_naive():
    gen = torch.Generator().manual_seed(1)
    B, K, temp = 4, 6, 0.04
    logits = torch.randn(2 * B, K, generator=gen)
    center = torch.randn(1, K, generator=gen) * 0.3
    loss = DINOLoss(K)
    loss.center.copy_(center)
    got = loss.softmax_center_teacher(logits.half(), temp)  # half input is computed in fp32
    expected = ref.centered_softmax(ref.to_lists(logits.half().float()), ref.to_lists(center)[0], temp)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_center_ema_momentum_0_9_of_raw_outputs_of_both_global_crops():
    gen = torch.Generator().manual_seed(2)
    B, K = 3, 4
    g0, g1 = torch.randn(B, K, generator=gen) * 3, torch.randn(B, K, generator=gen) * 3
    c0 = torch.randn(1, K, generator=gen)
    expected = ref.center_ema(ref.to_lists(c0)[0], [ref.to_lists(g0), ref.to_lists(g1)], momentum=0.9)

    for teacher_logits in (torch.cat([g0, g1]), [g0, g1], torch.stack([g0, g1])):
        loss = DINOLoss(K)
        assert loss.center_momentum == 0.9 and loss.student_temp == 0.1
        loss.center.copy_(c0)
        loss.update_center(teacher_logits)
        torch.testing.assert_close(loss.center, torch.tensor([expected], dtype=torch.float32))

    # raw logits, not probabilities: hand value with K=2 from zero center:
    # mean of rows [2, 0] and [0, 4] is [1, 2] -> center = 0.1 * [1, 2]
    loss = DINOLoss(2)
    loss.update_center(torch.tensor([[2.0, 0.0], [0.0, 4.0]]))
    torch.testing.assert_close(loss.center, torch.tensor([[0.1, 0.2]]))


def test_current_batch_is_not_in_the_center_used_for_its_targets():
    """Two steps in the documented order (targets with the old center, then update): the
    targets of step t use the center built from steps < t only."""
    gen = torch.Generator().manual_seed(3)
    B, K, temp = 2, 3, 0.07
    batches = [torch.randn(2 * B, K, generator=gen) * 2 for _ in range(2)]
    loss = DINOLoss(K)
    naive_center = [0.0] * K
    for t in batches:
        probs = loss.softmax_center_teacher(t, temp)
        expected = ref.centered_softmax(ref.to_lists(t), naive_center, temp)
        torch.testing.assert_close(probs, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)
        loss.update_center(t)
        naive_center = ref.center_ema(naive_center, [ref.to_lists(t)], 0.9)
    torch.testing.assert_close(loss.center, torch.tensor([naive_center], dtype=torch.float32))


def test_softmax_center_teacher_does_not_touch_the_center():
    loss = DINOLoss(3)
    loss.center.copy_(torch.tensor([[0.1, 0.2, 0.3]]))
    before = loss.center.clone()
    loss.softmax_center_teacher(torch.randn(4, 3), 0.04)
    loss.sinkhorn_teacher(torch.randn(4, 3), 0.04)
    assert torch.equal(loss.center, before)
    assert "center" in loss.state_dict()


def test_teacher_gets_no_gradient_and_student_does():
    gen = torch.Generator().manual_seed(4)
    student = [torch.randn(2, 3, generator=gen, requires_grad=True) for _ in range(3)]
    t_logits = torch.randn(4, 3, generator=gen, requires_grad=True)
    loss_fn = DINOLoss(3)
    probs = loss_fn.softmax_center_teacher(t_logits, 0.04)
    assert not probs.requires_grad
    loss_fn(student, probs.chunk(2)).backward()
    assert all(s.grad is not None and torch.isfinite(s.grad).all() for s in student)
    assert t_logits.grad is None


def test_bf16_autocast_does_not_round_the_loss():
    """Under bf16 autocast (the default on GPUs and bf16-capable CPUs) the loss is still computed
    in float32: same value and gradient as the naive float64 loop, to float32 accuracy."""
    gen = torch.Generator().manual_seed(7)
    B, K = 4, 64
    student = _crops(4, B, K, gen, scale=3.0)
    teacher = [torch.softmax(t, -1) for t in _crops(2, B, K, gen, scale=3.0)]
    expected, _, _ = ref.dino_loss([ref.to_lists(s) for s in student], [ref.to_lists(t) for t in teacher])

    logits = torch.stack(student).float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = DINOLoss(K)(logits, torch.stack(teacher).float())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-6)  # bf16 rounding alone is ~4e-3
    got.backward()
    reference = torch.stack(student).requires_grad_(True)
    DINOLoss(K)(reference, torch.stack(teacher)).backward()
    torch.testing.assert_close(logits.grad, reference.grad.float(), rtol=1e-5, atol=1e-7)
