"""Fashion-MNIST through ``torchvision.datasets.FashionMNIST``, with a validation split carved out
of the official training split.

Offline source: the Debian package ``dataset-fashion-mnist`` installs the four original gzipped
IDX files in ``/usr/share/datasets/fashion-mnist/``; :func:`prepare_fashion_mnist` gunzips them
into ``root/FashionMNIST/raw/`` where torchvision reads them. Where those files are missing,
torchvision downloads them (machines with internet access): one code path for both.

Splits (of 28x28 grayscale images, 10 classes):

- ``train``: the official 60,000 training images minus the validation carve-out (55,000 by default)
- ``val``: the carve-out, 5,000 images by default, *stratified* (500 per class): a fixed seed
  (``split_seed``, default 0) draws one permutation and each class contributes its share
- ``trainval``: all 60,000 official training images
- ``test``: the official 10,000 test images, kept for final reports
"""
from __future__ import annotations

import gzip
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from ssl_vit.data.datasets import check_options, default_data_root, resolve_val_size, split_indices

logger = logging.getLogger("ssl_vit.data")

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = 10
IMAGE_SIZE = 28
DEFAULT_VAL_SIZE = 5000
DEFAULT_SPLIT_SEED = 0

# Per-pixel statistics on [0, 1] pixels (population std over all pixels of all images), measured
# by tests/data/test_datasets.py::test_fashion_mnist_mean_std, which recomputes them from the data
# and checks these constants: the official 60,000-image training split gives mean 0.28604 and
# std 0.35302 (the values below); our 55,000-image ``train`` split (default carve-out) gives
# 0.28586 / 0.35288, the same to within 2e-4.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_INSTALL_HINT = (
    "Install the Debian package (`apt-get install dataset-fashion-mnist`, which puts the files in "
    f"{DEBIAN_DIR}), or set data.root to a folder holding FashionMNIST/raw/ with the four "
    "unzipped IDX files (" + ", ".join(RAW_FILES) + ")."
)


def _expected_size(path: Path) -> int | None:
    """The byte size an IDX file must have according to its header (None if not an IDX file)."""
    try:
        with open(path, "rb") as f:
            header = f.read(16)
    except OSError:
        return None
    if len(header) < 8:
        return None
    magic = int.from_bytes(header[0:4], "big")
    count = int.from_bytes(header[4:8], "big")
    if magic == 2049:  # labels: magic, count, then one byte per label
        return 8 + count
    if magic == 2051 and len(header) == 16:  # images: magic, count, rows, cols, then pixels
        rows = int.from_bytes(header[8:12], "big")
        cols = int.from_bytes(header[12:16], "big")
        return 16 + count * rows * cols
    return None


def _is_complete(path: Path) -> bool:
    return path.is_file() and _expected_size(path) == path.stat().st_size


def _gunzip_atomic(src: Path, dst: Path) -> None:
    """Gunzip ``src`` to ``dst`` through a temporary file in the same folder and an atomic rename,
    so that a reader (or a concurrent writer) never sees a half-written file."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, length=1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        if not _is_complete(tmp):
            raise RuntimeError(f"{src} does not hold a complete IDX file")
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def prepare_fashion_mnist(
    root: str | os.PathLike | None = None,
    source_dir: str | os.PathLike | None = DEBIAN_DIR,
    download: bool = True,
) -> Path:
    """Make sure ``root/FashionMNIST/raw/`` holds the four unzipped IDX files; return that folder.

    Idempotent: complete files (size checked against their IDX header) are left untouched.
    Missing ones are gunzipped from ``source_dir`` (the Debian package's folder) with atomic
    writes; if that folder lacks them and ``download`` is true, torchvision downloads them.
    Raises ``RuntimeError`` saying how to get the data when neither works.
    """
    root = Path(root if root is not None else default_data_root()).expanduser()
    raw = root / "FashionMNIST" / "raw"
    missing = [name for name in RAW_FILES if not _is_complete(raw / name)]
    if not missing:
        return raw

    src = Path(source_dir) if source_dir is not None else None
    if src is not None and all((src / f"{name}.gz").is_file() for name in missing):
        raw.mkdir(parents=True, exist_ok=True)
        for name in missing:
            logger.info("unzipping %s into %s", src / f"{name}.gz", raw)
            _gunzip_atomic(src / f"{name}.gz", raw / name)
        return raw

    reason = f"the files are not in {raw}" + (f" nor in {src}" if src is not None else "")
    if download:
        try:
            import torchvision

            logger.info("downloading Fashion-MNIST into %s", root)
            torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
            torchvision.datasets.FashionMNIST(str(root), train=False, download=True)
        except Exception as exc:  # no internet, proxy, mirror down, ...
            reason += f", and downloading them failed ({type(exc).__name__}: {exc})"
        else:
            still_missing = [name for name in RAW_FILES if not _is_complete(raw / name)]
            if not still_missing:
                return raw
            reason += f", and the download left {', '.join(still_missing)} incomplete"
    else:
        reason += " (download disabled)"
    raise RuntimeError(f"Fashion-MNIST is not available: {reason}. {_INSTALL_HINT}")


def _load_official(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision

    base = torchvision.datasets.FashionMNIST(str(root), train=train, download=False)
    return base.data, base.targets


class FashionMNISTDataset(Dataset):
    """One split of Fashion-MNIST: items are ``(PIL image of mode 'L', int label)``, or
    ``(transform(image), label)`` with a ``transform``.

    Attributes: ``targets`` (list of int), ``indices`` (positions in the official train or test
    split), ``classes``. See the module docstring for the splits.
    """

    classes = list(CLASSES)

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        val_size: int | float = DEFAULT_VAL_SIZE,
        split_seed: int = DEFAULT_SPLIT_SEED,
        transform: Callable | None = None,
        download: bool = True,
        source_dir: str | os.PathLike | None = DEBIAN_DIR,
    ):
        if split not in ("train", "val", "trainval", "test"):
            raise ValueError(f"split={split!r}; allowed: train, val, trainval, test")
        root_path = Path(root if root is not None else default_data_root()).expanduser()
        prepare_fashion_mnist(root_path, source_dir=source_dir, download=download)
        data, targets = _load_official(root_path, train=split != "test")
        if split in ("train", "val"):
            n_val = resolve_val_size(val_size, len(targets))
            train_idx, val_idx = split_indices(targets, n_val, seed=split_seed, stratified=True)
            indices = train_idx if split == "train" else val_idx
            if not indices:
                raise ValueError("data.val_size=0 leaves the 'val' split empty")
        else:
            indices = list(range(len(targets)))
        index_t = torch.as_tensor(indices, dtype=torch.long)
        self.root = root_path
        self.split = split
        self.indices = indices
        self.data = data[index_t].contiguous()
        self.targets = targets[index_t].tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.data[index].numpy())  # uint8 (28, 28) -> mode 'L'
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def build_fashion_mnist_splits(
    splits: Sequence[str],
    root: str | os.PathLike | None = None,
    val_size: int | float | None = None,
    seed: int = DEFAULT_SPLIT_SEED,
    **options,
) -> dict[str, Dataset]:
    """Options: ``download`` (bool), ``source_dir`` (folder of the gzipped IDX files)."""
    check_options(options, ("download", "source_dir"), "fashion_mnist")
    val_size = DEFAULT_VAL_SIZE if val_size is None else val_size
    return {
        split: FashionMNISTDataset(root, split=split, val_size=val_size, split_seed=seed, **options)
        for split in splits
    }
