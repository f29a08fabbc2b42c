"""python -m ssl_vit.export: timm loads the file and computes what the backbone computes; the
export comes back through load_backbone and model.init."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import ssl_vit
from ssl_vit.build import build_datamodule, build_method
from ssl_vit.config import backbone_arch
from ssl_vit.export import export
from ssl_vit.models import VisionTransformer
from tests.methods.training_helpers import TINY, compose_train

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "learned": dict(),
    "learned_registers_layerscale": dict(num_register_tokens=4, init_values=1e-5),
    "swiglu_layerscale": dict(ffn_layer="swiglu", init_values=1e-5),
    "sincos_registers": dict(pos_embed="sincos", num_register_tokens=2),
}


def random_backbone(**arch) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(**{"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2,
                                 **arch}).eval()
    with torch.no_grad():  # away from the init (zero tokens, unit LayerScale) so every tensor matters
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def as_checkpoint(backbone: VisionTransformer, path: Path) -> Path:
    torch.save({"state_dict": {f"teacher.backbone.{k}": v for k, v in backbone.state_dict().items()},
                "ssl_vit": {"method": "dinov2", "arch": backbone.arch, "backbone_prefix": "teacher.backbone.",
                            "preprocessing": {"dataset": "synthetic", "resolution": 32, "mean": [0.5] * 3,
                                              "std": [0.5] * 3}},
                "global_step": 7}, path)
    return path


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_timm_loads_the_export_and_computes_the_same_tokens(variant, tmp_path):
    backbone = random_backbone(**VARIANTS[variant])
    meta = export(as_checkpoint(backbone, tmp_path / "last.ckpt"), tmp_path / "out")
    state = load_file(str(tmp_path / "out" / "backbone.safetensors"))
    model = timm.create_model(meta["timm"]["model_name"], pretrained=False, **meta["timm"]["kwargs"]).eval()
    model.load_state_dict(state)  # strict: every key of timm's model, nothing else
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = backbone.forward_features(images)
        tokens = torch.cat([ours["x_norm_clstoken"][:, None], ours["x_norm_regtokens"], ours["x_norm_patchtokens"]], 1)
        assert (model(images) - backbone(images)).abs().max() <= 1e-5
        assert (model.forward_features(images) - tokens).abs().max() <= 1e-5
    written = json.loads((tmp_path / "out" / "backbone.json").read_text())
    assert written["preprocessing"]["resolution"] == 32 and written["source"]["global_step"] == 7
    assert written["arch"] == json.loads(json.dumps(backbone.arch))
    # Back through load_backbone: the same backbone.
    again = ssl_vit.load_backbone(tmp_path / "out" / "backbone.safetensors")
    assert again.pos_embed_type == backbone.pos_embed_type
    with torch.no_grad():
        assert (again.forward_features(images)["x_norm_patchtokens"] - ours["x_norm_patchtokens"]).abs().max() <= 1e-6


def test_rope_is_refused_with_the_reason(tmp_path):
    ckpt = as_checkpoint(random_backbone(pos_embed="rope"), tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match="pos_embed='rope' has no timm equivalent"):
        export(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_run_started_from_the_export_begins_with_the_same_embeddings(tmp_path):
    cfg = compose_train(TINY + ["method=dinov2"])
    torch.manual_seed(1)
    backbone = VisionTransformer(**backbone_arch(cfg.model)).eval()
    with torch.no_grad():
        for param in backbone.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    export(as_checkpoint(backbone, tmp_path / "last.ckpt"), tmp_path / "out")
    cfg = compose_train(TINY + ["method=dinov2", f"model.init={tmp_path / 'out' / 'backbone.safetensors'}"])
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    method = build_method(cfg, datamodule)
    size = cfg.model.img_size  # the exported model's native input size
    images = torch.randn(4, 3, size, size)
    with torch.no_grad():
        expected = backbone(images)
        for start in (method.student.backbone.eval(), method.teacher.backbone):
            assert (start(images) - expected).abs().max() <= 1e-5


def test_command_line_writes_both_files_and_names_a_missing_checkpoint(tmp_path):
    ckpt = as_checkpoint(random_backbone(), tmp_path / "last.ckpt")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "ssl_vit.export", f"checkpoint={ckpt}", f"hydra.run.dir={tmp_path / 'e'}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "e" / "backbone.safetensors").is_file() and (tmp_path / "e" / "backbone.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "ssl_vit.export", f"checkpoint={tmp_path / 'nope.ckpt'}",
                          f"hydra.run.dir={tmp_path / 'f'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "checkpoint=" in bad.stderr and "no such file" in bad.stderr
    assert "Traceback" not in bad.stderr
