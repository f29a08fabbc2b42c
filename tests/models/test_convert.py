"""Converters and load_backbone: outputs equal timm's and the official layouts are told apart
(file formats, round trips and bad input: test_checkpoint_files.py).

timm models are built with random weights (never downloaded). The official DINO / DINOv2 / MAE
layouts are made here by renaming a timm model's or this backbone's state dict.
"""
from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")
from timm.layers import SwiGLU, SwiGLUPacked  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

from ssl_vit.models import VisionTransformer  # noqa: E402
from ssl_vit.models.convert import convert_state_dict, detect_layout  # noqa: E402
from ssl_vit.models.load import load_backbone  # noqa: E402
from ssl_vit.models.pos_embed import sincos_2d_table  # noqa: E402
from tests.models.convert_helpers import (  # noqa: E402
    TOL, add_prefix, assert_matches_timm, dino_backbone_dict, max_abs, randomise, tiny_timm,
)


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
