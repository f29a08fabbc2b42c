"""Converters and load_backbone: outputs equal timm's, layouts are told apart, errors name keys.

timm models are built with random weights (never downloaded). The official DINO / DINOv2 / MAE
layouts are made here by renaming a timm model's or this backbone's state dict.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

timm = pytest.importorskip("timm")
from timm.layers import SwiGLU, SwiGLUPacked  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

import ssl_vit  # noqa: E402
from ssl_vit.models import VisionTransformer  # noqa: E402
from ssl_vit.models.convert import convert_state_dict, detect_layout  # noqa: E402
from ssl_vit.models.load import _from_training_checkpoint, load_backbone  # noqa: E402
from ssl_vit.models.pos_embed import sincos_2d_table  # noqa: E402

TOL = 1e-5


# ---------------------------------------------------------------- helpers
def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


@torch.no_grad()
def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Make token tables, LayerScale and norms non-trivial (inits are ~0 / 1e-5 / 1)."""
    for name, p in model.named_parameters():
        if name.endswith(("cls_token", "reg_token", "register_tokens", "mask_token", "pos_embed", "gamma")):
            p.copy_(torch.randn_like(p) * 0.1)
        elif "norm" in name:
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_timm(**kwargs) -> TimmViT:
    args = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, num_classes=10, dynamic_img_size=True)
    args.update(kwargs)
    torch.manual_seed(0)
    return randomise(TimmViT(**args))


@torch.no_grad()
def assert_matches_timm(backbone: VisionTransformer, model: TimmViT, images: torch.Tensor) -> None:
    ref = model.forward_features(images)  # all tokens, after the final norm
    out = backbone.forward_features(images)
    prefix, regs = model.num_prefix_tokens, model.num_reg_tokens
    assert max_abs(out["x_norm_clstoken"], ref[:, 0]) <= TOL
    assert max_abs(out["x_norm_regtokens"], ref[:, 1 : 1 + regs]) <= TOL
    assert max_abs(out["x_norm_patchtokens"], ref[:, prefix:]) <= TOL


@torch.no_grad()
def assert_same_outputs(a: VisionTransformer, b: VisionTransformer, images: torch.Tensor) -> None:
    out_a, out_b = a.forward_features(images), b.forward_features(images)
    for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
        assert max_abs(out_a[key], out_b[key]) <= TOL, key


