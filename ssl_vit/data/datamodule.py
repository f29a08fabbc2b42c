"""``SSLDataModule``: the data sets of :mod:`ssl_vit.data` behind one Lightning DataModule.

- ``train_dataloader()``: the ``train`` split through ``train_transform`` (any callable on a PIL
  image, e.g. the multi-crop transform) and ``collate_fn``; order and augmentation are pure
  functions of ``(seed, epoch, image)`` (:mod:`ssl_vit.data.sampler`), sharded over the
  Trainer's processes and resumed mid-epoch from a checkpoint; ``drop_last=True``, persistent
  workers when ``num_workers > 0``.
  Items given to ``collate_fn`` are ``(train_transform(rgb_image), label)``.
- ``knn_dataloaders(split)``: ``(bank loader, query loader)`` of labelled, un-augmented images
  through ``eval_transform`` for k-NN evaluation: ``split="val"`` pairs the ``train`` split with
  the validation carve-out (for tuning); ``split="test"`` pairs all training data (``trainval``)
  with the test split (for final reports).
- ``describe()``: the preprocessing (channels, resolution, mean, std, ...) that checkpoints store
  and evaluation, export and visualisation reuse.

Images reach every transform as RGB PIL images: grayscale data (Fashion-MNIST) is replicated to 3
channels here, so transforms need not handle it, and a 1-channel tensor coming out of an
evaluation transform is replicated as well.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from ssl_vit.data import imagefolder, synthetic
from ssl_vit.data.datasets import (
    DATASET_NAMES,
    LabelledSubset,
    TransformedDataset,
    build_datasets,
    check_options,
    get_targets,
    split_indices,
)
from ssl_vit.data.sampler import TrainSampler
from ssl_vit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform
from ssl_vit.data.transforms.deferred import finish_batch, is_pending

logger = logging.getLogger("ssl_vit.data")

_OPTIONS = {  # checked here too so that a bad option fails before any data is read
    "fashion_mnist": ("download", "source_dir"),
    "imagefolder": imagefolder.OPTIONS,
    "synthetic": synthetic.OPTIONS,
}


def default_normalization(dataset: str) -> tuple[list[float], list[float]]:
    """Mean and std (3 values each, for [0, 1] pixels) used by default for ``dataset``."""
    if dataset == "fashion_mnist":
        from ssl_vit.data.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD

        return [FASHION_MNIST_MEAN] * 3, [FASHION_MNIST_STD] * 3
    if dataset == "imagefolder":
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [0.5] * 3, [0.5] * 3


def _three(values: float | Sequence[float], setting: str) -> list[float]:
    if isinstance(values, (int, float)):
        return [float(values)] * 3
    values = [float(v) for v in values]
    if len(values) == 1:
        return values * 3
    if len(values) != 3:
        raise ValueError(f"{setting}={values!r}: give one value or three (one per RGB channel)")
    return values


class SSLDataModule(L.LightningDataModule):
    """Data for self-supervised pretraining and its k-NN evaluation.

    Args:
        dataset: ``"fashion_mnist"``, ``"imagefolder"`` or ``"synthetic"``.
        root: data folder (``data.root``): where Fashion-MNIST is prepared (default
            ``$SSL_VIT_DATA`` or ``~/.cache/ssl_vit``), the image folder (required), unused
            for synthetic data.
        batch_size: training batch size (per process).
        num_workers: DataLoader worker processes.
        train_transform: callable on an RGB PIL image (e.g. the multi-crop transform); default:
            the evaluation transform.
        eval_transform: callable on an RGB PIL image returning a tensor; default
            :class:`ssl_vit.data.transforms.EvalTransform` with ``image_size``, ``mean``, ``std``.
        collate_fn: batches the training items; default ``default_collate``.
        val_size: images carved out of the training data for validation (count, or fraction);
            default 5,000 for Fashion-MNIST, 10% (at most 5,000) for an image folder; for
            synthetic data the size of the separately drawn val and test sets (default 1,000).
        seed: data order (shuffling and worker seeds).
        split_seed: the validation carve-out (and the content of synthetic data); kept apart from
            ``seed`` so that runs with different seeds are tuned on the same validation images.
        image_size: evaluation resolution (default 32 for Fashion-MNIST and synthetic data, 224
            for an image folder).
        mean, std: normalisation (one value or three); defaults per data set (see
            :func:`default_normalization`).
        eval_batch_size: batch size of the k-NN loaders (default ``batch_size``).
        pin_memory: DataLoader ``pin_memory``.
        **options: data-set options (``data.<name>``): fashion_mnist: ``download``,
            ``source_dir``; imagefolder: ``val_root``, ``test_root``, ``extensions``, ``verify``;
            synthetic: ``num_samples``, ``num_classes``, ``image_size``, ``noise``, ``max_shift``,
            ``brightness``.
    """

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        root: str | os.PathLike | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        train_transform: Callable | None = None,
        eval_transform: Callable | None = None,
        collate_fn: Callable | None = None,
        val_size: int | float | None = None,
        seed: int = 0,
        split_seed: int = 0,
        image_size: int | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        eval_batch_size: int | None = None,
        pin_memory: bool = False,
        **options: Any,
    ):
        super().__init__()
        if dataset not in DATASET_NAMES:
            raise ValueError(f"data.dataset={dataset!r} is not a known data set; allowed: {', '.join(DATASET_NAMES)}")
        check_options(options, _OPTIONS[dataset], dataset)
        for key, value, minimum in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"data.{key}={value!r}: expected an integer >= {minimum}")
        if eval_batch_size is not None and (not isinstance(eval_batch_size, int) or eval_batch_size < 1):
            raise ValueError(f"data.eval_batch_size={eval_batch_size!r}: expected an integer >= 1")
        if val_size is not None and (isinstance(val_size, bool) or not isinstance(val_size, (int, float)) or val_size < 0):
            raise ValueError(f"data.val_size={val_size!r}: expected a count >= 0 or a fraction in (0, 1)")
        if dataset == "imagefolder":
            if root is None or str(root) == "":
                raise ValueError("data.root must be set to a folder of images for data set 'imagefolder'")
            if not os.path.isdir(os.path.expanduser(os.fspath(root))):
                raise ValueError(f"data.root={os.fspath(root)!r} is not an existing folder")
        for key in ("train_transform", "eval_transform", "collate_fn"):
            value = locals()[key]
            if value is not None and not callable(value):
                raise ValueError(f"data.{key}={value!r} is not callable")

        self.dataset_name = dataset
        self.root = None if root is None else os.fspath(root)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.seed = int(seed)
        self.split_seed = int(split_seed)
        self.options = dict(options)
        self.eval_batch_size = eval_batch_size or batch_size
        self.pin_memory = bool(pin_memory)

        default_mean, default_std = default_normalization(dataset)
        self.mean = _three(default_mean if mean is None else mean, "data.mean")
        self.std = _three(default_std if std is None else std, "data.std")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"data.std={self.std!r} must be positive")
        if image_size is None:
            image_size = {"fashion_mnist": 32, "imagefolder": 224}.get(dataset, options.get("image_size", 32))
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"data.image_size={image_size!r}: expected a positive integer")
        self.image_size = image_size
        self.crop_pct = 0.875 if dataset == "imagefolder" else 1.0

        self.eval_transform = eval_transform or EvalTransform(image_size, self.mean, self.std, self.crop_pct)
        self.train_transform = train_transform or self.eval_transform
        self.collate_fn = collate_fn or default_collate
        self._datasets: dict[str, Dataset] = {}
        self.train_sampler: TrainSampler | None = None
        self._resume_batches = 0  # set from a checkpoint: where the training order continues

    # -- data sets ------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download / unpack once per node (Lightning calls this on local rank 0 only)."""
        if self.dataset_name == "fashion_mnist":
            from ssl_vit.data.fashion_mnist import DEBIAN_DIR, prepare_fashion_mnist

            prepare_fashion_mnist(
                self.root,
                source_dir=self.options.get("source_dir", DEBIAN_DIR),
                download=self.options.get("download", True),
            )

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.get_dataset("train")

    def get_dataset(self, split: str) -> Dataset:
        """The raw ``(PIL image, label)`` data set of ``split`` (train, val, trainval, test), built
        once and cached."""
        if split not in self._datasets:
            built = build_datasets(
                self.dataset_name, splits=(split,), root=self.root, val_size=self.val_size,
                seed=self.split_seed, _cache=self._datasets, **self.options,
            )
            self._datasets.update(built)
        return self._datasets[split]

    @property
    def train_dataset(self) -> Dataset:
        return self.get_dataset("train")

    @property
    def num_classes(self) -> int | None:
        if self.dataset_name == "fashion_mnist":
            return 10
        if self.dataset_name == "synthetic":
            return int(self.options.get("num_classes", 10))
        ds = self._datasets.get("trainval")
        if ds is None:
            ds = self._datasets.get("train")
        classes = getattr(ds, "classes", None) if ds is not None else None
        return len(classes) if classes else None

    @property
    def num_skipped(self) -> int:
        """Unreadable image files skipped so far (in this process) by the data sets built here;
        each underlying data set is counted once, however many splits share it."""
        underlying = {}
        for dataset in self._datasets.values():
            while isinstance(getattr(dataset, "dataset", None), Dataset):  # subsets and wrappers
                dataset = dataset.dataset
            underlying[id(dataset)] = dataset
        return sum(getattr(dataset, "num_skipped", 0) for dataset in underlying.values())

    # -- loaders --------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches of pending crops (``data.batched_augmentation``) are augmented here,
        after they reached the training device (``transforms.deferred``)."""
        if is_pending(batch):
            return finish_batch(self.train_transform, batch)
        return batch

    def train_dataloader(self) -> DataLoader:
        # A collate function that draws randomness per batch (iBOT's masks) gets the samples' seeds.
        dataset = TransformedDataset(self.get_dataset("train"), self.train_transform, to_rgb=True,
                                     with_seeds=bool(getattr(self.collate_fn, "accepts_sample_seeds", False)))
        if self.batch_size > len(dataset):
            raise ValueError(
                f"data.batch_size={self.batch_size} is larger than the {len(dataset)} training images of "
                f"data set {self.dataset_name!r}: with drop_last=True not one batch would be formed; "
                "lower data.batch_size (or add images)"
            )
        rank, world_size = self._process_position()
        self.train_sampler = TrainSampler(len(dataset), self.batch_size, seed=self.seed, rank=rank,
                                          world_size=world_size)
        if self._resume_batches:
            self.train_sampler.resume_at(self._resume_batches)
            self._resume_batches = 0
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self.train_sampler,
            drop_last=True,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.seed),  # seeds the worker processes
        )

    def _process_position(self) -> tuple[int, int]:
        """(rank, number of processes) of the Trainer this module is attached to; (0, 1) alone."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def knn_dataloaders(
        self,
        split: str = "val",
        batch_size: int | None = None,
        max_train: int | None = None,
        max_eval: int | None = None,
        num_workers: int | None = None,
    ) -> tuple[DataLoader, DataLoader]:
        """``(bank loader, query loader)`` for k-NN evaluation: labelled ``(images, labels)``
        batches, 3-channel images through ``eval_transform``, in a fixed order, nothing dropped.

        ``split="val"``: bank = ``train`` split, queries = validation carve-out (for tuning).
        ``split="test"``: bank = all training data (``trainval``), queries = test split (for
        final reports). ``max_train`` / ``max_eval`` take a fixed, stratified subset of at most
        that many images (for quick monitoring).
        """
        if split not in ("val", "test"):
            raise ValueError(f"split={split!r}; allowed: val, test")
        bank_split = "train" if split == "val" else "trainval"
        loaders = []
        for part, limit, name in ((bank_split, max_train, "max_train"), (split, max_eval, "max_eval")):
            raw = self.get_dataset(part)
            targets = get_targets(raw)
            if not targets or min(targets) < 0:
                raise ValueError(
                    f"k-NN evaluation needs labels, but the {part!r} images of data.root={self.root!r} "
                    "have none (put them in one subfolder per class)"
                )
            if limit is not None:
                if limit < 1:
                    raise ValueError(f"{name}={limit!r} must be positive")
                if limit < len(raw):
                    _, keep = split_indices(targets, limit, seed=self.split_seed, stratified=True)
                    raw = LabelledSubset(raw, keep)
            dataset = TransformedDataset(raw, self.eval_transform, to_rgb=True, three_channels=True)
            loaders.append(
                DataLoader(
                    dataset,
                    batch_size=batch_size or self.eval_batch_size,
                    shuffle=False,
                    drop_last=False,
                    num_workers=self.num_workers if num_workers is None else num_workers,
                    pin_memory=self.pin_memory,
                )
            )
        return loaders[0], loaders[1]

    def knn_unavailable_reason(self) -> str | None:
        """Why k-NN evaluation cannot run on these data (None when it can): an image folder
        whose images are not all in class subfolders has no labels to evaluate with."""
        if self.dataset_name != "imagefolder":
            return None
        base = self.get_dataset("trainval")
        if getattr(base, "labelled", True):
            return None
        targets = get_targets(base)
        if not getattr(base, "classes", None):
            return f"the {len(targets)} images under data.root={self.root!r} have no class labels (no class subfolders)"
        outside = sum(t < 0 for t in targets)
        return (f"{outside} of the {len(targets)} images under data.root={self.root!r} lie outside the class "
                "subfolders and have no label")

    def check_knn_splits(self) -> None:
        """Build the k-NN splits now, so that a validation split too small to evaluate fails
        before training rather than after it."""
        query = self.get_dataset("val")
        if len(query) == 0:
            raise ValueError(f"the validation split of data set {self.dataset_name!r} is empty: set data.val_size "
                             "(or data.val_root)")
        self.get_dataset("train")

    # -- metadata -------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Preprocessing and data identity, JSON-serialisable, for checkpoints and exports."""
        return {
            "dataset": self.dataset_name,
            "channels": 3,
            "source_channels": 1 if self.dataset_name == "fashion_mnist" else 3,
            "resolution": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": "bicubic",
            "crop_pct": self.crop_pct,
            "num_classes": self.num_classes,
            "root": self.root,
            "val_size": self._effective_val_size(),
            "split_seed": self.split_seed,
            "seed": self.seed,
        }

    def _effective_val_size(self) -> int | float | None:
        if self.val_size is not None:
            return self.val_size
        return {"fashion_mnist": 5000, "synthetic": 1000}.get(self.dataset_name)  # imagefolder: 10%, <= 5000

    def state_dict(self) -> dict[str, Any]:
        """The preprocessing, and where the training data order stands: the batches per process
        behind the checkpoint's optimizer steps (a resumed run continues from the next one)."""
        state: dict[str, Any] = {"describe": self.describe()}
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            state["batches_done"] = int(trainer.global_step) * int(trainer.accumulate_grad_batches)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("describe", {})
        new = self.describe()
        for key in ("dataset", "seed", "split_seed", "val_size", "resolution", "mean", "std"):
            if key in old and old[key] != new[key]:
                logger.warning("the checkpoint was trained with data.%s=%r, this run uses %r", key, old[key], new[key])
        self._resume_batches = int(state_dict.get("batches_done", 0))
