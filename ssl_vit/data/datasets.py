"""Shared pieces of the data sets: deterministic splits, labelled subsets, transform wrappers,
and the factory that builds any data set by name (the training sampler: ssl_vit/data/sampler.py).

Every data set of this package returns ``(PIL image, int label)`` pairs; label ``-1`` means
"unlabelled". Transforms are applied by :class:`TransformedDataset`, which also converts images to
RGB so that the backbone always sees 3 channels (grayscale is replicated).
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from ssl_vit.data.sampler import SampleKey

logger = logging.getLogger("ssl_vit.data")

DATASET_NAMES = ("fashion_mnist", "imagefolder", "synthetic")
SPLITS = ("train", "val", "test", "trainval")


def default_data_root() -> str:
    """Where downloadable data sets go when ``data.root`` is not set: ``$SSL_VIT_DATA`` or
    ``~/.cache/ssl_vit`` (the default of conf/data/fashion_mnist.yaml too)."""
    return os.environ.get("SSL_VIT_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "ssl_vit")


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------
def resolve_val_size(val_size: int | float, n: int, setting: str = "data.val_size") -> int:
    """Turn ``val_size`` (a count, or a fraction in [0, 1)) into a count for ``n`` items.

    Raises a ``ValueError`` naming ``setting`` when the value leaves no training data.
    """
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ValueError(f"{setting}={val_size!r}: expected an int count or a float fraction in [0, 1)")
    if isinstance(val_size, float) and not val_size.is_integer():
        if not 0.0 < val_size < 1.0:
            raise ValueError(f"{setting}={val_size!r}: a fraction must lie in (0, 1)")
        count = int(math.floor(val_size * n))
    else:
        count = int(val_size)
    if count < 0:
        raise ValueError(f"{setting}={val_size!r} must not be negative")
    if count >= n:
        raise ValueError(
            f"{setting}={val_size!r} leaves no training images: the data set has only {n} images"
        )
    return count


def split_indices(
    labels: Sequence[int] | torch.Tensor, val_size: int, seed: int = 0, stratified: bool = True
) -> tuple[list[int], list[int]]:
    """Carve ``val_size`` indices out of ``range(len(labels))``, deterministically from ``seed``.

    Stratified: every class gets its share of the validation split (largest-remainder rounding of
    ``val_size * class_count / n``); which images of a class are taken comes from one random
    permutation drawn from a ``torch.Generator`` seeded with ``seed``. Labels < 0 (unlabelled)
    form one group of their own. With ``stratified=False`` the first ``val_size`` indices of that
    permutation are taken. Returns ``(train_indices, val_indices)``, both sorted and disjoint.
    """
    labels_t = torch.as_tensor(labels, dtype=torch.long).flatten()
    n = labels_t.numel()
    if not 0 <= val_size < n or n == 0:
        raise ValueError(f"val_size={val_size} must lie in [0, {n})")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    if val_size == 0:
        return list(range(n)), []
    if not stratified:
        val = perm[:val_size]
    else:
        groups = labels_t.clamp(min=-1)
        classes, counts = torch.unique(groups, return_counts=True)
        exact = counts.double() * val_size / n
        quota = exact.floor().long()
        remainder = int(val_size - quota.sum())
        if remainder > 0:
            # largest fractional parts first; ties broken by class order (stable sort)
            order = torch.sort(exact - quota.double(), descending=True, stable=True).indices
            quota[order[:remainder]] += 1
        val_parts = []
        permuted_groups = groups[perm]
        for cls, q in zip(classes.tolist(), quota.tolist()):
            if q:
                members = perm[permuted_groups == cls]
                val_parts.append(members[:q])
        val = torch.cat(val_parts)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[val] = True
    train_idx = torch.nonzero(~mask).flatten().tolist()
    val_idx = torch.nonzero(mask).flatten().tolist()
    return train_idx, val_idx


def get_targets(dataset: Dataset) -> list[int]:
    """The labels of a data set of this package (``targets`` attribute) as a list of ints."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]
    if isinstance(targets, torch.Tensor):
        return targets.tolist()
    return [int(t) for t in targets]


class LabelledSubset(Dataset):
    """A subset of a data set that keeps ``targets`` (and ``classes``) for the chosen indices."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = list(indices)
        base_targets = get_targets(dataset)
        self.targets = [base_targets[i] for i in self.indices]
        self.classes = list(getattr(dataset, "classes", []))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


# ---------------------------------------------------------------------------------------------
# Transforms applied on top of the raw (PIL, label) data sets
# ---------------------------------------------------------------------------------------------
def ensure_three_channels(x: Any) -> Any:
    """Replicate a 1-channel (1, H, W) or (H, W) tensor to (3, H, W); other inputs pass through."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 2:
            return x.unsqueeze(0).expand(3, -1, -1).contiguous()
        if x.dim() == 3 and x.shape[0] == 1:
            return x.expand(3, -1, -1).contiguous()
    return x


