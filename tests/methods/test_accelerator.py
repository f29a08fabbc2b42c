"""Training on the accelerator: the CPU always, a CUDA GPU in bf16 when the GPU tests are enabled
(``SSL_VIT_GPU_TESTS=1 python -m pytest -m gpu``, see tests/conftest.py).

The CPU suite covers the algorithms; these cover what only a run on the device exercises:
Lightning's bf16-mixed autocast through the whole step (losses, Sinkhorn-Knopp, KoLeo, EMA), the
final k-NN on the device the run trained on (Lightning moves the module back to the CPU when fit
ends), and a checkpoint written from device tensors loading on a machine without a GPU.
"""
import copy

import pytest
import torch

import ssl_vit
import ssl_vit.train as train_module
from test_learning import DINOV2_LEARNS, STEPS, LossAndEntropy, assert_learns
from training_helpers import TINY, compose_train, fit

ACCELERATORS = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.gpu
def test_dinov2_learns_on_cuda_in_bf16(cuda_device):
    """The CPU learning test (test_learning.py), trained on the GPU under bf16 autocast."""
    record = LossAndEntropy()
    _, datamodule, method, trainer = fit(DINOV2_LEARNS, max_steps=STEPS, callbacks=[record],
                                         accelerator="cuda", precision="bf16-mixed")
    assert trainer.strategy.root_device.type == "cuda"
    assert all(torch.isfinite(torch.tensor(record.loss)))
    assert_learns(record, datamodule, method)


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_entry_point_on_the_accelerator(accelerator, tmp_path, monkeypatch, request):
    """``ssl_vit.train.run`` with ``trainer.accelerator=ACC trainer.precision=auto``: trains there,
    ends with the k-NN on the same device, and leaves a checkpoint that loads onto the CPU."""
    if accelerator == "cuda":
        request.getfixturevalue("cuda_device")
    trainers, knn_devices = [], []
    build_trainer, knn_accuracies = train_module.build_trainer, train_module.knn_accuracies

    def recording_build_trainer(*args, **kwargs):
        trainers.append(build_trainer(*args, **kwargs))
        return trainers[-1]

    def recording_knn(backbones, bank, query, device, **kwargs):
        weights = {next(b.parameters()).device.type for b in backbones}
        knn_devices.append((torch.device(device).type, weights, kwargs.get("autocast_dtype")))
        return knn_accuracies(backbones, bank, query, device, **kwargs)

    monkeypatch.setattr(train_module, "build_trainer", recording_build_trainer)
    monkeypatch.setattr(train_module, "knn_accuracies", recording_knn)
    cfg = compose_train(TINY + ["method=dinov2", f"trainer.accelerator={accelerator}", "trainer.precision=auto",
                                "trainer.max_steps=4", "eval.knn_every_n_steps=0",
                                "trainer.enable_progress_bar=false"])
    metrics = train_module.run(cfg, tmp_path)

    (trainer,) = trainers
    assert trainer.strategy.root_device.type == accelerator
    assert metrics["global_step"] == 4
    if accelerator == "cuda":  # H100 / H200 / A100: bf16 is native, so `auto` picks it
        assert trainer.precision == "bf16-mixed"
    # The final k-NN ran where training ran, in the training's precision.
    bf16 = torch.bfloat16 if "bf16" in str(trainer.precision) else None
    assert knn_devices == [(accelerator, {accelerator}, bf16)]
    assert 0.0 <= metrics["knn_top1"] <= 1.0 and 0.0 <= metrics["knn_top1_random_init"] <= 1.0

    # The checkpoint loads on the CPU, and the same weights give the same embeddings on the device.
    backbone = ssl_vit.load_backbone(tmp_path / "checkpoints" / "last.ckpt")
    assert {p.device.type for p in backbone.parameters()} == {"cpu"}
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on_cpu = backbone(images)
        on_device = copy.deepcopy(backbone).to(accelerator)(images.to(accelerator)).cpu()
    assert torch.isfinite(on_cpu).all()
    # cuDNN convolutions (the patch embedding) use TF32 by default: agreement to ~1e-3, not bits.
    assert torch.allclose(on_device, on_cpu, atol=1e-2, rtol=1e-2)
