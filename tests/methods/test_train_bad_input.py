"""python -m ssl_vit.train on bad input: a messy image folder trains on its good images and
reports the skipped files; an empty folder or an impossible crop size fails before training."""
import io
import json
import logging
import time

import numpy as np
import pytest
from PIL import Image

from ssl_vit.train import run
from training_helpers import compose_train

# A tiny but complete DINOv2 run on an image folder (data.root is added per test).
FOLDER_RUN = [
    "data=imagefolder", "data.batch_size=4", "data.num_workers=0", "data.val_size=4", "model.depth=2",
    "method.crops.n_local=2", "method.head.out_dim=64", "method.head.hidden_dim=64",
    "method.head.bottleneck_dim=16", "method.ibot.head.out_dim=64", "trainer.precision=32",
    "trainer.max_steps=3", "trainer.enable_progress_bar=false", "logger=csv", "eval.knn_every_n_steps=0",
]


def _image(seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def messy_folder(tmp_path):
    root = tmp_path / "images"
    for label, name in enumerate(("shirt", "shoe")):
        (root / name).mkdir(parents=True)
        for i in range(8):
            (root / name / f"{i}.png").write_bytes(_image(10 * label + i, "PNG"))
    (root / "shirt" / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "shoe" / "truncated.png").write_bytes(_image(99, "PNG")[:200])
    (root / "shoe" / "readme.txt").write_text("not an image, and not named like one")
    (root / "shoe" / "empty.jpg").write_bytes(b"")
    return root


def test_messy_folder_trains_on_the_good_images_and_reports_the_skipped(messy_folder, tmp_path, caplog, capsys):
    cfg = compose_train(FOLDER_RUN + [f"data.root={messy_folder}", "eval.final_knn_max_train=6"])
    with caplog.at_level(logging.WARNING, logger="ssl_vit.data"):
        started = time.perf_counter()
        metrics = run(cfg, tmp_path / "run")
        elapsed = time.perf_counter() - started
    assert metrics["global_step"] == 3  # trained to the end
    # The training time excludes set-up and the final k-NN, so it is a part of the whole call.
    assert 0 < metrics["fit_seconds"] < elapsed
    assert metrics["skipped_files"] == 3  # corrupt.jpg, truncated.png, empty.jpg; readme.txt is no image
    printed = capsys.readouterr()
    assert "skipped 3 unreadable files" in printed.out
    assert "k-NN bank" in printed.err  # the final k-NN shows its progress
    assert any("corrupt.jpg" in r.getMessage() for r in caplog.records)
    assert 0.0 <= metrics["knn_top1"] <= 1.0  # the 16 good images are labelled: k-NN ran on them
    # 16 good images: 4 validation queries, a bank of 6 of the 12 others (eval.final_knn_max_train=6).
    assert (metrics["knn_bank_size"], metrics["knn_query_size"]) == (6, 4)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["skipped_files"] == 3 and saved["global_step"] == 3
    assert saved["fit_seconds"] == metrics["fit_seconds"]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


@pytest.mark.parametrize(
    "make_root, overrides, match",
    [
        ("empty", [], r"data.root=.*nothing_here. contains no image files"),
        ("messy", ["method.crops.global_size=30"], r"method.crops.global_size=30 is not a multiple of model.patch_size=4"),
        ("messy", ["eval.final_knn_max_train=0"], r"eval.final_knn_max_train=0; allowed: a positive number"),
    ],
)
def test_bad_input_fails_before_training(make_root, overrides, match, messy_folder, tmp_path):
    root = messy_folder
    if make_root == "empty":
        root = tmp_path / "nothing_here"
        root.mkdir()
    cfg = compose_train(FOLDER_RUN + [f"data.root={root}"] + overrides)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        run(cfg, out)
    assert not (out / "checkpoints").exists()  # nothing started


def _flat_folder(root, n):
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"img_{i:02d}.png").write_bytes(_image(200 + i, "PNG"))
    return root


def test_unlabelled_folder_trains_on_every_image_and_skips_knn(tmp_path, caplog):
    """The normal self-supervised case: images with no class subfolders. 24 images, batch 4:
    6 steps per epoch on all of them (a 10% carve-out would leave 22: 5 steps)."""
    root = _flat_folder(tmp_path / "flat", 24)
    cfg = compose_train(FOLDER_RUN + [f"data.root={root}", "data.val_size=null", "eval.knn_every_n_steps=1",
                                      "trainer.max_steps=-1", "trainer.max_epochs=1"])
    with caplog.at_level(logging.WARNING, logger="ssl_vit.train"):
        metrics = run(cfg, tmp_path / "run")
    assert metrics["global_step"] == 6
    notices = [r.getMessage() for r in caplog.records if "k-NN evaluation is skipped" in r.getMessage()]
    assert len(notices) == 1 and "have no class labels" in notices[0]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["knn_top1"] is None and "no class labels" in saved["knn_skipped_reason"]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_labelled_folder_too_small_to_evaluate_fails_before_training(tmp_path):
    root = tmp_path / "nine"
    for i in range(9):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(_image(300 + i, "PNG"))
    cfg = compose_train(FOLDER_RUN + [f"data.root={root}", "data.val_size=null", "data.batch_size=8"])
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"validation carve-out .* is empty \(9 images, data.val_size=None "
                                         r"\(10%, rounded down\)\): set data.val_size"):
        run(cfg, out)
    assert not (out / "checkpoints").exists()
    # With k-NN turned off the same folder trains (8 of its 9 images form the one batch).
    cfg = compose_train(FOLDER_RUN + [f"data.root={root}", "data.val_size=null", "data.batch_size=8",
                                      "eval.final_knn=false", "trainer.max_steps=1"])
    assert run(cfg, out)["global_step"] == 1
    # ... and its pictures show training images, there being no validation split to draw from.
    assert sorted(p.name for p in (out / "pictures").glob("*.png")) == ["attention_step0000001.png",
                                                                        "pca_step0000001.png"]