def dinov2_reference_positions(pos_embed, patch, height, width, offset, antialias):
    """The DINOv2 (and DINO) training code's interpolate_pos_encoding, written out naively.

    Returns the (1, 1 + rows*cols, D) table: [CLS] entry, then the resampled patch positions.
    """
    num_patches = pos_embed.shape[1] - 1
    dim = pos_embed.shape[-1]
    side = int(math.sqrt(num_patches))
    rows, cols = height // patch, width // patch
    table = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if offset:
        scale = ((rows + offset) / side, (cols + offset) / side)
        table = F.interpolate(table, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        table = F.interpolate(table, size=(rows, cols), mode="bicubic", antialias=antialias)
    assert table.shape[-2:] == (rows, cols)
    table = table.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat([pos_embed[:, :1], table], dim=1)


def add_prefix(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


# ------------------------------------------------------ timm: real models
@pytest.fixture(scope="module")
def vit_s16():
    torch.manual_seed(0)
    model = randomise(timm.create_model("vit_small_patch16_224", pretrained=False, dynamic_img_size=True))
    return model, load_backbone(model.state_dict())


@pytest.fixture(scope="module")
def vit_s14_reg4():
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_small_patch14_reg4_dinov2", pretrained=False, img_size=224, dynamic_img_size=True
    )
    return randomise(model)


@pytest.mark.parametrize("size", [(224, 224), (224, 160)])
def test_timm_vit_s16_matches_timm(vit_s16, size):
    model, backbone = vit_s16
    assert detect_layout(model.state_dict()) == "timm"
    assert (backbone.interpolate_offset, backbone.interpolate_antialias) == (0.0, True)
    assert backbone.arch["img_size"] == 224 and backbone.arch["patch_size"] == 16
    assert (backbone.embed_dim, len(backbone.blocks), backbone.num_heads) == (384, 12, 6)
    assert not backbone.training
    torch.manual_seed(1)
    assert_matches_timm(backbone, model, torch.randn(2, 3, *size))


@pytest.mark.parametrize("size", [(224, 224), (224, 168)])
def test_timm_dinov2_reg4_matches_timm(vit_s14_reg4, size):
    model = vit_s14_reg4
    sd = model.state_dict()
    assert detect_layout(sd) == "timm"
    backbone = load_backbone(sd)
    assert backbone.num_register_tokens == 4 and backbone.arch["init_values"] is not None
    assert backbone.arch["patch_size"] == 14 and backbone.arch["img_size"] == 224
    assert (backbone.interpolate_offset, backbone.interpolate_antialias) == (0.0, True)
    # no_embed_class: the [CLS] entry of the table is a zero row, registers are unchanged.
    assert torch.equal(backbone.pos_embed[:, 0], torch.zeros_like(backbone.pos_embed[:, 0]))
    assert torch.equal(backbone.register_tokens, sd["reg_token"])
    torch.manual_seed(2)
    assert_matches_timm(backbone, model, torch.randn(2, 3, *size))


def test_timm_prefix_pos_embed_with_registers_is_folded():
    model = tiny_timm(reg_tokens=2, no_embed_class=False)
    sd = model.state_dict()
    assert sd["pos_embed"].shape[1] == 1 + 2 + 16
    backbone = load_backbone(sd)
    assert backbone.pos_embed.shape[1] == 1 + 16
    assert torch.allclose(backbone.register_tokens, sd["reg_token"] + sd["pos_embed"][:, 1:3])
    for size in [(32, 32), (40, 24)]:
        assert_matches_timm(backbone, model, torch.randn(2, 3, *size))


@pytest.mark.parametrize("mlp_layer", ["packed", "split"])
def test_timm_swiglu_feed_forward(mlp_layer):
    layer = SwiGLUPacked if mlp_layer == "packed" else SwiGLU
    ratio = 4.0 if mlp_layer == "packed" else 2.0  # hidden widths 128 and 256 (multiples of 8)
    model = tiny_timm(mlp_layer=layer, act_layer=torch.nn.SiLU, mlp_ratio=ratio)
    backbone = load_backbone(model.state_dict())
    assert backbone.arch["ffn_layer"] == "swiglu"
    assert_matches_timm(backbone, model, torch.randn(2, 3, 32, 32))


def test_num_heads_is_guessed_and_overridable():
    model = tiny_timm(num_heads=4)  # 128 channels: the default guess is 128 // 64 = 2 heads
    images = torch.randn(2, 3, 32, 32)
    guessed = load_backbone(model.state_dict())
    assert guessed.num_heads == 2
    with torch.no_grad():
        assert max_abs(guessed(images), model.forward_features(images)[:, 0]) > 1e-3
    given = load_backbone(model.state_dict(), num_heads=4)
    assert given.num_heads == 4
    assert_matches_timm(given, model, images)


def test_overrides_replace_inferred_convention():
    model = tiny_timm()
    layout, _, arch = convert_state_dict(model.state_dict(), interpolate_offset=0.1, interpolate_antialias=False)
    assert layout == "timm"
    assert (arch["interpolate_offset"], arch["interpolate_antialias"]) == (0.1, False)
    backbone = load_backbone(model.state_dict(), interpolate_offset=0.1, interpolate_antialias=False)
    assert (backbone.interpolate_offset, backbone.interpolate_antialias) == (0.1, False)


# ------------------------------------------------------------------ DINO
def dino_backbone_dict(model: TimmViT) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}


