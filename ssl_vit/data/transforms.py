"""Multi-crop augmentation (DINO / DINOv2) and the evaluation transform.

Built from ``torchvision.transforms.v2`` only. Randomness comes from torch's global RNG (what
v2 transforms use), so ``torch.manual_seed`` makes a run of the transform reproducible; in
DataLoader workers torch seeds each worker differently.

The augmentation follows the authors' released recipes (DINO ``main_dino.py``'s
``DataAugmentationDINO`` and DINOv2's ``DataAugmentationDINO``), per crop:

* ``RandomResizedCrop`` (bicubic, antialiased) to the global / local size with the preset's
  scale range, then horizontal flip with p=0.5;
* colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with p=0.8, then
  random grayscale with p=0.2;
* Gaussian blur with sigma in [0.1, 2.0]: p=1.0 on global crop 0, p=0.1 on global crop 1,
  p=0.5 on every local crop; solarisation with p=0.2 on global crop 1 only;
* conversion to float in [0, 1] and normalisation by ``mean`` / ``std``.

Presets differ only in the default crop scales: ``"dinov2"`` global (0.32, 1.0), local
(0.05, 0.32); ``"dino"`` global (0.4, 1.0), local (0.05, 0.4). Explicit ``global_scale`` /
``local_scale`` override them.

Choices of this implementation:

* Blur kernel: the papers' 224-px crops use a fixed kernel (DINOv2: 9; DINO: PIL's radius blur).
  A fixed 9-px kernel would cover half of a 16-px local crop, so the kernel scales with the crop:
  the odd integer nearest to 10% of the crop's shorter side, at least 3 (and never larger than
  the crop): 32 px -> 3, 16 px -> 3, 96 px -> 11 (even values are rounded up), 224 px -> 23.
  See :func:`blur_kernel_size`.
* The augmentations run on uint8 images (as the papers' PIL pipelines do), so the solarisation
  threshold is 128 (the same as 0.5 on a [0, 1] float image). Float tensor inputs are taken to be
  in [0, 1] and converted to uint8 first.
* Grayscale inputs (PIL ``'L'``, 1-channel tensors) are replicated to 3 channels when
  ``grayscale_to_rgb`` is true (the default). This happens after the pixel augmentations: on gray
  pixels saturation, hue and random-grayscale are identities, so augmenting the single channel
  and replicating it gives the same image (up to uint8 rounding of the contrast mean) as
  replicating first, at a third of the cost.
* Outputs are plain ``torch.Tensor`` (not ``tv_tensors.Image``), float32, shape (C, H, W).
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

try:  # PIL is a torchvision dependency, but keep the module importable without it
    from PIL import Image as _PILImage
except ImportError:  # pragma: no cover
    _PILImage = None

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "EvalTransform",
    "MultiCropTransform",
    "ToUint8Image",
    "blur_kernel_size",
]

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)

PRESETS: Dict[str, Dict[str, Tuple[float, float]]] = {
    "dinov2": {"global_scale": (0.32, 1.0), "local_scale": (0.05, 0.32)},
    "dino": {"global_scale": (0.4, 1.0), "local_scale": (0.05, 0.4)},
}

# Released parameters shared by both presets.
COLOR_JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
COLOR_JITTER_P = 0.8
GRAYSCALE_P = 0.2
FLIP_P = 0.5
BLUR_SIGMA = (0.1, 2.0)
BLUR_P_GLOBAL_0 = 1.0
BLUR_P_GLOBAL_1 = 0.1
BLUR_P_LOCAL = 0.5
SOLARIZE_P_GLOBAL_1 = 0.2
SOLARIZE_THRESHOLD_UINT8 = 128

Size = Union[int, Tuple[int, int]]


# ---------------------------------------------------------------------- validation helpers
def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_size(name: str, value: Any) -> Tuple[int, int]:
    """Positive int or (h, w) pair of positive ints -> (h, w)."""
    if _is_int(value) and value > 0:
        return int(value), int(value)
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(_is_int(v) and v > 0 for v in value)
    ):
        return int(value[0]), int(value[1])
    raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")


def _check_scale(name: str, value: Any) -> Tuple[float, float]:
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, Real) and not isinstance(v, bool) for v in value)
    )
    if ok:
        lo, hi = float(value[0]), float(value[1])
        if 0.0 < lo <= hi <= 1.0:
            return lo, hi
    raise ValueError(f"{name} must be a pair (lo, hi) with 0 < lo <= hi <= 1, got {value!r}")


def _check_stats(name: str, value: Any, positive: bool) -> Tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        vals = ()
    if len(vals) in (1, 3) and all(math.isfinite(v) for v in vals):
        if not positive or all(v > 0 for v in vals):
            return vals
    need = "positive numbers" if positive else "numbers"
    raise ValueError(f"{name} must be a sequence of 1 or 3 finite {need}, got {value!r}")


def blur_kernel_size(crop_size: Size) -> int:
    """Odd Gaussian-blur kernel of about 10% of the crop's shorter side, at least 3.

    The value is ``round(0.1 * side)``, bumped to the next odd number when even, floored at 3
    and capped at the largest odd number not above ``side`` (so reflection padding always fits):
    16 -> 3, 32 -> 3, 64 -> 7, 96 -> 11, 224 -> 23.
    """
    h, w = _check_size("crop_size", crop_size)
    side = min(h, w)
    k = max(3, int(math.floor(0.1 * side + 0.5)))
    if k % 2 == 0:
        k += 1
    cap = side if side % 2 == 1 else side - 1
    return max(1, min(k, cap))


# ---------------------------------------------------------------------- input conversion
class ToUint8Image:
    """PIL image / numpy HWC array / tensor (C, H, W) or (H, W) -> uint8 ``tv_tensors.Image``.

    PIL modes other than ``'L'`` and ``'RGB'`` are converted first (``'1'``, ``'I'``, ``'I;16'``,
    ``'F'`` to ``'L'``; palette / alpha / CMYK modes to ``'RGB'``). Float tensors are taken to be
    in [0, 1]. Only 1- and 3-channel images are accepted.
    """

    _to_image = v2.ToImage()
    _to_uint8 = v2.ToDtype(torch.uint8, scale=True)

    def __call__(self, img: Any) -> torch.Tensor:
        if _PILImage is not None and isinstance(img, _PILImage.Image):
            if img.mode in ("1",):
                img = img.convert("L")
            elif img.mode in ("I", "I;16", "F"):
                raise ValueError(
                    f"PIL mode {img.mode!r} (high bit depth) is not supported: convert the image "
                    "to 'L' or 'RGB' with its own scaling first"
                )
            elif img.mode not in ("L", "RGB"):
                img = img.convert("RGB")
        elif isinstance(img, torch.Tensor):
            if img.ndim == 2:
                img = img.unsqueeze(0)
            if img.ndim != 3:
                raise ValueError(
                    f"an image tensor must have shape (C, H, W) or (H, W), got {tuple(img.shape)}"
                )
            if img.is_floating_point():
                img = img.clamp(0.0, 1.0)
            elif img.dtype != torch.uint8:
                raise ValueError(f"image tensors must be uint8 or float in [0, 1], got {img.dtype}")
        elif not isinstance(img, np.ndarray):
            raise ValueError(
                f"expected a PIL image, a numpy array or a tensor, got {type(img).__name__}"
            )
        out = self._to_image(img)
        if out.dtype != torch.uint8:
            out = self._to_uint8(out)
        if out.shape[0] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {out.shape[0]}")
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _finish(img: torch.Tensor) -> torch.Tensor:
    return img.as_subclass(torch.Tensor)


def _maybe(transform: Any, p: float) -> List[Any]:
    if p <= 0:
        return []
    if p >= 1:
        return [transform]
    return [v2.RandomApply([transform], p=p)]


# ---------------------------------------------------------------------- transforms
class MultiCropTransform:
    """Image -> ``[global_0, global_1, local_0, ..., local_{n_local-1}]`` float tensors.

    Args:
        global_size: side (int) or (h, w) of the two global crops.
        local_size: side or (h, w) of the local crops (may be None when ``n_local == 0``).
        n_local: number of local crops, >= 0.
        global_scale, local_scale: RandomResizedCrop area ranges, ``0 < lo <= hi <= 1``;
            None takes the preset's.
        mean, std: normalisation (1 or 3 values); default ImageNet's, as in the papers.
        preset: ``"dinov2"`` or ``"dino"`` (default crop scales, see the module docstring).
        grayscale_to_rgb: replicate 1-channel images to 3 channels.
    """

    def __init__(
        self,
        global_size: Size,
        local_size: Optional[Size],
        n_local: int,
        global_scale: Optional[Sequence[float]] = None,
        local_scale: Optional[Sequence[float]] = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        preset: str = "dinov2",
        grayscale_to_rgb: bool = True,
    ) -> None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        if not _is_int(n_local) or n_local < 0:
            raise ValueError(f"n_local must be an int >= 0, got {n_local!r}")
        self.preset = preset
        self.n_local = int(n_local)
        self.global_size = _check_size("global_size", global_size)
        if local_size is None and self.n_local == 0:
            self.local_size = None
        else:
            self.local_size = _check_size("local_size", local_size)
        self.global_scale = _check_scale(
            "global_scale", PRESETS[preset]["global_scale"] if global_scale is None else global_scale
        )
        self.local_scale = _check_scale(
            "local_scale", PRESETS[preset]["local_scale"] if local_scale is None else local_scale
        )
        self.mean = _check_stats("mean", mean, positive=False)
        self.std = _check_stats("std", std, positive=True)
        if not isinstance(grayscale_to_rgb, bool):
            raise ValueError(f"grayscale_to_rgb must be a bool, got {grayscale_to_rgb!r}")
        self.grayscale_to_rgb = grayscale_to_rgb

        self.to_image = ToUint8Image()
        self.global_transform_0 = self._crop_pipeline(
            self.global_size, self.global_scale, blur_p=BLUR_P_GLOBAL_0, solarize_p=0.0
        )
        self.global_transform_1 = self._crop_pipeline(
            self.global_size, self.global_scale, blur_p=BLUR_P_GLOBAL_1,
            solarize_p=SOLARIZE_P_GLOBAL_1,
        )
        self.local_transform = (
            self._crop_pipeline(self.local_size, self.local_scale, blur_p=BLUR_P_LOCAL, solarize_p=0.0)
            if self.local_size is not None
            else None
        )

    @property
    def n_global(self) -> int:
        return 2

    @property
    def n_crops(self) -> int:
        return 2 + self.n_local

    def _crop_pipeline(
        self, size: Tuple[int, int], scale: Tuple[float, float], blur_p: float, solarize_p: float
    ) -> v2.Compose:
        steps: List[Any] = [
            v2.RandomResizedCrop(
                size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True
            ),
            v2.RandomHorizontalFlip(p=FLIP_P),
        ]
        steps += [
            v2.RandomApply([v2.ColorJitter(**COLOR_JITTER)], p=COLOR_JITTER_P),
            v2.RandomGrayscale(p=GRAYSCALE_P),
        ]
        steps += _maybe(v2.GaussianBlur(kernel_size=blur_kernel_size(size), sigma=BLUR_SIGMA), blur_p)
        if solarize_p > 0:
            steps.append(v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD_UINT8, p=solarize_p))
        if self.grayscale_to_rgb:
            # Replicating last is equivalent for gray pixels (grayscale / saturation / hue are
            # identities on them) and 3x cheaper for the jitter and blur.
            steps.append(v2.RGB())
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        return v2.Compose(steps)

    def __call__(self, image: Any) -> List[torch.Tensor]:
        img = self.to_image(image)
        crops = [_finish(self.global_transform_0(img)), _finish(self.global_transform_1(img))]
        if self.local_transform is not None:
            crops += [_finish(self.local_transform(img)) for _ in range(self.n_local)]
        return crops

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(preset={self.preset!r}, global_size={self.global_size}, "
            f"local_size={self.local_size}, n_local={self.n_local}, "
            f"global_scale={self.global_scale}, local_scale={self.local_scale}, "
            f"mean={self.mean}, std={self.std}, grayscale_to_rgb={self.grayscale_to_rgb})"
        )


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
        self.size = _check_size("size", size)
        if not (isinstance(crop_pct, Real) and not isinstance(crop_pct, bool) and 0 < crop_pct <= 1):
            raise ValueError(f"crop_pct must be a number in (0, 1], got {crop_pct!r}")
        self.crop_pct = float(crop_pct)
        self.mean = _check_stats("mean", mean, positive=False)
        self.std = _check_stats("std", std, positive=True)
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
        return _finish(self.transform(image))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, crop_pct={self.crop_pct}, mean={self.mean}, "
            f"std={self.std}, grayscale_to_rgb={self.grayscale_to_rgb})"
        )
