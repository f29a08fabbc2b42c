"""The deterministic evaluation transform (resize, centre crop, normalise)."""
from __future__ import annotations

from numbers import Real
from typing import Any, List, Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from ssl_vit.data.transforms.inputs import ToUint8Image, as_plain_tensor
from ssl_vit.data.transforms.spec import IMAGENET_MEAN, IMAGENET_STD, Size, check_size, check_stats


class EvalTransform:
    """Deterministic evaluation preprocessing -> float tensor (C, H, W).

    Resize (bicubic, antialiased) so the shorter side is ``floor(side / crop_pct)``, then
    center-crop to ``size``. With the default ``crop_pct=1.0`` a square image is simply resized
    to ``size`` (the whole image, as the training global crops at scale 1 see it); ``crop_pct``
    0.875 gives the usual ImageNet resize-256 / crop-224 protocol. A ``(h, w)`` size resizes both
    sides to ``floor(h / crop_pct), floor(w / crop_pct)`` (no aspect preservation) before the crop.
    """

    def __init__(
        self,
        size: Size,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop_pct: float = 1.0,
        grayscale_to_rgb: bool = True,
    ) -> None:
        self.size = check_size("size", size)
        if not (isinstance(crop_pct, Real) and not isinstance(crop_pct, bool) and 0 < crop_pct <= 1):
            raise ValueError(f"crop_pct must be a number in (0, 1], got {crop_pct!r}")
        self.crop_pct = float(crop_pct)
        self.mean = check_stats("mean", mean, positive=False)
        self.std = check_stats("std", std, positive=True)
        if not isinstance(grayscale_to_rgb, bool):
            raise ValueError(f"grayscale_to_rgb must be a bool, got {grayscale_to_rgb!r}")
        self.grayscale_to_rgb = grayscale_to_rgb
        h, w = self.size
        if isinstance(size, (tuple, list)):
            resize: Size = (int(h / self.crop_pct), int(w / self.crop_pct))
        else:
            resize = int(h / self.crop_pct)
        steps: List[Any] = [
            ToUint8Image(),
            v2.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(self.size),
        ]
        if grayscale_to_rgb:
            steps.append(v2.RGB())
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        self.transform = v2.Compose(steps)

    def __call__(self, image: Any) -> torch.Tensor:
        return as_plain_tensor(self.transform(image))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, crop_pct={self.crop_pct}, mean={self.mean}, "
            f"std={self.std}, grayscale_to_rgb={self.grayscale_to_rgb})"
        )
