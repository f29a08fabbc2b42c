"""Pictures: attention maps and PCA against independent computations, the foreground proxy by
hand, the training callback's PNGs and python -m ssl_vit.visualize."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vit.callbacks.pictures import FeaturePictures
from ssl_vit.models import VisionTransformer
from ssl_vit.visualization import cls_attention_maps, foreground_iou, joint_pca, pca_foreground
from ssl_vit.visualization.pca import pixel_foreground
from tests.methods.training_helpers import fit

ROOT = Path(__file__).resolve().parents[1]


def test_cls_attention_maps_match_an_explicit_softmax_of_the_last_block():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                            num_register_tokens=1).eval()
    images = torch.randn(2, 3, 16, 12)  # a 4x3 grid: rows and columns must not be swapped
    seen = {}
    vit.blocks[-1].register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    vit.forward_features(images)
    x = vit.blocks[-1].norm1(seen["x"])
    qkv = x @ vit.blocks[-1].attn.qkv.weight.T + vit.blocks[-1].attn.qkv.bias
    q, k, _ = qkv.reshape(2, x.shape[1], 3, 2, 16).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)  # scale 1/sqrt(16)
    expected = weights[:, :, 0, 2:].reshape(2, 2, 4, 3)  # [CLS] row; skip [CLS] and the register
    assert torch.allclose(cls_attention_maps(vit, images), expected, atol=1e-6)


def test_joint_pca_projects_on_the_covariance_eigenvectors():
    torch.manual_seed(0)
    features = torch.randn(3, 5, 6) @ torch.randn(6, 6)
    flat = features.reshape(-1, 6).double().numpy()
    centred = flat - flat.mean(0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    expected = centred @ vectors[:, ::-1][:, :3]  # largest eigenvalues first
    got = joint_pca(features, 3).reshape(-1, 3).double().numpy()
    for c in range(3):  # an eigenvector's sign is arbitrary
        sign = np.sign(got[:, c] @ expected[:, c])
        assert np.allclose(got[:, c], sign * expected[:, c], atol=1e-4)


@pytest.mark.parametrize("object_value", [1.0, -1.0])
def test_foreground_sign_makes_the_border_background_whatever_the_svd_sign(object_value):
    # Two images on a 4x4 grid: the central 2x2 patches are the object. Features: one direction
    # times +-1, plus small noise; the object's sign is either way round.
    torch.manual_seed(0)
    truth = torch.zeros(2, 4, 4, dtype=torch.bool)
    truth[:, 1:3, 1:3] = True
    truth = truth.reshape(2, 16)
    direction = torch.randn(8)
    values = torch.where(truth, object_value, -object_value)
    features = values[..., None] * direction + 0.01 * torch.randn(2, 16, 8)
    assert torch.equal(pca_foreground(features, (4, 4)), truth)


def test_pixel_foreground_and_iou_by_hand():
    pixels = torch.zeros(1, 3, 4, 4)
    pixels[0, :, :2, :2] = 1.0  # the top-left 2x2 patch is bright
    pixels[0, :, 2, 2] = 1.0  # one bright pixel of four in the bottom-right patch: background
    assert pixel_foreground(pixels, 2).tolist() == [[True, False, False, False]]
    predicted = torch.tensor([[True, True, False, False]])
    truth = torch.tensor([[True, False, False, True]])
    assert foreground_iou(predicted, truth) == pytest.approx(1 / 3)


def test_training_writes_attention_and_pca_pictures_of_the_right_size(tmp_path):
    pictures = []

    class Capture(FeaturePictures):
        def render(self, pl_module, step):
            saved = super().render(pl_module, step)
            pictures.extend(path for path, _, _ in saved.values())
            return saved

    _, datamodule, _, _ = fit(["method=dinov2"], max_steps=1)  # only for its data module
    callback = Capture(datamodule, tmp_path, every_n_steps=2, num_images=4)
    fit(["method=dinov2"], max_steps=4, callbacks=[callback])
    names = sorted(p.name for p in pictures)
    assert names == ["attention_step0000002.png", "attention_step0000004.png", "pca_step0000002.png",
                     "pca_step0000004.png"]
    size = datamodule.image_size  # 4 columns of images, 1 px lines; rows: image + 3 heads / image + 2
    for path in pictures:
        picture = np.asarray(Image.open(path))
        rows = 4 if path.name.startswith("attention") else 3
        assert picture.shape == (rows * (size + 1) + 1, 4 * (size + 1) + 1, 3)
        inner = picture[size + 2: -1, 1:-1]  # below the originals
        assert inner.std() > 5, path.name  # neither blank nor constant


def run_visualize(*overrides):
    return subprocess.run([sys.executable, "-m", "ssl_vit.visualize", *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_visualize_command_on_a_checkpoint_and_on_outside_weights(tmp_path):
    _, _, _, trainer = fit(["method=dinov2"], max_steps=1)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    own = run_visualize(f"checkpoint={ckpt}", f"hydra.run.dir={tmp_path / 'a'}", "num_images=3")
    assert own.returncode == 0, own.stderr[-2000:]
    assert Image.open(tmp_path / "a" / "pca.png").size[0] == 3 * (24 + 1) + 1  # the checkpoint's 24 px

    torch.manual_seed(0)
    outside = tmp_path / "vit.pth"
    torch.save(VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=1).state_dict(), outside)
    refused = run_visualize(f"checkpoint={outside}", f"hydra.run.dir={tmp_path / 'b'}")
    assert refused.returncode == 2 and "images=FILE_OR_FOLDER is required" in refused.stderr
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((40, 50, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    ok = run_visualize(f"checkpoint={outside}", f"images={folder}", f"hydra.run.dir={tmp_path / 'c'}")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "1 unreadable files skipped" in ok.stdout
    assert Image.open(tmp_path / "c" / "attention.png").size == (2 * 33 + 1, 2 * 33 + 1)  # 1 head
