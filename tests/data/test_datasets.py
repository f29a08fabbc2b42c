"""Data sets: Fashion-MNIST preparation and splits, image folders with broken files, synthetic data."""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vit.data.datasets import build_dataset, build_datasets, resolve_val_size, split_indices
from ssl_vit.data.fashion_mnist import (
    DEBIAN_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    RAW_FILES,
    FashionMNISTDataset,
    prepare_fashion_mnist,
)
from ssl_vit.data.imagefolder import ImageFolderDataset
from ssl_vit.data.synthetic import SyntheticDataset

HAS_FASHION_MNIST = all((Path(DEBIAN_DIR) / f"{name}.gz").is_file() for name in RAW_FILES)
needs_fashion_mnist = pytest.mark.skipif(
    not HAS_FASHION_MNIST, reason="apt-get install dataset-fashion-mnist to run this test"
)


@pytest.fixture(scope="session")
def fm_root(tmp_path_factory) -> Path:
    if not HAS_FASHION_MNIST:
        pytest.skip("apt-get install dataset-fashion-mnist to run this test")
    root = tmp_path_factory.mktemp("fashion_mnist")
    prepare_fashion_mnist(root)
    return root


@pytest.fixture(scope="session")
def fm_splits(fm_root):
    return build_datasets("fashion_mnist", splits=("train", "val", "test", "trainval"), root=str(fm_root))


# ------------------------------------------------------------------------------------ splits ----
def test_split_indices_stratified_and_deterministic():
    labels = [0] * 60 + [1] * 30 + [2] * 10
    train, val = split_indices(labels, 10, seed=3)
    assert sorted(train + val) == list(range(100)) and not set(train) & set(val)
    counts = np.bincount([labels[i] for i in val], minlength=3)
    assert counts.tolist() == [6, 3, 1]
    assert split_indices(labels, 10, seed=3) == (train, val)
    assert split_indices(labels, 10, seed=4)[1] != val
    assert resolve_val_size(0.1, 100) == 10 and resolve_val_size(7, 100) == 7
    with pytest.raises(ValueError, match="data.val_size"):
        resolve_val_size(100, 100)


def test_unknown_dataset_name_lists_allowed():
    with pytest.raises(ValueError, match="fashion_mnist, imagefolder, synthetic"):
        build_dataset("cifar10")


# ----------------------------------------------------------------------------- Fashion-MNIST ----
@needs_fashion_mnist
def test_prepare_fashion_mnist_is_idempotent(tmp_path):
    raw = prepare_fashion_mnist(tmp_path)
    assert raw == tmp_path / "FashionMNIST" / "raw"
    assert sorted(os.listdir(raw)) == sorted(RAW_FILES)  # no temporary files left over
    assert (raw / "train-images-idx3-ubyte").stat().st_size == 16 + 60000 * 28 * 28
    before = {name: (raw / name).stat() for name in RAW_FILES}
    assert prepare_fashion_mnist(tmp_path) == raw
    for name in RAW_FILES:
        after = (raw / name).stat()
        assert (after.st_mtime_ns, after.st_ino) == (before[name].st_mtime_ns, before[name].st_ino)
    # a truncated file is detected and replaced, the others are left alone
    with open(raw / "t10k-labels-idx1-ubyte", "r+b") as f:
        f.truncate(100)
    prepare_fashion_mnist(tmp_path)
    assert (raw / "t10k-labels-idx1-ubyte").stat().st_size == 8 + 10000
    assert (raw / "train-images-idx3-ubyte").stat().st_mtime_ns == before["train-images-idx3-ubyte"].st_mtime_ns


def test_prepare_fashion_mnist_without_source_says_how_to_get_it(tmp_path):
    with pytest.raises(RuntimeError, match="apt-get install dataset-fashion-mnist") as info:
        prepare_fashion_mnist(tmp_path / "data", source_dir=tmp_path / "nothing", download=False)
    assert "data.root" in str(info.value)


@needs_fashion_mnist
def test_fashion_mnist_split_sizes_disjoint_and_labels(fm_splits):
    train, val, test, trainval = (fm_splits[s] for s in ("train", "val", "test", "trainval"))
    assert (len(train), len(val), len(test), len(trainval)) == (55000, 5000, 10000, 60000)
    assert not set(train.indices) & set(val.indices)
    assert sorted(train.indices + val.indices) == list(range(60000))
    assert np.bincount(val.targets).tolist() == [500] * 10  # stratified carve-out
    for ds in (train, val, test):
        assert min(ds.targets) == 0 and max(ds.targets) == 9
    image, label = val[0]
    assert isinstance(image, Image.Image) and image.mode == "L" and image.size == (28, 28)
    assert isinstance(label, int) and label == val.targets[0]
    # the val image really is that training image
    assert torch.equal(torch.from_numpy(np.array(image)), trainval.data[val.indices[0]])


