"""The temperatures and the teacher's center folded into the heads' last matrix product
(``prototype_scores``, ``ssl_vit/methods/teacher_targets.py``) change nothing beyond float
rounding: against the logits divided and centered afterwards, as the released code computes
them, for the pieces and for whole DINOv2 / DINO steps (losses, gradients, center updates)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ssl_vit.build import build_datamodule, build_method
from ssl_vit.losses import DINOLoss, IBOTPatchLoss, koleo_loss_per_crop, local_center_statistics
from ssl_vit.methods.teacher_targets import teacher_targets
from ssl_vit.models.heads import DINOHead, prototype_scores
from tests.methods.training_helpers import compose_train, first_training_batch


def test_prototype_scores_equal_the_scaled_and_shifted_logits():
    torch.manual_seed(0)
    # As in the heads: unit-norm features and prototypes, logits in [-1, 1].
    features, prototypes = F.normalize(torch.randn(5, 7, 16), dim=-1), F.normalize(torch.randn(40, 16), dim=-1)
    shift = torch.randn(1, 40)
    logits = features @ prototypes.t()
    got = prototype_scores(features, prototypes, 1 / 0.07, shift)
    assert got.shape == (5, 7, 40)
    torch.testing.assert_close(got, logits / 0.07 + shift, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prototype_scores(features, prototypes, 10.0), logits * 10.0, rtol=1e-5, atol=1e-5)
    assert torch.equal(prototype_scores(features, prototypes), F.linear(features, prototypes))


@pytest.mark.parametrize("loss_type", [DINOLoss, IBOTPatchLoss])
def test_teacher_targets_and_center_equal_the_unfolded_ones(loss_type):
    torch.manual_seed(0)
    loss = loss_type(40, 0.1, 0.9)
    loss.center.copy_(torch.randn(1, 40) * 0.3)
    twin = copy.deepcopy(loss)
    features, prototypes = F.normalize(torch.randn(12, 16), dim=-1), F.normalize(torch.randn(40, 16), dim=-1)
    logits = features @ prototypes.t()
    got = teacher_targets(loss, features, prototypes, 0.04)
    torch.testing.assert_close(got, twin.softmax_center_teacher(logits, 0.04), rtol=1e-4, atol=1e-7)
    twin.accumulate_center(logits)
    torch.testing.assert_close(loss._pending_center_stats, twin._pending_center_stats, rtol=1e-5, atol=1e-6)
    loss.apply_center_update(), twin.apply_center_update()
    torch.testing.assert_close(loss.center, twin.center, rtol=1e-5, atol=1e-7)
    assert not torch.equal(loss.center, copy.deepcopy(twin).center * 0)  # it moved

    sinkhorn = teacher_targets(loss, features, prototypes, 0.04, "sinkhorn_knopp")
    torch.testing.assert_close(sinkhorn, twin.sinkhorn_teacher(logits, 0.04), rtol=1e-4, atol=1e-7)
    assert loss._pending_center_stats is None  # Sinkhorn-Knopp uses no center
    with pytest.raises(ValueError, match="method.centering='mean'; allowed: sinkhorn_knopp, centering"):
        teacher_targets(loss, features, prototypes, 0.04, "mean")


def test_student_losses_with_the_temperature_in_the_head_equal_and_give_the_same_gradients():
    torch.manual_seed(0)
    head = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16, norm_last_layer=False)
    twin = copy.deepcopy(head)
    dino, ibot = DINOLoss(64, student_temp=0.1), IBOTPatchLoss(64, student_temp=0.1)
    cls_tokens, patch_tokens = torch.randn(4 * 3, 32), torch.randn(6, 5, 32)
    cls_targets = torch.softmax(torch.randn(2, 3, 64) / 0.2, dim=-1)
    patch_targets = torch.softmax(torch.randn(6, 5, 64) / 0.2, dim=-1)
    masks = torch.rand(6, 5) < 0.5

    def losses(model, folded: bool):
        scale = 10.0 if folded else 1.0
        cls, patches = model(cls_tokens, scale), model(patch_tokens, scale)
        return (dino(cls.unflatten(0, (4, 3)), cls_targets, temperature_applied=folded),
                ibot.forward_masked(patches[masks], patch_targets[masks], masks, temperature_applied=folded),
                ibot.forward_all(patches, patch_targets, temperature_applied=folded))

    folded, plain = losses(head, True), losses(twin, False)
    for a, b in zip(folded, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    sum(folded).backward()
    sum(plain).backward()
    for (name, p), q in zip(head.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)  # gradients of order 1-5


def _method_and_batch(method: str, extra: list[str]):
    cfg = compose_train(["data=synthetic", "data.options.num_samples=64", "data.val_size=16", "model.depth=2",
                         "data.batch_size=6", "trainer.precision=32", f"method={method}", "model.drop_path_rate=0",
                         "method.head.out_dim=256", "method.head.hidden_dim=64", "method.head.bottleneck_dim=16",
                         *extra])
    datamodule = build_datamodule(cfg)
    torch.manual_seed(0)
    module = build_method(cfg, datamodule)
    module.log = module.log_dict = lambda *args, **kwargs: None
    datamodule.setup("fit")
    batch = first_training_batch(datamodule)
    with torch.no_grad():  # a center away from zero, so that its fold is exercised
        for loss in (module.dino_loss, getattr(module, "ibot_loss", None)):
            if loss is not None:
                loss.center.copy_(torch.randn_like(loss.center) * 0.2)
    return module, batch


def _unfolded_dinov2_terms(module, batch) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """DINOv2's step as the released code writes it: raw logits, then centering and temperatures."""
    globals_, locals_, masks = batch["global_crops"], batch["local_crops"], batch["masks"]
    b = globals_.shape[0] // 2
    n_crops = 2 + locals_.shape[0] // b
    temp, cfg = module.teacher_temp_at(module.global_step), module.cfg
    with torch.no_grad():
        out = module.teacher.backbone.forward_features(globals_)
        t_cls = module.teacher.dino_head(out["x_norm_clstoken"])
        t_patch = module.teacher.dino_head(out["x_norm_patchtokens"][masks])
        if cfg["centering"] == "centering":
            cls_targets = module.dino_loss.softmax_center_teacher(t_cls, temp)
            patch_targets = module.ibot_loss.softmax_center_teacher(t_patch, temp)
        else:
            cls_targets = module.dino_loss.sinkhorn_teacher(t_cls, temp)
            patch_targets = module.ibot_loss.sinkhorn_teacher(t_patch, temp)
    s_glob = module.student.backbone.forward_features(globals_, masks)
    s_loc = module.student.backbone.forward_features(locals_)
    s_cls = module.student.dino_head(torch.cat([s_glob["x_norm_clstoken"], s_loc["x_norm_clstoken"]]))
    s_patch = module.student.dino_head(s_glob["x_norm_patchtokens"][masks])
    terms = {"dino": module.dino_loss(list(s_cls.chunk(n_crops)), list(cls_targets.chunk(2))),
             "ibot": module.ibot_loss.forward_masked(s_patch, patch_targets, masks),
             "koleo": koleo_loss_per_crop(s_glob["x_norm_clstoken"], 2)}
    return terms, [local_center_statistics(t_cls), local_center_statistics(t_patch)]


