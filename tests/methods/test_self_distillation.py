"""DINO / DINOv2 on the real training path: the EMA teacher, gradients, checkpoints, seeds."""

import lightning as L
import pytest
import torch

import ssl_vit
from training_helpers import compose_train, fit, TINY
from ssl_vit.build import validate

METHODS = ["dino", "dinov2"]


class TeacherWatch(L.Callback):
    """Snapshots around each step: the teacher when the batch starts (before this step's EMA
    update) and student and teacher when it ends (after the optimizer step and the EMA update,
    which the module does in its optimizer_step, before any callback sees the step)."""

    def __init__(self):
        self.records = []  # (step, teacher_before, student_after, teacher_after)
        self._teacher_before = None

    @staticmethod
    def params(module):
        return {n: p.detach().clone() for n, p in module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._teacher_before = self.params(pl_module.teacher)
        for p in pl_module.teacher.parameters():
            assert not p.requires_grad and p.grad is None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.records.append((trainer.global_step - 1, self._teacher_before, self.params(pl_module.student),
                             self.params(pl_module.teacher)))


@pytest.mark.parametrize("name", METHODS)
def test_teacher_follows_the_ema_rule_and_never_gets_gradients(name):
    watch = TeacherWatch()
    _, _, method, _ = fit([f"method={name}", "method.momentum_teacher=0.9"], max_steps=4, callbacks=[watch])
    assert len(watch.records) == 4
    for step, teacher_before, student_after, teacher_after in watch.records:
        m = method.momentum_at(step)
        assert 0.9 <= m < 1.0
        for key in teacher_before:
            expected = m * teacher_before[key] + (1 - m) * student_after[key]
            assert torch.allclose(teacher_after[key], expected, atol=1e-6), key
    # The teacher moved away from its starting copy of the student, and has no gradients.
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    first = watch.records[0][1]
    assert any(not torch.equal(first[k], v) for k, v in TeacherWatch.params(method.teacher).items())
    # The teacher never uses drop path.
    assert all(getattr(m, "drop_prob", 0.0) == 0.0 for m in method.teacher.modules())


@pytest.mark.parametrize("name", METHODS)
def test_checkpoint_reloads_through_load_backbone_with_same_embeddings(name, tmp_path):
    _, _, method, trainer = fit([f"method={name}"], max_steps=2)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    backbone = ssl_vit.load_backbone(path)
    assert not backbone.training
    images = torch.randn(3, 3, 32, 32)
    method.teacher.backbone.eval()
    with torch.no_grad():
        assert torch.equal(backbone(images), method.teacher.backbone(images))
    meta = torch.load(path, weights_only=False)["ssl_vit"]
    assert meta["method"] == name and meta["preprocessing"]["channels"] == 3


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_same_result(name):
    runs = [fit([f"method={name}"], max_steps=3, seed=7)[2] for _ in range(2)]
    other = fit([f"method={name}"], max_steps=3, seed=8)[2]
    a, b, c = (dict(r.teacher.backbone.named_parameters()) for r in runs + [other])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_last_layer_frozen_during_the_first_steps():
    # DINO: no gradient at all; DINOv2: lr 0. Either way the prototypes do not move.
    for name in METHODS:
        watch = TeacherWatch()
        # 128 images / batch 16 = 8 steps per epoch: one epoch of freeze covers the 3 steps run.
        _, _, method, _ = fit([f"method={name}", "method.freeze_last_layer_epochs=1"], max_steps=3,
                              callbacks=[watch])
        start = watch.records[0][2]  # student after step 0
        now = TeacherWatch.params(method.student)
        for key in start:
            if "last_layer" in key:
                assert torch.equal(start[key], now[key]), (name, key)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["method.crops.global_size=30"], r"method.crops.global_size=30 is not a multiple of model.patch_size=4"),
        (["method.crops.local_size=18"], r"method.crops.local_size=18 is not a multiple of model.patch_size=4"),
        (["eval.knn_max_train=0"], r"eval.knn_max_train=0; allowed: a positive number"),
    ],
)
def test_bad_config_fails_before_training(overrides, match):
    with pytest.raises(ValueError, match=match):
        validate(compose_train(TINY + overrides))


def naive_koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo by a loop over rows: -mean_i log(||x_i - nearest other row|| + eps), rows normalised."""
    x = x / x.norm(dim=1, keepdim=True).clamp(min=eps)
    logs = []
    for i in range(len(x)):
        others = [j for j in range(len(x)) if j != i]
        j = max(others, key=lambda k: float(x[i] @ x[k]))
        logs.append(torch.log((x[i] - x[j] + eps).norm() + eps))
    return -torch.stack(logs).mean()


class StudentClsTokens(L.Callback):
    """Records the student backbone's [CLS] outputs of the first step and the logged loss terms."""

    def __init__(self):
        self.cls_tokens, self.metrics = None, None

    def on_train_start(self, trainer, pl_module):
        def keep(module, inputs, output):
            if self.cls_tokens is None:
                self.cls_tokens = torch.cat(output).detach().clone()
        self.handle = pl_module.student.backbone.register_forward_hook(keep)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.metrics is None:
            self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                            if k.startswith("loss")}
            self.batch_size = batch["global_crops"].shape[0] // 2
        self.handle.remove()


def test_dino_koleo_is_opt_in_and_computed_as_in_dinov2():
    """DINO has no KoLeo at weight 0; with method.koleo_loss_weight it adds DINOv2's term: KoLeo of
    the student backbone [CLS] tokens of each global crop, summed over the two crops."""
    plain = StudentClsTokens()
    fit(["method=dino", "method.koleo_loss_weight=0"], max_steps=1, callbacks=[plain])  # the recipe has 0.3
    assert "loss/koleo" not in plain.metrics
    assert plain.metrics["loss"] == pytest.approx(plain.metrics["loss/dino"])

    record = StudentClsTokens()
    fit(["method=dino", "method.koleo_loss_weight=0.5"], max_steps=1, callbacks=[record])
    b = record.batch_size
    expected = naive_koleo(record.cls_tokens[:b]) + naive_koleo(record.cls_tokens[b:2 * b])
    assert record.metrics["loss/koleo"] == pytest.approx(float(expected), rel=1e-5)
    expected_total = record.metrics["loss/dino"] + 0.5 * float(expected)
    assert record.metrics["loss"] == pytest.approx(expected_total, rel=1e-5)