@needs_fashion_mnist
def test_fashion_mnist_carve_out_is_deterministic(fm_root, fm_splits):
    again = FashionMNISTDataset(fm_root, split="val")
    assert again.indices == fm_splits["val"].indices
    other = FashionMNISTDataset(fm_root, split="val", split_seed=1)
    assert other.indices != again.indices and len(other) == 5000
    small = FashionMNISTDataset(fm_root, split="val", val_size=1000)
    assert len(small) == 1000 and np.bincount(small.targets).tolist() == [100] * 10


@needs_fashion_mnist
def test_fashion_mnist_mean_std(fm_splits):
    """Recomputes the hard-coded normalisation constants from the training data."""
    stats = {}
    for split in ("trainval", "train"):
        x = fm_splits[split].data.double() / 255.0
        stats[split] = (x.mean().item(), x.std(unbiased=False).item())
    print("Fashion-MNIST mean/std:", stats)
    mean60k, std60k = stats["trainval"]
    assert abs(mean60k - FASHION_MNIST_MEAN) < 1e-4 and abs(std60k - FASHION_MNIST_STD) < 1e-4
    mean55k, std55k = stats["train"]
    assert abs(mean55k - FASHION_MNIST_MEAN) < 5e-4 and abs(std55k - FASHION_MNIST_STD) < 5e-4


# ------------------------------------------------------------------------------ image folder ----
def _save(path: Path, fmt: str, seed: int, size=(24, 20), mode="RGB") -> None:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, format=fmt)