def _unfolded_dino_terms(module, batch) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    globals_, locals_ = batch["global_crops"], batch["local_crops"]
    n_crops = 2 + locals_.shape[0] // (globals_.shape[0] // 2)
    with torch.no_grad():
        t_logits = module.teacher.dino_head(module.teacher.backbone(globals_))
        targets = module.dino_loss.softmax_center_teacher(t_logits, module.teacher_temp_at(module.global_step))
    s_cls = torch.cat([module.student.backbone(globals_), module.student.backbone(locals_)])
    s_logits = module.student.dino_head(s_cls)
    terms = {"dino": module.dino_loss(list(s_logits.chunk(n_crops)), list(targets.chunk(2)))}
    if module.cfg.get("koleo_loss_weight", 0.0):  # the CPU recipe's option
        terms["koleo"] = koleo_loss_per_crop(s_cls[: globals_.shape[0]], 2)
    return terms, [local_center_statistics(t_logits)]


@pytest.mark.parametrize("method, extra, reference", [
    ("dinov2", [], _unfolded_dinov2_terms),
    ("dinov2", ["method.centering=sinkhorn_knopp"], _unfolded_dinov2_terms),
    ("dino", [], _unfolded_dino_terms),
])
def test_the_step_equals_the_unfolded_computation(method, extra, reference):
    module, batch = _method_and_batch(method, extra)
    captured = {}
    checked_total = module.checked_total
    module.checked_total = lambda terms: captured.update(terms) or checked_total(terms)
    module.training_step(batch, 0).backward()
    grads = {n: p.grad.clone() for n, p in module.student.named_parameters() if p.grad is not None}
    losses = [loss for loss in (module.dino_loss, getattr(module, "ibot_loss", None)) if loss is not None]
    pending = [loss._pending_center_stats for loss in losses]

    module.student.zero_grad(set_to_none=True)
    terms, expected_stats = reference(module, batch)
    sum(captured[name][0] * value for name, value in terms.items()).backward()
    assert captured.keys() == terms.keys()
    for name, value in terms.items():
        torch.testing.assert_close(captured[name][1], value, rtol=1e-5, atol=1e-6, msg=name)
    assert grads.keys() == {n for n, p in module.student.named_parameters() if p.grad is not None}
    for name, p in module.student.named_parameters():
        if p.grad is not None:  # float rounding: within 1e-5 of each gradient's largest entry
            torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=1e-5 * float(p.grad.abs().max()), msg=name)
    if module.cfg.get("centering", "centering") == "centering":
        for got, expected in zip(pending, expected_stats):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:
        assert pending == [None, None]


def test_bf16_step_losses_stay_within_two_percent_of_fp32():
    """The issue's precision check on one batch: the DINOv2 step's loss terms under bf16 autocast
    (the default where bf16 is native) against fp32, same weights (the step changes none; its
    center statistics stay pending). Measured: iBOT 0.19%, DINO 0.02%, KoLeo 0.02%."""
    module, batch = _method_and_batch("dinov2", [])
    captured: dict[str, dict] = {"fp32": {}, "bf16": {}}
    for precision in ("fp32", "bf16"):
        module.checked_total = lambda terms, p=precision: captured[p].update(terms) or sum(
            w * v for w, v in terms.values())
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            module.training_step(batch, 0)
    for name in ("dino", "ibot", "koleo"):
        fp32, bf16 = captured["fp32"][name][1].item(), captured["bf16"][name][1].item()
        assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=2e-2), name
