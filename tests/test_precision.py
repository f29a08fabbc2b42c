"""trainer.precision=auto picks bf16 autocast only where bf16 is native; explicit values pass."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ssl_vit import precision
from ssl_vit.build import build_datamodule, build_trainer
from ssl_vit.precision import resolve_precision

CONF = Path(__file__).resolve().parents[1] / "conf"


def cpu_features(monkeypatch, amx: bool, avx512_bf16: bool):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)


@pytest.mark.parametrize("amx, avx512_bf16, expected", [
    (True, False, "bf16-mixed"), (False, True, "bf16-mixed"), (True, True, "bf16-mixed"),
    (False, False, "32"),  # e.g. an AVX2-only CPU: emulated bf16 is several times slower than fp32
])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, amx, avx512_bf16, expected):
    cpu_features(monkeypatch, amx, avx512_bf16)
    assert resolve_precision("auto", "cpu") == expected


@pytest.mark.parametrize("bf16_supported, expected", [(True, "bf16-mixed"), (False, "32")])
@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "auto"])
def test_auto_on_cuda_follows_the_gpus_bf16_support(monkeypatch, accelerator, bf16_supported, expected):
    cpu_features(monkeypatch, amx=not bf16_supported, avx512_bf16=False)  # the CPU must not decide
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    assert resolve_precision("auto", accelerator) == expected


def test_auto_with_accelerator_auto_and_no_gpu_uses_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu_features(monkeypatch, amx=True, avx512_bf16=False)
    assert resolve_precision("auto", "auto") == "bf16-mixed"
    cpu_features(monkeypatch, amx=False, avx512_bf16=False)
    assert resolve_precision("auto", "auto") == "32"


@pytest.mark.parametrize("explicit", ["32", "bf16-mixed", "16-mixed", 32, "64-true"])
def test_explicit_precision_is_kept(monkeypatch, explicit):
    cpu_features(monkeypatch, amx=True, avx512_bf16=True)
    assert resolve_precision(explicit, "cpu") == str(explicit)


def test_cpu_check_survives_a_torch_without_the_probes(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert precision.cpu_has_fast_bf16() is False


@pytest.mark.parametrize("fast, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_the_default_trainer_resolves_auto(monkeypatch, tmp_path, fast, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu_features(monkeypatch, amx=fast, avx512_bf16=False)
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="train", overrides=["data=synthetic", "eval.knn_every_n_steps=0"])
    assert cfg.trainer.precision == "auto"
    trainer = build_trainer(cfg, tmp_path, build_datamodule(cfg))
    assert trainer.precision == expected