def _truncated(fmt: str, seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, format=fmt)
    data = buf.getvalue()
    return data[: len(data) // 2]


@pytest.fixture
def image_tree(tmp_path) -> Path:
    root = tmp_path / "images"
    (root / "cat" / "nested").mkdir(parents=True)
    (root / "dog").mkdir()
    _save(root / "cat" / "a.png", "PNG", 0)
    _save(root / "cat" / "b.jpg", "JPEG", 1)
    _save(root / "cat" / "nested" / "c.png", "PNG", 2, mode="L")  # grayscale, in a sub-subfolder
    _save(root / "dog" / "d.PNG", "PNG", 3)  # upper-case extension
    _save(root / "dog" / "e.jpeg", "JPEG", 4)
    (root / "cat" / "corrupt.jpg").write_bytes(np.random.default_rng(5).bytes(600))  # random bytes
    (root / "dog" / "truncated.png").write_bytes(_truncated("PNG", 6))
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.png").write_bytes(b"ignored: hidden folder")
    return root


def test_imagefolder_skips_broken_files(image_tree, caplog):
    with caplog.at_level(logging.WARNING, logger="ssl_vit.data"):
        ds = ImageFolderDataset(image_tree)
    assert ds.classes == ["cat", "dog"]
    names = sorted(os.path.basename(p) for p, _ in ds.samples)
    assert names == ["a.png", "b.jpg", "c.png", "d.PNG", "e.jpeg"]
    assert len(ds) == 5 and ds.labelled
    assert ds.num_skipped == 2
    assert sorted(os.path.basename(p) for p in ds.skipped) == ["corrupt.jpg", "truncated.png"]
    assert ds.num_ignored == 1  # notes.txt
    assert any("skipped 2 unreadable files (e.g." in r.getMessage() for r in caplog.records)
    labels = {os.path.basename(p): y for p, y in ds.samples}
    assert labels == {"a.png": 0, "b.jpg": 0, "c.png": 0, "d.PNG": 1, "e.jpeg": 1}
    for i in range(len(ds)):  # every item loads, as RGB
        image, label = ds[i]
        assert image.mode == "RGB" and label in (0, 1)


def test_imagefolder_truncated_jpeg_is_replaced_lazily(tmp_path, caplog):
    root = tmp_path / "flat"
    root.mkdir()
    _save(root / "good1.jpg", "JPEG", 0)
    (root / "half.jpg").write_bytes(_truncated("JPEG", 1))  # passes verify(), fails to decode
    _save(root / "good2.jpg", "JPEG", 2)
    ds = ImageFolderDataset(root)
    assert len(ds) == 3 and ds.num_skipped == 0
    index = [os.path.basename(p) for p, _ in ds.samples].index("half.jpg")
    with caplog.at_level(logging.WARNING, logger="ssl_vit.data"):
        image, label = ds[index]
    assert image.mode == "RGB" and image.size == (24, 20)  # the next good image stands in
    assert ds.num_skipped == 1 and ds.skipped[0].endswith("half.jpg")
    assert any("skipped 1 unreadable files" in r.getMessage() for r in caplog.records)
    # a whole pass over the data works
    assert len([ds[i] for i in range(len(ds))]) == 3 and ds.num_skipped == 1
    # full decoding at construction catches it up front
    assert ImageFolderDataset(root, verify="decode").num_skipped == 1


def test_imagefolder_flat_folder_is_unlabelled(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(3):
        _save(root / f"{i}.bmp", "BMP", i)
    ds = ImageFolderDataset(root)
    assert ds.targets == [-1, -1, -1] and ds.classes == [] and not ds.labelled
    assert ds[0][1] == -1


def test_imagefolder_empty_or_unreadable_raises(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="data.root") as info:
        ImageFolderDataset(empty)
    assert str(empty) in str(info.value)
    (empty / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderDataset(empty)
    (empty / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="data.root.*could be read"):
        ImageFolderDataset(empty)
    with pytest.raises(ValueError, match="data.root"):
        ImageFolderDataset(tmp_path / "missing")


def test_imagefolder_splits(image_tree):
    splits = build_datasets("imagefolder", splits=("train", "val"), root=str(image_tree), val_size=2)
    assert len(splits["train"]) == 3 and len(splits["val"]) == 2
    assert sorted(splits["val"].targets) == [0, 1]  # stratified
    with pytest.raises(ValueError, match="data.test_root"):
        build_dataset("imagefolder", "test", root=str(image_tree))
    with pytest.raises(ValueError, match="data.bogus"):
        build_dataset("imagefolder", "train", root=str(image_tree), bogus=1)


# --------------------------------------------------------------------------------- synthetic ----
def test_synthetic_is_deterministic_per_index():
    a = SyntheticDataset(50, seed=7)
    b = SyntheticDataset(50, seed=7)
    for i in (0, 13, 49):
        (xa, ya), (xb, yb) = a[i], b[i]
        assert xa.mode == "RGB" and xa.size == (32, 32)
        assert np.array_equal(np.array(xa), np.array(xb)) and ya == yb == i % 10
    assert not np.array_equal(np.array(a[3][0]), np.array(SyntheticDataset(50, seed=8)[3][0]))
    assert not np.array_equal(np.array(a[3][0]), np.array(SyntheticDataset(50, seed=7, split="val")[3][0]))
    assert SyntheticDataset(8, image_size=16, num_classes=4)[5][0].size == (16, 16)


def test_synthetic_classes_are_learnable_but_not_trivial():
    def pixels(ds):
        x = np.stack([np.asarray(ds[i][0], dtype=np.float32).ravel() for i in range(len(ds))])
        return torch.from_numpy(x), torch.tensor(ds.targets)

    xtr, ytr = pixels(SyntheticDataset(200, seed=0, split="train"))
    xva, yva = pixels(SyntheticDataset(200, seed=0, split="val"))
    nearest = torch.cdist(xva, xtr).argmin(dim=1)
    acc = (ytr[nearest] == yva).float().mean().item()
    print(f"synthetic raw-pixel 1-NN accuracy: {acc:.3f}")
    assert 0.5 < acc < 0.98  # chance is 0.1


def test_synthetic_brightness_scales_the_clean_image():
    dim, bright = SyntheticDataset(20, noise=0.0), SyntheticDataset(20, noise=0.0, brightness=2.0)
    for index in (0, 7, 13):
        a = np.asarray(dim[index][0], dtype=np.int32)
        b = np.asarray(bright[index][0], dtype=np.int32)
        assert np.abs(b - np.clip(2 * a, 0, 255)).max() <= 2  # uint8 rounding of both images
        assert b.mean() > 1.5 * a.mean()
    with pytest.raises(ValueError, match="brightness must be positive, got 0"):
        SyntheticDataset(4, brightness=0)


def test_synthetic_brightness_makes_random_vit_cls_depend_on_the_image():
    """The reason for the option (its docstring): with the default brightness the patterns sit
    below the normalisation mean and a random ViT's [CLS] barely depends on the image."""
    from ssl_vit.data.datamodule import default_normalization
    from ssl_vit.models import build_backbone

    mean, std = (torch.tensor(v)[:, None, None] for v in default_normalization("synthetic"))

    def image_dependent_share(brightness):
        ds = SyntheticDataset(256, brightness=brightness)
        x = torch.stack([torch.from_numpy(ds.render(i)).permute(2, 0, 1).float() / 255 for i in range(len(ds))])
        x = (x - mean) / std
        torch.manual_seed(0)
        vit = build_backbone(dict(embed_dim=192, depth=2, num_heads=3, patch_size=4, img_size=32)).eval()
        with torch.no_grad():
            z = torch.nn.functional.normalize(vit(x), dim=1)
        return 1 - z.mean(0).norm().item() ** 2  # 0: the same [CLS] for every image

    dim, bright = image_dependent_share(1.0), image_dependent_share(2.0)
    print(f"image-dependent share of a random ViT's normalised [CLS]: {dim:.3f} (brightness 1), {bright:.3f} (2)")
    assert dim < 0.15 and bright > 0.4
