"""MAE's augmentation: one view per image, a random resized crop (scale 0.2-1, bicubic) and a
horizontal flip, then normalisation (the released ``main_pretrain.py`` transform)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torchvision.transforms import InterpolationMode, v2

from ssl_vit.data.transforms import CROP_RATIO, FLIP_P, IMAGENET_MEAN, IMAGENET_STD, ToUint8Image


class SingleViewTransform:
    """PIL image / array / tensor -> float tensor (3, size, size): crop, flip, normalise."""

    def __init__(self, size: int, scale: Sequence[float] = (0.2, 1.0), mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"method.crops.global_size={size!r}; allowed: a positive integer")
        low, high = (float(v) for v in scale)
        if not 0 < low <= high <= 1:
            raise ValueError(f"method.crops.global_scale={list(scale)!r}; allowed: 0 < low <= high <= 1")
        self.size, self.scale = size, (low, high)
        self.transform = v2.Compose([
            ToUint8Image(),
            v2.RandomResizedCrop(size, scale=self.scale, ratio=CROP_RATIO,
                                 interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(FLIP_P),
            v2.RGB(),  # grayscale data sets: three equal channels, as the encoder expects
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ])

    def __call__(self, image: Any) -> torch.Tensor:
        return self.transform(image).as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale})"
