"""method=distill: the frozen teacher, the EMA student, targets and losses, teachers of other shapes,
headless teachers through feature distillation, bad input, and the smoke command."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

import ssl_vit
from ssl_vit.build import build_datamodule, build_method, validate
from ssl_vit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_vit.losses.feature_distill import cosine_distance
from ssl_vit.methods.frozen_teacher import read_teacher_file, resample_patch_tokens
from ssl_vit.models import VisionTransformer
from tests.losses import loss_naive_refs as naive
from tests.methods.training_helpers import compose_train, fit

ROOT = Path(__file__).resolve().parents[2]
# A student on the tiny synthetic setting: width 96 (the teachers below are 192 or 128 wide).
DISTILL = ["method=distill", "data=synthetic", "data.options.num_samples=128", "data.val_size=64",
           "data.batch_size=16", "data.num_workers=0", "model.depth=1", "model.embed_dim=96",
           "method.crops.n_local=2", "trainer.precision=32"]


def save_teacher(tmp_path_factory, name: str, overrides: list[str]) -> Path:
    _, _, _, trainer = fit(overrides, max_steps=2)
    path = tmp_path_factory.mktemp(name) / "last.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def dinov2_teacher(tmp_path_factory) -> Path:
    """A DINOv2 checkpoint: width 192, depth 2, patch 4, one shared head of 128 prototypes."""
    return save_teacher(tmp_path_factory, "dinov2", ["method=dinov2"])


@pytest.fixture(scope="module")
def official_dinov2_file(tmp_path_factory) -> Path:
    """Weights in the released DINOv2 backbone layout (LayerScale, mask token, no heads): width 128."""
    torch.manual_seed(3)
    model = VisionTransformer(img_size=24, patch_size=4, embed_dim=128, depth=2, num_heads=2, init_values=1e-5,
                              interpolate_offset=0.1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    path = tmp_path_factory.mktemp("official") / "dinov2_vit_tiny.pth"
    torch.save(model.state_dict(), path)
    return path


def build(overrides: list[str]):
    cfg = compose_train(DISTILL + ["trainer.max_steps=10"] + overrides)
    validate(cfg)
    torch.manual_seed(0)
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    return cfg, datamodule, build_method(cfg, datamodule)


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class TeacherWatch(L.Callback):
    """After every step: the teacher has no gradients and nothing that could get one."""

    def __init__(self):
        self.checked = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        teacher = pl_module.teacher
        assert not teacher.training
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        self.checked += 1


def test_teacher_stays_bit_identical_and_the_ema_student_is_what_load_backbone_returns(dinov2_teacher, tmp_path):
    file = read_teacher_file(dinov2_teacher)
    watch = TeacherWatch()
    cfg, _, method, trainer = fit([f"method.teacher.checkpoint={dinov2_teacher}", "optim.lr=1e-3"], max_steps=6,
                                  callbacks=[watch], base=DISTILL)
    assert watch.checked == 6
    # The teacher is the file's backbone and heads, to the bit, after training.
    for name, tensor in file.backbone.state_dict().items():
        assert torch.equal(method.teacher.backbone.state_dict()[name], tensor), name
    for name, tensor in file.heads["dino_head"].state_dict().items():
        assert torch.equal(method.teacher.heads["dino_head"].state_dict()[name], tensor), name
    assert not any(id(p) in {id(q) for g in trainer.optimizers[0].param_groups for q in g["params"]}
                   for p in method.teacher.parameters())
    # The final model is the EMA copy, not the student.
    differ = [k for k, v in method.student.state_dict().items() if not torch.equal(v, method.student_ema.state_dict()[k])]
    assert differ, "the EMA copy equals the student: no EMA"
    path = tmp_path / "distilled.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    assert not any(k.startswith("teacher.") for k in saved["state_dict"]), "the frozen teacher is not stored"
    backbone = ssl_vit.load_backbone(path)
    assert backbone.embed_dim == 96
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, method.student_ema.backbone.state_dict()[name]), name
    # Its heads stay in the checkpoint: the next stage of a cascade reads them as its teacher's.
    nxt = read_teacher_file(path)
    assert set(nxt.heads) == {"dino_head"} and nxt.heads["dino_head"].in_dim == 96
    for name, tensor in nxt.heads["dino_head"].state_dict().items():
        assert torch.equal(tensor, method.student_ema.dino_head.state_dict()[name]), name
    # Resuming loads strictly although the teacher's entries were left out.
    resumed = build_method(cfg, _datamodule(cfg))
    L.Trainer(max_steps=7, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(resumed, datamodule=_datamodule(cfg), ckpt_path=path)
    assert resumed.global_step == 7


def _datamodule(cfg):
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    return datamodule


def test_step_computes_the_papers_losses_from_sinkhorn_targets_of_the_teachers_heads(dinov2_teacher):
    _, datamodule, method = build([f"method.teacher.checkpoint={dinov2_teacher}"])
    batch = next(iter(datamodule.train_dataloader()))
    keep = 3  # three images: small enough for the naive loops below
    globals_ = torch.cat([g[:keep] for g in batch["global_crops"].chunk(2)])
    locals_ = torch.cat([c[:keep] for c in batch["local_crops"].chunk(2)])
    captured = {}
    method.checked_total = lambda terms: captured.update(terms) or sum(w * v for w, v in terms.values())
    method.log_collapse_metrics = lambda *args: None
    method.eval()  # the student has no dropout or drop path anyway; eval only silences Lightning
    method.training_step({"global_crops": globals_, "local_crops": locals_,
                          "masks": torch.zeros(2 * keep, 0, dtype=torch.bool)}, 0)

    with torch.no_grad():
        teacher_out = method.teacher.backbone.forward_features(globals_)  # same normalisation: synthetic both
        t_cls = method.teacher.heads["dino_head"](teacher_out["x_norm_clstoken"])
        t_patch = method.teacher.heads["dino_head"](teacher_out["x_norm_patchtokens"])
        s_glob = method.student.backbone.forward_features(globals_)
        s_loc = method.student.backbone.forward_features(locals_)
        s_cls = method.student.dino_head(torch.cat([s_glob["x_norm_clstoken"], s_loc["x_norm_clstoken"]]))
        s_patch = method.student.dino_head(s_glob["x_norm_patchtokens"])
    temp = 0.04  # the CPU recipe's teacher temperature, held
    cls_targets = naive.sinkhorn(naive.to_lists(t_cls), temp)
    n_tok = t_patch.shape[1]
    flat_targets = naive.sinkhorn(naive.to_lists(t_patch.reshape(-1, t_patch.shape[-1])), temp)
    patch_targets = [flat_targets[i * n_tok:(i + 1) * n_tok] for i in range(2 * keep)]
    student_crops = [naive.to_lists(c) for c in s_cls.chunk(4)]
    dino, n_pairs, _ = naive.dino_loss(student_crops, [cls_targets[:keep], cls_targets[keep:]])
    assert n_pairs == 2 * 3  # 2 teacher views x (4 crops - 1)
    ibot = naive.ibot_all_loss(naive.to_lists(s_patch), patch_targets)
    koleo = sum(naive.koleo(naive.to_lists(c)) for c in s_glob["x_norm_clstoken"].chunk(2))
    assert captured["dino"][1].item() == pytest.approx(dino, rel=1e-4)
    assert captured["ibot"][1].item() == pytest.approx(ibot, rel=1e-4)
    assert captured["koleo"][1].item() == pytest.approx(koleo, rel=1e-4)
    assert [captured[k][0] for k in ("dino", "ibot", "koleo")] == [1.0, 1.0, 0.3]


def test_resampling_is_bilinear_on_the_token_grid():
    tokens = torch.tensor([[1.0, 3.0], [5.0, 9.0]]).reshape(1, 4, 1)  # 2x2 grid, one channel
    out = resample_patch_tokens(tokens, (2, 2), (4, 4)).reshape(4, 4)
    # align_corners=False: output k samples source coordinate (k + 0.5) / 2 - 0.5, clamped to [0, 1].
    weights = [0.0, 0.25, 0.75, 1.0]  # the share of the second row / column
    grid = [[1.0, 3.0], [5.0, 9.0]]
    for i, wi in enumerate(weights):
        for j, wj in enumerate(weights):
            expected = ((1 - wi) * ((1 - wj) * grid[0][0] + wj * grid[0][1])
                        + wi * ((1 - wj) * grid[1][0] + wj * grid[1][1]))
            assert out[i, j].item() == pytest.approx(expected)
    assert resample_patch_tokens(tokens, (2, 2), (2, 2)) is tokens


def test_teacher_of_another_width_depth_and_patch_size_trains_the_student(dinov2_teacher):
    # Teacher: width 192, depth 2, patch 4 (6x6 tokens on 24 px); student: width 64, depth 1, patch 2 (12x12).
    overrides = [f"method.teacher.checkpoint={dinov2_teacher}", "model.embed_dim=64", "model.num_heads=2",
                 "model.patch_size=2", "optim.lr=3e-3"]
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    _, datamodule, method, _ = fit(overrides, max_steps=16, callbacks=[Record()], base=DISTILL)
    assert method.teacher.backbone.patch_size == 4 and method.student.backbone.patch_size == 2
    images = next(iter(datamodule.train_dataloader()))["global_crops"][:2]
    cls, patches = method.teacher.tokens(images, (12, 12))
    assert cls.shape == (2, 192) and patches.shape == (2, 144, 192)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses


def test_dino_teacher_serves_patch_tokens_with_its_dino_head_and_separate_heads_are_copied(tmp_path_factory):
    dino = save_teacher(tmp_path_factory, "dino", ["method=dino"])
    _, _, method = build([f"method.teacher.checkpoint={dino}"])
    assert set(method.student) == {"backbone", "dino_head"}
    assert method.teacher.patch_head is method.teacher.heads["dino_head"]
    separate = save_teacher(tmp_path_factory, "dinov2_separate", [
        "method=dinov2", "method.ibot.separate_head=true", "method.ibot.head.out_dim=64",
        "method.ibot.head.hidden_dim=64", "method.ibot.head.bottleneck_dim=16"])
    _, _, method = build([f"method.teacher.checkpoint={separate}"])
    assert set(method.student) == {"backbone", "dino_head", "ibot_head"}
    for name in ("dino_head", "ibot_head"):
        teacher_spec, student_spec = method.teacher.heads[name].spec(), method.student[name].spec()
        assert {**teacher_spec, "in_dim": 96} == student_spec, name
    assert method.ibot_loss.patch_out_dim == 64 and method.dino_loss.out_dim == 128


def test_headless_official_dinov2_teacher_is_distilled_by_its_features(official_dinov2_file):
    overrides = [f"method.teacher.checkpoint={official_dinov2_file}", "method.teacher.load_kwargs.num_heads=2",
                 "optim.lr=3e-3"]
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    _, datamodule, method, _ = fit(overrides, max_steps=20, callbacks=[Record()], base=DISTILL)
    assert method.target == "features" and method.teacher.description == "outside weights"
    assert method.student["feature_proj"].weight.shape == (128, 96)  # student width -> teacher width
    assert not any("feature_proj" in k for k in ssl_vit.load_backbone(
        {"state_dict": method.state_dict(), "ssl_vit": {"arch": method.student.backbone.arch,
                                                         "backbone_prefix": "student_ema.backbone."}}).state_dict())
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    # The teacher sees the images as it was trained: ImageNet's normalisation, not the student's 0.5 / 0.5.
    images = next(iter(datamodule.train_dataloader()))["global_crops"][:2]
    pixels = images * 0.5 + 0.5
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = method.teacher.backbone.forward_features((pixels - mean) / std)["x_norm_clstoken"]
    cls, _ = method.teacher.tokens(images, (6, 6))
    assert torch.allclose(cls, expected, atol=1e-5)


def test_cosine_distance_matches_a_loop():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    values = []
    for i in range(2):
        for j in range(5):
            a, b = s[i, j].tolist(), t[i, j].tolist()
            dot = sum(x * y for x, y in zip(a, b))
            values.append(1 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))))
    assert cosine_distance(s, t).item() == pytest.approx(sum(values) / len(values), rel=1e-5)
    with pytest.raises(ValueError, match="differ in shape"):
        cosine_distance(s, t[..., :4])


def test_student_larger_than_its_teacher_is_allowed_and_warned_about(official_dinov2_file):
    with pytest.warns(UserWarning, match="larger than the teacher"):
        build([f"method.teacher.checkpoint={official_dinov2_file}", "model.embed_dim=192", "model.depth=4"])


@pytest.mark.parametrize("case", ["null", "missing", "truncated", "heads_of_headless", "bad_target", "patch"])
def test_bad_teacher_input_fails_before_training_naming_the_key(case, dinov2_teacher, official_dinov2_file, tmp_path):
    overrides = {
        "null": ([], r"method.teacher.checkpoint is required for method=distill"),
        "missing": ([f"method.teacher.checkpoint={tmp_path / 'nope.ckpt'}"],
                    r"method.teacher.checkpoint='.*nope.ckpt': no such file"),
        "truncated": ([f"method.teacher.checkpoint={tmp_path / 'cut.ckpt'}"],
                      r"method.teacher.checkpoint='.*cut.ckpt' cannot be read .*is the file complete"),
        "heads_of_headless": ([f"method.teacher.checkpoint={official_dinov2_file}", "method.teacher.target=heads"],
                              r"method.teacher.target=heads, but method.teacher.checkpoint is outside weights "
                              r"without projection heads; allowed for it: features"),
        "bad_target": ([f"method.teacher.checkpoint={dinov2_teacher}", "method.teacher.target=logits"],
                       r"method.teacher.target='logits'; allowed: one of auto, heads, features"),
        "patch": ([f"method.teacher.checkpoint={dinov2_teacher}", "method.crops.global_size=26",
                   "model.patch_size=2", "method.crops.local_size=12"],
                  r"method.crops.global_size=26 is not a multiple of the teacher's patch size 4"),
    }[case]
    if case == "truncated":
        data = dinov2_teacher.read_bytes()
        (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    extra, message = overrides
    with pytest.raises(ValueError, match=message):
        validate(compose_train(DISTILL + extra))


def test_smoke_command_distils_into_a_narrower_student_load_backbone_reads(dinov2_teacher, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ssl_vit.train", "method=distill", f"method.teacher.checkpoint={dinov2_teacher}",
           "model.embed_dim=96", "data=synthetic", "trainer.max_steps=6", f"hydra.run.dir={out}",
           "eval.final_knn=false", "eval.knn_every_n_steps=0", "trainer.enable_progress_bar=false"]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    backbone = ssl_vit.load_backbone(out / "checkpoints" / "last.ckpt")
    assert backbone.embed_dim == 96 and backbone.patch_size == 4 and len(backbone.blocks) == 6
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["ssl_vit"]["method"] == "distill"
    ema = {k[len("student_ema.backbone."):]: v for k, v in ckpt["state_dict"].items()
           if k.startswith("student_ema.backbone.")}
    assert all(torch.equal(v, ema[k]) for k, v in backbone.state_dict().items())
