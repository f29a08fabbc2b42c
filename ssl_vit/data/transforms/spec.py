"""What each crop's augmentation is: the papers' parameters, the presets, argument checks and
:class:`CropSpec` (one crop's recipe, with its ``torchvision.transforms.v2`` composition, the
specification of the fast path), and :class:`CropParams` (one crop's random draw)."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from numbers import Real
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

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
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default, used by both papers
BLUR_SIGMA = (0.1, 2.0)
BLUR_P_GLOBAL_0 = 1.0
BLUR_P_GLOBAL_1 = 0.1
BLUR_P_LOCAL = 0.5
SOLARIZE_P_GLOBAL_1 = 0.2
SOLARIZE_THRESHOLD_UINT8 = 128

Size = Union[int, Tuple[int, int]]



# ---------------------------------------------------------------------- argument checks
def is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_size(name: str, value: Any) -> Tuple[int, int]:
    """Positive int or (h, w) pair of positive ints -> (h, w)."""
    if is_int(value) and value > 0:
        return int(value), int(value)
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(is_int(v) and v > 0 for v in value)
    ):
        return int(value[0]), int(value[1])
    raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")


def check_scale(name: str, value: Any) -> Tuple[float, float]:
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


def check_stats(name: str, value: Any, positive: bool) -> Tuple[float, ...]:
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
    h, w = check_size("crop_size", crop_size)
    side = min(h, w)
    k = max(3, int(math.floor(0.1 * side + 0.5)))
    if k % 2 == 0:
        k += 1
    cap = side if side % 2 == 1 else side - 1
    return max(1, min(k, cap))


def _maybe(transform: Any, p: float) -> List[Any]:
    if p <= 0:
        return []
    if p >= 1:
        return [transform]
    return [v2.RandomApply([transform], p=p)]


# ---------------------------------------------------------------------- crop specification
# Colour-jitter operations, numbered as ColorJitter numbers them (its random order permutes them).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


@dataclass(frozen=True)
class CropSpec:
    """The augmentation of one crop (all probabilities are per crop).

    ``brightness`` / ``contrast`` / ``saturation`` / ``hue`` are ColorJitter's strengths: the
    factors are uniform in ``(max(0, 1 - b), 1 + b)`` (hue: shift in ``(-h, h)``); 0 disables the
    operation.
    """

    size: Tuple[int, int]
    scale: Tuple[float, float]
    blur_p: float
    solarize_p: float = 0.0
    ratio: Tuple[float, float] = CROP_RATIO
    flip_p: float = FLIP_P
    brightness: float = COLOR_JITTER["brightness"]
    contrast: float = COLOR_JITTER["contrast"]
    saturation: float = COLOR_JITTER["saturation"]
    hue: float = COLOR_JITTER["hue"]
    color_jitter_p: float = COLOR_JITTER_P
    grayscale_p: float = GRAYSCALE_P
    blur_sigma: Tuple[float, float] = BLUR_SIGMA
    solarize_threshold: int = SOLARIZE_THRESHOLD_UINT8

    @property
    def blur_kernel_size(self) -> int:
        return blur_kernel_size(self.size)

    def jitter_ranges(self) -> Tuple[Optional[Tuple[float, float]], ...]:
        """Factor range of (brightness, contrast, saturation, hue) as ColorJitter derives them;
        None where disabled."""
        return self._derived[0]

    @functools.cached_property
    def _derived(self) -> Tuple[Tuple[Optional[Tuple[float, float]], ...], Tuple[float, float]]:
        # (jitter ranges, log aspect-ratio range), computed once (the sampler needs them per crop)
        def factor(v: float) -> Optional[Tuple[float, float]]:
            return (max(0.0, 1.0 - v), 1.0 + v) if v > 0 else None

        ranges = (
            factor(self.brightness),
            factor(self.contrast),
            factor(self.saturation),
            (-self.hue, self.hue) if self.hue > 0 else None,
        )
        return ranges, (math.log(self.ratio[0]), math.log(self.ratio[1]))

    def reference_pipeline(
        self, mean: Sequence[float], std: Sequence[float], grayscale_to_rgb: bool
    ) -> v2.Compose:
        """The same augmentation as a composition of ``torchvision.transforms.v2`` objects (the
        specification the fast path of :class:`MultiCropTransform` is tested against)."""
        steps: List[Any] = [
            v2.RandomResizedCrop(
                self.size, scale=self.scale, ratio=self.ratio,
                interpolation=InterpolationMode.BICUBIC, antialias=True,
            ),
            v2.RandomHorizontalFlip(p=self.flip_p),
        ]
        jitter = v2.ColorJitter(
            brightness=self.brightness, contrast=self.contrast, saturation=self.saturation, hue=self.hue
        )
        steps += _maybe(jitter, self.color_jitter_p)
        if self.grayscale_p > 0:
            steps.append(v2.RandomGrayscale(p=self.grayscale_p))
        steps += _maybe(
            v2.GaussianBlur(kernel_size=self.blur_kernel_size, sigma=self.blur_sigma), self.blur_p
        )
        if self.solarize_p > 0:
            steps.append(v2.RandomSolarize(threshold=self.solarize_threshold, p=self.solarize_p))
        if grayscale_to_rgb:
            steps.append(v2.RGB())
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        return v2.Compose(steps)


class CropParams(NamedTuple):
    """Random parameters of one crop, drawn by ``MultiCropTransform._sample_params``."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    jitter: Tuple[Tuple[int, float], ...]  # (operation, factor) in the order applied; () if skipped
    grayscale: bool
    blur_sigma: Optional[float]  # None: not blurred
    solarize: bool
