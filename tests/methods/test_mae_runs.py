"""method=mae end to end: the smoke command, the checkpoint contract, pictures, and learning."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import ssl_vit
from ssl_vit.evaluation.reconstruction import heldout_reconstruction, trivial_prediction
from ssl_vit.losses.mae import patchify
from tests.methods.test_mae import MAE_TINY
from tests.methods.training_helpers import fit

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_command_writes_a_checkpoint_load_backbone_reads_as_the_encoder(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ssl_vit.train", "method=mae", "data=synthetic", "trainer.max_steps=6",
           f"hydra.run.dir={out}", "eval.knn_every_n_steps=0",
           "method.pictures.every_n_steps=3", "trainer.enable_progress_bar=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt_path = out / "checkpoints" / "last.ckpt"
    backbone = ssl_vit.load_backbone(ckpt_path)
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["ssl_vit"]["method"] == "mae" and ckpt["global_step"] == 6
    encoder = {k[len("encoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.")}
    assert set(backbone.state_dict()) == set(encoder)
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, encoder[key]), key
    assert backbone.pos_embed_type == "sincos" and not any(k.startswith("decoder") for k in backbone.state_dict())
    # Pictures at steps 3 and 6: 4 rows (original, masked, reconstruction, pasted) of 8 images of
    # 28 px (the recipe's crop size), 1 px apart.
    pictures = sorted((out / "pictures").glob("reconstruction_*.png"))
    assert [p.name for p in pictures] == ["reconstruction_step0000003.png", "reconstruction_step0000006.png"]
    assert Image.open(pictures[0]).size == (8 * 29 + 1, 4 * 29 + 1)
    # After the final k-NN: the held-out reconstruction on the validation split, as
    # heldout_reconstruction computes it for the checkpoint's model on the same images and masks.
    import json

    from ssl_vit.data.datamodule import SSLDataModule
    from ssl_vit.methods import MAE

    metrics = json.loads((out / "metrics.json").read_text())
    method = MAE.load_from_checkpoint(ckpt_path, map_location="cpu")
    pre = ckpt["ssl_vit"]["preprocessing"]
    datamodule = SSLDataModule(dataset="synthetic", val_size=pre["val_size"], image_size=pre["resolution"],
                               mean=pre["mean"], std=pre["std"])
    datamodule.setup("fit")
    expected = heldout_reconstruction(method, datamodule.knn_dataloaders("val", num_workers=0)[1], seed=0)
    assert metrics["heldout_mae_loss"] == pytest.approx(expected["mae_loss"], rel=1e-5)
    assert metrics["heldout_ratio_to_trivial"] == pytest.approx(expected["ratio_to_trivial"], rel=1e-5)
    assert f"heldout_ratio_to_trivial={metrics['heldout_ratio_to_trivial']:.4f}" in result.stdout


def test_trivial_predictor_is_zero_or_each_images_mean_visible_pixel():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float64).view(2, 3, 4, 4)
    mask = torch.tensor([[0, 1, 1, 1], [1, 0, 0, 1]], dtype=torch.float64)
    assert torch.equal(trivial_prediction(images, mask, 2, True), torch.zeros(2, 4, 12, dtype=torch.float64))
    pred = trivial_prediction(images, mask, 2, False)
    for b in range(2):
        visible = [i for i in range(4) if mask[b, i] == 0]
        for ch in range(3):
            rows_cols = [(i // 2 * 2 + r, i % 2 * 2 + c) for i in visible for r in range(2) for c in range(2)]
            expected = sum(float(images[b, ch, y, x]) for y, x in rows_cols) / len(rows_cols)
            assert pred[b, :, ch::3].unique().tolist() == [expected]
    assert pred.shape == patchify(images, 2).shape


@pytest.fixture(scope="module")
def mae_run():
    losses = []

    class RecordLoss(__import__("lightning").Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    # Noise-free synthetic images: per-patch normalised Gaussian noise cannot be predicted at all.
    overrides = ["method.norm_pix_loss=true", "optim.lr=1e-2", "optim.warmup_epochs=0.5", "+data.options.noise=0.0",
                 "method.pictures.every_n_steps=0", "data.options.num_samples=512"]
    _, datamodule, method, _ = fit(overrides, max_steps=300, callbacks=[RecordLoss()], base=MAE_TINY)
    return losses, datamodule, method


def test_mae_learns_to_reconstruct_held_out_images(mae_run):
    losses, datamodule, method = mae_run
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, f"training loss {first:.3f} -> {last:.3f}"
    _, val = datamodule.knn_dataloaders("val", num_workers=0)
    held_out = heldout_reconstruction(method, val, seed=0)
    # norm_pix targets: predicting 0 costs (n-1)/n of each patch's variance ratio, about 0.98.
    assert 0.9 < held_out["trivial_loss"] < 1.0
    assert held_out["ratio_to_trivial"] < 0.8, held_out
