"""Synthetic images with learnable class structure, generated on the fly (no files, no download).

Each class is a fixed pattern: an oriented grating (orientation ``pi * c / num_classes``, a
class-specific frequency) under a Gaussian envelope at a class-specific position, in a
class-specific colour. Each sample draws, from its own random stream (``seed``, split, index):
a shift of the whole pattern (up to 25% of the image), small changes of orientation, phase,
envelope width, contrast and colour, a background level, a distractor blob of random colour and
position, and Gaussian pixel noise. Labels cycle through the classes (``index % num_classes``), so
every split is balanced.

So a network can learn the classes, and raw-pixel k-NN works but is far from perfect (1-NN with
200 labelled samples: about 0.7 top-1 for 10 classes, chance 0.1). The class patterns depend only
on the class index, never on ``seed`` or split: ``train``, ``val`` and ``test`` share the classes
but draw their samples from different random streams.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ssl_vit.data.datasets import check_options

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
PATTERN_SEED = 20240601  # fixes the class patterns (not a data seed)
DEFAULT_NUM_TRAIN = 10_000
DEFAULT_NUM_EVAL = 1_000


class SyntheticDataset(Dataset):
    """``num_samples`` synthetic RGB images of ``image_size`` px in ``num_classes`` classes;
    items are ``(PIL RGB image, int label)`` or ``(transform(image), label)``, deterministic per
    ``(seed, split, index)``.

    ``noise`` is the std of the Gaussian pixel noise (pixels in [0, 1]); ``max_shift`` the largest
    shift of the pattern as a fraction of the image side (x 2, as coordinates span [-1, 1]);
    ``brightness`` multiplies the clean image (background, pattern, distractor) before the noise
    is added and pixels are clipped to [0, 1].

    Why ``brightness``: at 1 most pixels lie below the mean they are normalised by (0.5 for this
    data set), so a randomly initialised ViT (LayerNorm discards each token's scale) maps nearly
    every patch to the same direction and gives almost the same [CLS] to every image: the share of
    the normalised [CLS] that depends on the image is ~0.04 (Fashion-MNIST, default vit_cpu: ~0.46). At 2 the
    images straddle the mean and the share is ~0.6; DINO's centring + sharpening needs that image
    dependence at init to have something to sharpen (tests/methods/test_learning.py).
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int = 10,
        image_size: int = 32,
        seed: int = 0,
        split: str = "train",
        transform: Callable | None = None,
        noise: float = 0.2,
        max_shift: float = 0.25,
        brightness: float = 1.0,
    ):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if image_size < 4:
            raise ValueError(f"image_size must be at least 4, got {image_size}")
        if not brightness > 0:
            raise ValueError(f"brightness must be positive, got {brightness}")
        if split not in SPLIT_IDS:
            raise ValueError(f"split={split!r}; allowed: {', '.join(SPLIT_IDS)}")
        self.num_samples = int(num_samples)
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.split = split
        self.transform = transform
        self.noise = float(noise)
        self.max_shift = float(max_shift)
        self.brightness = float(brightness)
        self.classes = [f"class_{c}" for c in range(self.num_classes)]
        self.targets = [i % self.num_classes for i in range(self.num_samples)]
        self._patterns = [self._class_pattern(c) for c in range(self.num_classes)]
        coords = (np.arange(self.image_size) + 0.5) / self.image_size * 2.0 - 1.0
        self._xx, self._yy = np.meshgrid(coords, coords)

    def _class_pattern(self, c: int) -> dict[str, object]:
        rng = np.random.default_rng([PATTERN_SEED, c])
        return {
            "theta": math.pi * c / self.num_classes + rng.uniform(-0.1, 0.1),
            "freq": rng.uniform(1.5, 4.0),  # cycles across the image
            "color": rng.uniform(0.15, 1.0, 3),
            "center": rng.uniform(-0.35, 0.35, 2),
            "sigma": rng.uniform(0.3, 0.55),
        }

    def __len__(self) -> int:
        return self.num_samples

    def render(self, index: int) -> np.ndarray:
        """The (H, W, 3) uint8 image of ``index``."""
        label = self.targets[index]
        pat = self._patterns[label]
        rng = np.random.default_rng([self.seed, SPLIT_IDS[self.split], index])
        xx, yy = self._xx, self._yy
        tx, ty = rng.uniform(-self.max_shift, self.max_shift, 2)
        theta = pat["theta"] + rng.uniform(-0.15, 0.15)
        phase = rng.uniform(-math.pi / 3, math.pi / 3)
        u = (xx - tx) * math.cos(theta) + (yy - ty) * math.sin(theta)
        grating = 0.5 + 0.5 * np.cos(math.pi * pat["freq"] * u + phase)
        cx, cy = pat["center"]
        sigma = pat["sigma"] * rng.uniform(0.8, 1.25)
        envelope = np.exp(-((xx - cx - tx) ** 2 + (yy - cy - ty) ** 2) / (2 * sigma**2))
        color = np.clip(pat["color"] * rng.uniform(0.8, 1.2, 3), 0.0, 1.0)
        image = rng.uniform(0.0, 0.3) + rng.uniform(0.6, 1.0) * (grating * envelope)[..., None] * color
        # distractor: a blob of random colour and position, unrelated to the class
        dx, dy = rng.uniform(-0.8, 0.8, 2)
        ds = rng.uniform(0.1, 0.25)
        blob = np.exp(-((xx - dx) ** 2 + (yy - dy) ** 2) / (2 * ds**2))
        image = image + rng.uniform(0.2, 0.6) * blob[..., None] * rng.uniform(0.0, 1.0, 3)
        image = self.brightness * image + rng.normal(0.0, self.noise, image.shape)
        return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    def __getitem__(self, index: int):
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        image = Image.fromarray(self.render(index))  # (H, W, 3) uint8 -> mode 'RGB'
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


OPTIONS = ("num_samples", "num_classes", "image_size", "noise", "max_shift", "brightness")


def build_synthetic_splits(
    splits: Sequence[str],
    root: str | None = None,
    val_size: int | float | None = None,
    seed: int = 0,
    **options,
) -> dict[str, Dataset]:
    """Options: ``num_samples`` (train size, default 10,000), ``num_classes``, ``image_size``,
    ``noise``, ``max_shift``, ``brightness``. ``val`` and ``test`` have ``val_size`` samples each
    (default 1,000); ``trainval`` is the ``train`` split (the validation set is drawn separately, not carved
    out). ``root`` is not used."""
    check_options(options, OPTIONS, "synthetic")
    num_train = int(options.pop("num_samples", DEFAULT_NUM_TRAIN))
    if val_size is None:
        num_eval = DEFAULT_NUM_EVAL
    elif isinstance(val_size, float) and 0 < val_size < 1:
        num_eval = max(1, int(val_size * num_train))
    else:
        num_eval = int(val_size)
    out: dict[str, Dataset] = {}
    for split in splits:
        name = "train" if split == "trainval" else split
        n = num_train if name == "train" else num_eval
        if n <= 0:
            raise ValueError(f"data.val_size={val_size!r} leaves the synthetic {split!r} split empty")
        out[split] = SyntheticDataset(n, seed=seed, split=name, **options)
    return out