@pytest.mark.parametrize("form", ["released", "training"])
def test_dino_layout(form):
    model = tiny_timm()
    weights = dino_backbone_dict(model)
    if form == "released":
        checkpoint = weights
    else:
        head = {"head.mlp.0.weight": torch.randn(64, 128), "head.last_layer.weight_g": torch.ones(256, 1)}
        student = {k: v + 1.0 for k, v in weights.items()}  # must not be picked over the teacher
        checkpoint = {
            "teacher": {**add_prefix(weights, "backbone."), **head},
            "student": {**add_prefix(student, "module.backbone."), **add_prefix(head, "module.")},
            "epoch": 3,
            "args": argparse.Namespace(arch="vit_small", patch_size=8),
        }
    assert detect_layout(checkpoint) == "dino"
    backbone = load_backbone(checkpoint)
    assert (backbone.interpolate_offset, backbone.interpolate_antialias) == (0.1, False)
    assert torch.equal(backbone.mask_token, torch.zeros(1, 128))
    assert_matches_timm(backbone, model, torch.randn(2, 3, 32, 32))
    # Non-square: DINO's scale_factor=(rows + 0.1) / M convention.
    ref = dinov2_reference_positions(weights["pos_embed"], 8, 40, 24, offset=0.1, antialias=False)
    with torch.no_grad():
        assert max_abs(backbone.patch_positions((5, 3)), ref[:, 1:]) <= TOL


# ---------------------------------------------------------------- DINOv2
@pytest.fixture(scope="module")
def dinov2_no_registers():
    torch.manual_seed(0)
    src = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=128, depth=4, num_heads=2, init_values=1e-5, interpolate_offset=0.1
    )
    return randomise(src)


