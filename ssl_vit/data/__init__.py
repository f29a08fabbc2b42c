"""Data: data sets (Fashion-MNIST, image folders, synthetic), multi-crop transforms, block-masking
collate and the Lightning DataModule.

Names are imported lazily (on first access), so ``import ssl_vit.data`` stays cheap and a data set
can be used without importing Lightning.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # datasets.py
    "DATASET_NAMES": "ssl_vit.data.datasets",
    "LabelledSubset": "ssl_vit.data.datasets",
    "TransformedDataset": "ssl_vit.data.datasets",
    # sampler.py
    "SampleKey": "ssl_vit.data.sampler",
    "TrainSampler": "ssl_vit.data.sampler",
    "build_dataset": "ssl_vit.data.datasets",
    "build_datasets": "ssl_vit.data.datasets",
    "default_data_root": "ssl_vit.data.datasets",
    "split_indices": "ssl_vit.data.datasets",
    # fashion_mnist.py
    "FashionMNISTDataset": "ssl_vit.data.fashion_mnist",
    "prepare_fashion_mnist": "ssl_vit.data.fashion_mnist",
    "FASHION_MNIST_MEAN": "ssl_vit.data.fashion_mnist",
    "FASHION_MNIST_STD": "ssl_vit.data.fashion_mnist",
    # imagefolder.py
    "ImageFolderDataset": "ssl_vit.data.imagefolder",
    "IMG_EXTENSIONS": "ssl_vit.data.imagefolder",
    # synthetic.py
    "SyntheticDataset": "ssl_vit.data.synthetic",
    # datamodule.py
    "SSLDataModule": "ssl_vit.data.datamodule",
    "default_normalization": "ssl_vit.data.datamodule",
    "IMAGENET_MEAN": "ssl_vit.data.datamodule",
    "IMAGENET_STD": "ssl_vit.data.datamodule",
    # transforms/ / collate.py
    "MultiCropTransform": "ssl_vit.data.transforms",
    "EvalTransform": "ssl_vit.data.transforms",
    "MultiCropCollator": "ssl_vit.data.collate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