class TransformedDataset(Dataset):
    """Wraps a ``(PIL image, label)`` data set: converts each image to RGB (grayscale replicated
    to 3 channels) and applies ``transform``; returns ``(transform(image), label)``.

    ``three_channels=True`` also replicates a 1-channel tensor output of ``transform`` to 3
    channels, for evaluation transforms that do not handle grayscale themselves.

    Indexed by a :class:`~ssl_vit.data.sampler.SampleKey` (the training sampler's), the transform
    draws from torch's generator seeded by the key's seed (restored afterwards), so an image's
    crops depend only on the key; ``with_seeds=True`` then returns ``(image, label, seed)`` for
    a collate function that derives its own randomness (iBOT's masks) from the batch's seeds.
    """

    def __init__(
        self,
        dataset: Dataset,
        transform: Callable | None = None,
        to_rgb: bool = True,
        three_channels: bool = False,
        with_seeds: bool = False,
    ):
        self.dataset = dataset
        self.with_seeds = with_seeds
        self.transform = transform
        self.to_rgb = to_rgb
        self.three_channels = three_channels
        self.targets = get_targets(dataset)
        self.classes = list(getattr(dataset, "classes", []))

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int | SampleKey):
        key = index if isinstance(index, SampleKey) else None
        image, label = self.dataset[int(index[0] if key else index)]
        if self.to_rgb and hasattr(image, "mode") and image.mode != "RGB":
            image = image.convert("RGB")
        if self.transform is not None:
            if key is None:
                image = self.transform(image)
            else:  # the sample's own random stream, whichever process or worker runs it
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(key.seed)
                    image = self.transform(image)
        if self.three_channels:
            image = ensure_three_channels(image)
        if key is not None and self.with_seeds:
            return image, label, key.seed
        return image, label


# ---------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------
def _check_name(name: str, setting: str = "data.dataset") -> str:
    if name not in DATASET_NAMES:
        raise ValueError(f"{setting}={name!r} is not a known data set; allowed: {', '.join(DATASET_NAMES)}")
    return name


def build_datasets(
    name: str,
    splits: Sequence[str] = ("train", "val"),
    root: str | None = None,
    val_size: int | float | None = None,
    seed: int = 0,
    _cache: dict[str, Dataset] | None = None,
    **options: Any,
) -> dict[str, Dataset]:
    """Build the raw ``(PIL image, label)`` data sets of ``splits`` for the data set ``name``.

    Splits: ``train`` (training data minus the validation carve-out), ``val`` (the carve-out),
    ``trainval`` (all training data), ``test`` (held out for final reports). ``options`` go to the
    data set (see :mod:`ssl_vit.data.fashion_mnist`, :mod:`~ssl_vit.data.imagefolder`,
    :mod:`~ssl_vit.data.synthetic`); an unknown option is a ``ValueError`` naming it.
    ``seed`` fixes the validation carve-out (and synthetic data's content). ``_cache``: already
    built splits (reused where they help, e.g. one scan of an image folder for all its splits).
    """
    _check_name(name)
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not known; allowed: {', '.join(SPLITS)}")
    if name == "fashion_mnist":
        from ssl_vit.data.fashion_mnist import build_fashion_mnist_splits

        return build_fashion_mnist_splits(splits, root=root, val_size=val_size, seed=seed, **options)
    if name == "imagefolder":
        from ssl_vit.data.imagefolder import build_imagefolder_splits

        return build_imagefolder_splits(splits, root=root, val_size=val_size, seed=seed, cache=_cache, **options)
    from ssl_vit.data.synthetic import build_synthetic_splits

    return build_synthetic_splits(splits, root=root, val_size=val_size, seed=seed, **options)


def build_dataset(name: str, split: str = "train", **kwargs: Any) -> Dataset:
    """One split of :func:`build_datasets`."""
    return build_datasets(name, splits=(split,), **kwargs)[split]


def check_options(options: dict[str, Any], allowed: Sequence[str], dataset: str) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join('data.' + k for k in unknown)} for data set {dataset!r}; "
            f"allowed: {', '.join('data.' + k for k in allowed) or '(none)'}"
        )