def dinov2_variant(sd: dict, form: str) -> dict:
    heads = {"dino_head.mlp.0.weight": torch.randn(64, 128), "ibot_head.mlp.0.weight": torch.randn(64, 128)}
    if form == "plain":
        return dict(sd)
    if form == "teacher":  # eval/<iter>/teacher_checkpoint.pth
        return {"teacher": {**add_prefix(sd, "backbone."), **heads}}
    if form == "chunked":  # block_chunks=2: blocks.<chunk>.<global index>.*
        chunked = {}
        for key, value in sd.items():
            parts = key.split(".")
            if parts[0] == "blocks":
                key = ".".join(["blocks", str(int(parts[1]) // 2)] + parts[1:])
            chunked[key] = value
        return {"teacher": {**add_prefix(chunked, "backbone."), **heads}}
    if form == "model":  # model_<iter>.rank_0.pth of the trainer
        student = {k: v + 1.0 for k, v in sd.items()}
        return {
            "model": {**add_prefix(sd, "teacher.backbone."), **add_prefix(student, "student.backbone.")},
            "iteration": 10,
        }
    raise AssertionError(form)


@pytest.mark.parametrize("form", ["plain", "teacher", "chunked", "model"])
def test_dinov2_without_registers(dinov2_no_registers, form):
    src = dinov2_no_registers
    sd = src.state_dict()
    checkpoint = dinov2_variant(sd, form)
    if form == "chunked":
        assert "backbone.blocks.1.3.ls1.gamma" in checkpoint["teacher"]
    assert detect_layout(checkpoint) == "dinov2"
    backbone = load_backbone(checkpoint)
    assert (backbone.interpolate_offset, backbone.interpolate_antialias) == (0.1, False)
    assert backbone.num_register_tokens == 0 and backbone.arch["init_values"] is not None
    loaded = backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())

    # Positions at a non-square size equal DINOv2's training-code interpolation.
    height, width = 40, 24
    ref = dinov2_reference_positions(sd["pos_embed"], 8, height, width, offset=0.1, antialias=False)
    with torch.no_grad():
        assert max_abs(backbone.patch_positions((5, 3)), ref[:, 1:]) <= TOL
    # And the whole forward equals a timm ViT built at that size holding the reference table.
    reference = TimmViT(
        img_size=(height, width), patch_size=8, embed_dim=128, depth=4, num_heads=2, init_values=1e-5, num_classes=0
    ).eval()
    reference.load_state_dict({**{k: v for k, v in sd.items() if k != "mask_token"}, "pos_embed": ref})
    assert_matches_timm(backbone, reference, torch.randn(2, 3, height, width))


@pytest.mark.parametrize("form", ["plain", "teacher"])
def test_dinov2_with_registers(vit_s14_reg4, form):
    model = vit_s14_reg4
    timm_sd = model.state_dict()
    # Official layout: register_tokens, mask_token, a pos_embed row for [CLS] (added to it).
    cls_pos = torch.randn(1, 1, 384) * 0.1
    sd = {k: v for k, v in timm_sd.items() if not k.startswith(("head.", "reg_token", "pos_embed", "cls_token"))}
    sd.update(
        cls_token=timm_sd["cls_token"] - cls_pos,
        pos_embed=torch.cat([cls_pos, timm_sd["pos_embed"]], dim=1),
        register_tokens=timm_sd["reg_token"],
        mask_token=torch.randn(1, 384),
    )
    checkpoint = dinov2_variant(sd, form)
    assert detect_layout(checkpoint) == "dinov2"
    backbone = load_backbone(checkpoint)
    # The released register models resize to the exact size with antialiasing.
    assert (backbone.interpolate_offset, backbone.interpolate_antialias) == (0.0, True)
    assert backbone.num_register_tokens == 4
    assert torch.equal(backbone.mask_token, sd["mask_token"])
    for size in [(224, 224), (224, 168)]:
        assert_matches_timm(backbone, model, torch.randn(2, 3, *size))


# ------------------------------------------------------------------- MAE
def test_mae_layout():
    model = tiny_timm()
    table = sincos_2d_table(128, 4, 4, cls_token=True).unsqueeze(0)
    with torch.no_grad():
        model.pos_embed.copy_(table)
    encoder = dino_backbone_dict(model)
    decoder = {
        "mask_token": torch.randn(1, 1, 64),
        "decoder_embed.weight": torch.randn(64, 128),
        "decoder_pos_embed": torch.zeros(1, 17, 64),
        "decoder_blocks.0.norm1.weight": torch.ones(64),
        "decoder_norm.weight": torch.ones(64),
        "decoder_pred.weight": torch.randn(192, 64),
    }
    checkpoint = {"model": {**encoder, **decoder}, "epoch": 799}
    assert detect_layout(checkpoint) == "mae"
    backbone = load_backbone(checkpoint)
    assert backbone.pos_embed_type == "learned" and torch.equal(backbone.pos_embed.detach(), table)
    assert (backbone.interpolate_offset, backbone.interpolate_antialias) == (0.0, False)
    assert torch.equal(backbone.mask_token, torch.zeros(1, 128))  # the decoder's one is dropped
    assert_matches_timm(backbone, model, torch.randn(2, 3, 32, 32))
    ref = dinov2_reference_positions(table, 8, 40, 24, offset=0.0, antialias=False)
    with torch.no_grad():
        assert max_abs(backbone.patch_positions((5, 3)), ref[:, 1:]) <= TOL


# --------------------------------------------------------- file round trips
def test_pth_round_trip(tmp_path):
    model = tiny_timm()
    path = tmp_path / "timm_vit.pth"
    torch.save(model.state_dict(), path)
    backbone = ssl_vit.load_backbone(path)  # the package-level entry point
    assert not backbone.training
    for size in [(32, 32), (40, 24)]:
        assert_matches_timm(backbone, model, torch.randn(2, 3, *size))


def test_pth_dino_training_checkpoint_with_args(tmp_path):
    model = tiny_timm()
    path = tmp_path / "checkpoint.pth"
    checkpoint = {"teacher": add_prefix(dino_backbone_dict(model), "backbone."), "epoch": 1}
    checkpoint["args"] = argparse.Namespace(lr=0.1, arch="vit_small")
    torch.save(checkpoint, path)
    backbone = load_backbone(path)
    assert backbone.interpolate_offset == 0.1
    assert_matches_timm(backbone, model, torch.randn(2, 3, 32, 32))


def test_safetensors_with_json_uses_stored_arch(tmp_path):
    torch.manual_seed(0)
    src = randomise(
        VisionTransformer(
            img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=4, ffn_layer="swiglu",
            init_values=1e-5, num_register_tokens=2, pos_embed="rope",
        )
    )
    save_file(src.state_dict(), tmp_path / "backbone.safetensors")
    meta = {"arch": src.arch, "preprocessing": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
    (tmp_path / "backbone.json").write_text(json.dumps(meta))
    backbone = load_backbone(tmp_path / "backbone.safetensors")
    assert backbone.arch == src.arch and not backbone.training
    for size in [(32, 32), (40, 24)]:
        assert_same_outputs(backbone, src, torch.randn(2, 3, *size))
    # Keyword arguments still override the stored arch.
    assert load_backbone(tmp_path / "backbone.safetensors", rope_theta=10.0).arch["rope_theta"] == 10.0


def test_safetensors_without_json_is_converted(tmp_path):
    model = tiny_timm()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    backbone = load_backbone(tmp_path / "model.safetensors")
    assert backbone.interpolate_antialias is True
    assert_matches_timm(backbone, model, torch.randn(2, 3, 40, 24))


def test_training_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    src = randomise(
        VisionTransformer(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, pos_embed="sincos")
    )
    ckpt = {
        "epoch": 4,
        "global_step": 100,
        # The student's backbone differs from the teacher's: only the teacher must be read.
        "state_dict": {
            **add_prefix(src.state_dict(), "teacher.backbone."),
            **add_prefix({k: v + 1 for k, v in src.state_dict().items()}, "student.backbone."),
        },
        "hyper_parameters": {"cfg": {"method": "dino"}, "when": datetime.date(2024, 1, 1)},
        "ssl_vit": {"arch": src.arch, "backbone_prefix": "teacher.backbone."},
    }
    arch, state_dict = _from_training_checkpoint(ckpt)
    assert arch == src.arch and set(state_dict) == set(src.state_dict())
    torch.save(ckpt, tmp_path / "last.ckpt")
    backbone = load_backbone(tmp_path / "last.ckpt")
    assert backbone.arch == src.arch and not backbone.training
    assert_same_outputs(backbone, src, torch.randn(2, 3, 40, 24))
    with pytest.raises(ValueError, match="backbone_prefix"):
        _from_training_checkpoint({"ssl_vit": {"arch": src.arch}})
    with pytest.raises(ValueError, match="no entries under 'encoder.'"):
        _from_training_checkpoint({**ckpt, "ssl_vit": {"arch": src.arch, "backbone_prefix": "encoder."}})


# --------------------------------------------------------------- bad input
def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = tiny_timm().state_dict()
    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"missing keys \[blocks\.1\.mlp\.fc2\.bias\]") as err:
        load_backbone(missing)
    assert "layout: timm" in str(err.value)

    unexpected = {**sd, "blocks.0.attn.q_norm.weight": torch.ones(64)}
    torch.save(unexpected, tmp_path / "unexpected.pth")
    with pytest.raises(ValueError, match=r"unexpected keys \[blocks\.0\.attn\.q_norm\.weight\]") as err:
        load_backbone(tmp_path / "unexpected.pth")
    assert "layout: timm" in str(err.value) and "unexpected.pth" in str(err.value)


def test_wrong_shape_names_key_and_shapes():
    sd = tiny_timm().state_dict()
    sd["norm.weight"] = torch.ones(129)
    with pytest.raises(ValueError, match=r"norm\.weight: the backbone expects \(128,\), the checkpoint has \(129,\)"):
        load_backbone(sd)
    # A patch size override that disagrees with the stored kernel.
    with pytest.raises(ValueError, match=r"patch_embed\.proj\.weight: .*\(128, 3, 4, 4\).*\(128, 3, 8, 8\)"):
        load_backbone(tiny_timm().state_dict(), patch_size=4, img_size=16)


def test_unknown_layout_lists_supported_ones(tmp_path):
    hf_style = {
        "embeddings.cls_token": torch.zeros(1, 1, 128),
        "encoder.layer.0.attention.attention.query.weight": torch.zeros(128, 128),
    }
    for call in (lambda: detect_layout(hf_style), lambda: load_backbone(hf_style)):
        with pytest.raises(ValueError, match="supported layouts: timm, dino, dinov2, mae"):
            call()
    with pytest.raises(ValueError, match="unknown layout 'jax'.*supported layouts"):
        load_backbone(tiny_timm().state_dict(), layout="jax")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown file type"):
        load_backbone(tmp_path / "weights.npz")


def test_untrusted_pickle_is_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": tiny_timm().state_dict(), "when": datetime.date(2024, 1, 1)}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_backbone(path)
