"""Backbone files: .pth, safetensors (with or without the architecture's JSON) and training
checkpoints load back to the same outputs; missing or unexpected keys, wrong shapes, unknown
layouts and untrusted pickles get errors that name them."""
from __future__ import annotations

import argparse
import datetime
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import save_file

timm = pytest.importorskip("timm")

import ssl_vit  # noqa: E402
from ssl_vit.models import VisionTransformer  # noqa: E402
from ssl_vit.models.convert import detect_layout  # noqa: E402
from ssl_vit.models.load import _from_training_checkpoint, load_backbone  # noqa: E402
from tests.models.convert_helpers import (  # noqa: E402
    add_prefix, assert_matches_timm, assert_same_outputs, dino_backbone_dict, randomise, tiny_timm,
)


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
