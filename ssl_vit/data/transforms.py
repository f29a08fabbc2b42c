"""Multi-crop augmentation (DINO / DINOv2) and the evaluation transform.

The augmentation follows the authors' released recipes (DINO ``main_dino.py``'s
``DataAugmentationDINO`` and DINOv2's ``DataAugmentationDINO``), per crop:

* ``RandomResizedCrop`` (bicubic, antialiased) to the global / local size with the preset's
  scale range and aspect ratios in (3/4, 4/3), then horizontal flip with p=0.5;
* colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a random order) with
  p=0.8, then random grayscale with p=0.2;
* Gaussian blur with sigma in [0.1, 2.0]: p=1.0 on global crop 0, p=0.1 on global crop 1,
  p=0.5 on every local crop; solarisation with p=0.2 on global crop 1 only;
* conversion to float in [0, 1] and normalisation by ``mean`` / ``std``.

Presets differ only in the default crop scales: ``"dinov2"`` global (0.32, 1.0), local
(0.05, 0.32); ``"dino"`` global (0.4, 1.0), local (0.05, 0.4). Explicit ``global_scale`` /
``local_scale`` override them. Each crop's parameters are a :class:`CropSpec`
(``MultiCropTransform.crop_specs``).

Implementation. The specification is the composition of ``torchvision.transforms.v2`` objects
that :class:`ReferenceMultiCrop` (and the ``global_transform_0`` / ``global_transform_1`` /
``local_transform`` attributes) build from the crop specs. ``MultiCropTransform.__call__`` computes
the same augmentation without v2's per-transform dispatch, which dominated the cost on small
images (~1 ms per 16/32-px crop):

* all random parameters of all crops come from one ``torch.rand`` call per image, with the laws
  of the v2 transforms (RandomResizedCrop's uniform area fraction and log aspect ratio, 10
  attempts then its central fallback, uniform position; RandomApply's coin flips; ColorJitter's
  uniformly random order and uniform factors; uniform blur sigma). ``torch.manual_seed`` makes a
  run reproducible and DataLoader workers (seeded differently by torch) draw different crops,
  but a seed gives other crops than the v2 pipeline would draw from it;
* each crop is cut and resized from a uint8 tensor by the kernel v2 uses (bicubic,
  ``antialias=True``, same uint8 result); the crops of one size are then stacked and augmented
  together as float32 holding uint8 values, each step reproducing the uint8 rounding of its v2
  kernel (truncation after the colour blends, floored luma, rounding after the blur) and each
  crop getting its own choices (jitter order and factors, flip, grayscale, blur, solarisation);
* the Gaussian blur is two matrix products, the separable kernel and the reflect padding folded
  into the matrices (v2's 2-D depthwise convolution is ~10x slower at 224 px);
* images whose channels are all equal (PIL ``'L'``, 1-channel tensors, ``'RGB'`` images of gray
  content such as converted Fashion-MNIST images) are augmented on one channel and replicated
  by the (fused) normalisation: saturation, hue and random grayscale are identities on gray
  pixels, so they are skipped (their random parameters are still drawn).

With the same parameters, the output equals the v2 pipeline's up to float rounding, which moves
rare pixels by a uint8 level or two (a blend landing within an ulp of an integer, a blurred
value at .5, the hue conversion); the tests check this, the laws of the parameters and the
output statistics against v2. One deliberate difference: on a 3-channel image of gray content,
v2's luma weights (summing to 0.9999) make its uint8 saturation (factor < 1), contrast and
grayscale steps lower pixels by one level; the one-channel path does not (it gives what v2
gives on the 1-channel image).

Choices of this implementation:

* Blur kernel: the papers' 224-px crops use a fixed kernel (DINOv2: 9; DINO: PIL's radius blur).
  A fixed 9-px kernel would cover half of a 16-px local crop, so the kernel scales with the crop:
  the odd integer nearest to 10% of the crop's shorter side, at least 3 (and never larger than
  the crop): 32 px -> 3, 16 px -> 3, 96 px -> 11 (even values are rounded up), 224 px -> 23.
  See :func:`blur_kernel_size`.
* The augmentations run on uint8 values (as the papers' PIL pipelines do), so the solarisation
  threshold is 128 (the same as 0.5 on a [0, 1] float image). Float tensor inputs are taken to be
  in [0, 1] and converted to uint8 first.
* Grayscale inputs are replicated to 3 channels when ``grayscale_to_rgb`` is true (the default).
* Outputs are plain ``torch.Tensor`` (not ``tv_tensors.Image``), float32, shape (C, H, W); the
  crops of one size are views of one stacked tensor.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from numbers import Real
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as TF
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
    "CropParams",
    "CropSpec",
    "EvalTransform",
    "MultiCropTransform",
    "ReferenceMultiCrop",
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
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default, used by both papers
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


_RRC_ATTEMPTS = 10
# Uniforms per crop: 2 per RandomResizedCrop attempt, top, left, flip, jitter on/off, 4 sort keys
# (jitter order), 4 jitter factors, grayscale, blur on/off, sigma, solarize.
_U_TOP = 2 * _RRC_ATTEMPTS
_U_PER_CROP = _U_TOP + 16


def _sample_crop(spec: CropSpec, u: Sequence[float], height: int, width: int) -> CropParams:
    """One crop's parameters from ``_U_PER_CROP`` uniforms in [0, 1), with the laws of the v2
    transforms (RandomResizedCrop.make_params, RandomApply, ColorJitter.make_params, ...)."""
    area = height * width
    s0, s1 = spec.scale
    ranges, (lr0, lr1) = spec._derived
    for a in range(_RRC_ATTEMPTS):
        target_area = area * (s0 + (s1 - s0) * u[2 * a])
        aspect_ratio = math.exp(lr0 + (lr1 - lr0) * u[2 * a + 1])
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            # uniform integers in [0, height - h] and [0, width - w], as torch.randint
            top = min(int(u[_U_TOP] * (height - h + 1)), height - h)
            left = min(int(u[_U_TOP + 1] * (width - w + 1)), width - w)
            break
    else:  # central crop, clamped to the ratio range (RandomResizedCrop's fallback)
        in_ratio = float(width) / float(height)
        if in_ratio < min(spec.ratio):
            w = width
            h = int(round(w / min(spec.ratio)))
        elif in_ratio > max(spec.ratio):
            h = height
            w = int(round(h * max(spec.ratio)))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    v = u[_U_TOP + 2:]
    jitter: Tuple[Tuple[int, float], ...] = ()
    if v[1] < spec.color_jitter_p:
        order = sorted(range(4), key=lambda i: v[2 + i])  # uniformly random permutation
        jitter = tuple(
            (op, ranges[op][0] + (ranges[op][1] - ranges[op][0]) * v[6 + op])
            for op in order
            if ranges[op] is not None
        )
    sigma = None
    if v[11] < spec.blur_p:
        lo, hi = spec.blur_sigma
        sigma = lo + (hi - lo) * v[12]
    return CropParams(
        top=top, left=left, height=h, width=w,
        flip=v[0] < spec.flip_p,
        jitter=jitter,
        grayscale=v[10] < spec.grayscale_p,
        blur_sigma=sigma,
        solarize=v[13] < spec.solarize_p,
    )


# ---------------------------------------------------------------------- batched kernels
# They work on float32 (N, C, H, W) tensors holding uint8 values and reproduce the uint8
# arithmetic of the v2 kernels (``.to(torch.uint8)`` truncates, the blur rounds).


def _luma_floor(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> floored luma (N, 1, H, W), computed as v2's rgb_to_grayscale does."""
    r, g, b = x.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def _blend(x: torch.Tensor, coef: torch.Tensor, contrast: bool, saturation: bool) -> torch.Tensor:
    """One step of the colour jitter on a batch. Brightness, contrast and saturation are all
    blends ``x * f + ref * (1 - f)`` (ref: 0, the mean luma, the floored luma) truncated to uint8
    values; ``coef`` (3, N, 1, 1, 1) holds per sample f (1: unchanged), (1 - f) for a contrast
    step (else 0) and (1 - f) for a saturation step (else 0)."""
    out = x * coef[0]
    if contrast or saturation:
        luma = x if x.shape[1] == 1 else _luma_floor(x)
        ref = luma.mean(dim=(1, 2, 3), keepdim=True).mul_(coef[1]) if contrast else None
        if saturation:
            ref = luma * coef[2] if ref is None else ref + luma * coef[2]
        out += ref
    return out.clamp_(0, 255).trunc_()


_HSV_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)


def _adjust_hue(x: torch.Tensor, shifts: List[float]) -> torch.Tensor:
    """Hue rotation of (N, 3, H, W) uint8 values by ``shifts[n]`` turns, as v2's adjust_hue
    (through HSV; back to uint8 by truncating ``255.999 * value``). Max and min channel stay, so
    channel c becomes ``max - (max - min) * clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (offset_c + 6 * hue) mod 6`` (offsets 5, 3, 1 for red, green, blue)."""
    minc, maxc = torch.aminmax(x, dim=1)
    delta = maxc - minc
    d = delta.clamp_min(1e-12)  # gray pixels: any finite hue, it is multiplied by delta = 0
    r, g, b = x.unbind(dim=1)
    # hue in sixths of a turn, from the channel holding the maximum (red first, then green)
    h6 = torch.where(
        maxc == r, g - b, torch.where(maxc == g, (b - r).add_(d, alpha=2.0), (r - g).add_(d, alpha=4.0))
    )
    h6 = h6.div_(d).add_(torch.tensor(shifts, dtype=torch.float32).mul_(6.0).view(-1, 1, 1))
    k = torch.remainder(h6.unsqueeze(1) + _HSV_OFFSETS, 6.0)
    w = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    out = maxc.unsqueeze(1) - delta.unsqueeze(1) * w
    return out.mul_(255.999 / 255.0).clamp_(0.0, 255.0).trunc_()


def _reflect_blur_index(n: int, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """For an (n, n) blur matrix: flat positions and kernel taps of its entries (the kernel
    centred on each row, reflect padding folded in; entries may repeat near the border)."""
    p = k // 2
    rows = torch.arange(n).repeat_interleave(k)
    taps = torch.arange(k).repeat(n)
    pos = rows + taps - p
    pos = torch.where(pos < 0, -pos, pos)
    pos = torch.where(pos >= n, 2 * (n - 1) - pos, pos)
    return rows * n + pos, taps


# Matrices with at most this many entries x taps are built as weights @ dense basis (one matmul),
# larger ones by scattering the weights.
_BLUR_DENSE_BASIS_MAX = 1 << 16
# Batches of crops up to this area are blurred whole (identity kernel for the crops not blurred).
_BLUR_WHOLE_BATCH_MAX_AREA = 64 * 64


class _GaussianBlur:
    """Per-sample Gaussian blur of (N, C, H, W) uint8 values as ``A_h @ x @ A_w^T``: v2's kernel
    (``softmax(-(t / sigma)^2)``, ``t = linspace(-(k-1)/(2 sqrt 2), +(k-1)/(2 sqrt 2), k)``),
    reflect padding, rounded result, as v2.GaussianBlur on uint8 images. A sigma of None stands
    for the identity (exact: one-hot kernel)."""

    def __init__(self, kernel_size: int) -> None:
        self.k = kernel_size
        lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
        self.t = torch.linspace(-lim, lim, steps=kernel_size, dtype=torch.float32).tolist()
        self._cache: Dict[int, Tuple[str, Any]] = {}

    def __getstate__(self) -> Dict[str, Any]:
        return {"k": self.k, "t": self.t, "_cache": {}}  # the bases are rebuilt on demand

    def weights(self, sigmas: Sequence[Optional[float]]) -> torch.Tensor:
        rows = []
        for s in sigmas:
            if s is None:
                row = [0.0] * self.k
                row[self.k // 2] = 1.0
            else:
                e = [math.exp(-((t / s) ** 2)) for t in self.t]
                total = sum(e)
                row = [v / total for v in e]
            rows.append(row)
        return torch.tensor(rows, dtype=torch.float32)

    def _matrices(self, weights: torch.Tensor, n: int) -> torch.Tensor:
        if n not in self._cache:
            flat, taps = _reflect_blur_index(n, self.k)
            if n * n * self.k <= _BLUR_DENSE_BASIS_MAX:
                basis = torch.zeros(self.k, n * n)
                basis.index_put_((taps, flat), torch.ones(flat.shape[0]), accumulate=True)
                self._cache[n] = ("dense", basis)
            else:
                self._cache[n] = ("scatter", (flat, taps))
        kind, data = self._cache[n]
        m = weights.shape[0]
        if kind == "dense":
            a = torch.matmul(weights, data)
        else:
            flat, taps = data
            a = torch.zeros(m, n * n, dtype=torch.float32).index_add_(1, flat, weights[:, taps])
        return a.view(m, 1, n, n)

    def __call__(self, x: torch.Tensor, sigmas: Sequence[Optional[float]]) -> torch.Tensor:
        weights = self.weights(sigmas)
        h, w = x.shape[-2:]
        a_h = self._matrices(weights, h)
        a_w = a_h if w == h else self._matrices(weights, w)
        n, c = x.shape[:2]
        # x @ A_w^T as one (C*H, W) x (W, W) product per sample, then A_h @ (.) per channel
        y = torch.bmm(x.reshape(n, c * h, w), a_w.view(n, w, w).transpose(1, 2))
        return torch.matmul(a_h, y.view(n, c, h, w)).round_()


# The antialiased bicubic kernel F.interpolate dispatches to (skips its Python argument checks).
_upsample_bicubic_aa = getattr(torch._C._nn, "_upsample_bicubic2d_aa", None)


def _resized_crop(img: torch.Tensor, p: CropParams, size: List[int]) -> torch.Tensor:
    """uint8 (1, C, H, W) -> uint8 (1, C, h, w): v2's resized_crop kernel for uint8 CPU tensors
    (bicubic, antialiased, native uint8 interpolation), without its dispatch."""
    crop = img[:, :, p.top:p.top + p.height, p.left:p.left + p.width]
    if p.height == size[0] and p.width == size[1]:
        return crop
    if img.dtype == torch.uint8 and img.device.type == "cpu":
        if _upsample_bicubic_aa is not None:
            return _upsample_bicubic_aa(crop, size, False, None)
        return TF.interpolate(crop, size=size, mode="bicubic", align_corners=False, antialias=True)
    out = TF.interpolate(crop.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0, 255).round_().to(img.dtype)


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

    Accepts PIL images, numpy HWC arrays and (C, H, W) / (H, W) tensors (uint8, or float in
    [0, 1]). ``crop_specs`` holds each crop's :class:`CropSpec`; ``global_transform_0``,
    ``global_transform_1`` and ``local_transform`` are the equivalent v2 compositions.
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
        self.global_spec_0 = CropSpec(self.global_size, self.global_scale, blur_p=BLUR_P_GLOBAL_0)
        self.global_spec_1 = CropSpec(
            self.global_size, self.global_scale, blur_p=BLUR_P_GLOBAL_1, solarize_p=SOLARIZE_P_GLOBAL_1
        )
        self.local_spec = (
            CropSpec(self.local_size, self.local_scale, blur_p=BLUR_P_LOCAL)
            if self.local_size is not None
            else None
        )
        # (x / 255 - mean) / std = x * scale + shift, per channel; for 3 output channels the
        # statistics are broadcast to 3 values (1 value for 1 channel unless mean / std has 3)
        n_stats = max(len(self.mean), len(self.std))
        self._norm = {}
        for out_channels in (1, 3):
            k = max(n_stats, out_channels)
            mean_k = [self.mean[i % len(self.mean)] for i in range(k)]
            std_k = [self.std[i % len(self.std)] for i in range(k)]
            self._norm[out_channels] = (
                torch.tensor([1.0 / (255.0 * s) for s in std_k], dtype=torch.float32).view(1, k, 1, 1),
                torch.tensor([-m / s for m, s in zip(mean_k, std_k)], dtype=torch.float32).view(1, k, 1, 1),
            )
        self._blur = {
            spec.size: _GaussianBlur(spec.blur_kernel_size)
            for spec in (self.global_spec_0, self.local_spec)
            if spec is not None
        }
        self._reference: Optional[Tuple[v2.Compose, v2.Compose, Optional[v2.Compose]]] = None

    @property
    def n_global(self) -> int:
        return 2

    @property
    def n_crops(self) -> int:
        return 2 + self.n_local

    @property
    def crop_specs(self) -> List[CropSpec]:
        """The :class:`CropSpec` of every output crop, in output order."""
        return [self.global_spec_0, self.global_spec_1] + [self.local_spec] * self.n_local

    # ------------------------------------------------------------------ reference pipelines
    def _reference_pipelines(self) -> Tuple[v2.Compose, v2.Compose, Optional[v2.Compose]]:
        if self._reference is None:
            args = (self.mean, self.std, self.grayscale_to_rgb)
            self._reference = (
                self.global_spec_0.reference_pipeline(*args),
                self.global_spec_1.reference_pipeline(*args),
                self.local_spec.reference_pipeline(*args) if self.local_spec is not None else None,
            )
        return self._reference

    @property
    def global_transform_0(self) -> v2.Compose:
        """Global crop 0 as a v2 composition (equivalent to the fast path; not used by it)."""
        return self._reference_pipelines()[0]

    @property
    def global_transform_1(self) -> v2.Compose:
        return self._reference_pipelines()[1]

    @property
    def local_transform(self) -> Optional[v2.Compose]:
        return self._reference_pipelines()[2]

    # ------------------------------------------------------------------ fast path
    def _load(self, image: Any) -> Tuple[torch.Tensor, int]:
        """-> (uint8 (C, H, W) tensor, number of input channels); C is 1 when all channels are
        equal (the colour operations that would tell them apart are identities on gray pixels)."""
        if _PILImage is not None and isinstance(image, _PILImage.Image):
            if image.mode == "L":
                return torch.from_numpy(np.array(image)).unsqueeze(0), 1
            if image.mode == "RGB":
                a = np.array(image)
                if (a[:, :, 1:] == a[:, :, :1]).all():
                    return torch.from_numpy(np.ascontiguousarray(a[:, :, 0])).unsqueeze(0), 3
                return torch.from_numpy(a).permute(2, 0, 1), 3
        img = self.to_image(image).as_subclass(torch.Tensor)
        if img.shape[0] == 3 and torch.equal(img[0], img[1]) and torch.equal(img[1], img[2]):
            return img[:1], 3
        return img, img.shape[0]

    def _sample_params(self, height: int, width: int) -> List[CropParams]:
        """Random parameters of every crop, from one draw of torch's global RNG."""
        u = torch.rand(self.n_crops, _U_PER_CROP, dtype=torch.float64).tolist()
        return [_sample_crop(spec, row, height, width) for spec, row in zip(self.crop_specs, u)]

    def _apply(self, img: torch.Tensor, params: List[CropParams], out_channels: int) -> List[torch.Tensor]:
        """Augment uint8 ``img`` (C, H, W) with the given per-crop parameters."""
        groups = [(self.global_size, params[:2], self.crop_specs[:2])]
        if self.n_local:
            groups.append((self.local_size, params[2:], self.crop_specs[2:]))
        crops: List[torch.Tensor] = []
        img = img.unsqueeze(0)
        for size, group, specs in groups:
            out_size = list(size)
            x = torch.cat([_resized_crop(img, p, out_size) for p in group]).to(torch.float32)
            x = self._augment(x, group, specs, self._blur[size])
            crops.extend(self._normalize(x, out_channels).unbind(0))
        return crops

    @staticmethod
    def _augment(
        x: torch.Tensor, params: List[CropParams], specs: List[CropSpec], blur: _GaussianBlur
    ) -> torch.Tensor:
        """Flip, colour jitter, grayscale, blur and solarise a batch of same-size crops (float32
        uint8 values), each crop with its own parameters."""
        n, c = x.shape[:2]
        # horizontal flip
        flips = [p.flip for p in params]
        if all(flips):
            x = x.flip(-1)
        elif any(flips):
            x = torch.where(torch.tensor(flips).view(n, 1, 1, 1), x.flip(-1), x)
        # colour jitter, each crop in its own order; saturation and hue are identities on gray
        kept = (BRIGHTNESS, CONTRAST, SATURATION, HUE) if c == 3 else (BRIGHTNESS, CONTRAST)
        orders = [[(op, f) for op, f in p.jitter if op in kept] for p in params]
        n_steps = max(len(o) for o in orders)
        if n_steps:
            rows: List[List[float]] = []
            steps = []  # per step: (any blend, any contrast, any saturation, hue samples)
            for step in range(n_steps):
                mult, w_c, w_s = [1.0] * n, [0.0] * n, [0.0] * n
                hue: List[int] = []
                blend = False
                for i, order in enumerate(orders):
                    if step < len(order):
                        op, f = order[step]
                        if op == HUE:
                            hue.append(i)
                            continue
                        blend = True
                        mult[i] = f
                        if op == CONTRAST:
                            w_c[i] = 1.0 - f
                        elif op == SATURATION:
                            w_s[i] = 1.0 - f
                steps.append((blend, any(w_c), any(w_s), hue))
                rows += [mult, w_c, w_s]
            coef = torch.tensor(rows, dtype=torch.float32).view(n_steps, 3, n, 1, 1, 1)
            for step, (blend, contrast, saturation, hue) in enumerate(steps):
                if blend:
                    x = _blend(x, coef[step], contrast, saturation)
                if hue:
                    shifts = [orders[i][step][1] for i in hue]
                    if len(hue) == n:
                        x = _adjust_hue(x, shifts)
                    else:
                        x[hue] = _adjust_hue(x[hue], shifts)
        # random grayscale (an identity on one channel)
        gray = [p.grayscale for p in params]
        if c == 3 and any(gray):
            x = torch.where(torch.tensor(gray).view(n, 1, 1, 1), _luma_floor(x), x)
        # Gaussian blur
        sigmas = [p.blur_sigma for p in params]
        blurred = [i for i, s in enumerate(sigmas) if s is not None]
        if len(blurred) == n or (blurred and x.shape[-2] * x.shape[-1] <= _BLUR_WHOLE_BATCH_MAX_AREA):
            x = blur(x, sigmas)
        elif blurred:
            x[blurred] = blur(x[blurred], [sigmas[i] for i in blurred])
        # solarisation
        for i, (p, spec) in enumerate(zip(params, specs)):
            if p.solarize:
                xi = x[i]
                x[i] = torch.where(xi >= spec.solarize_threshold, 255.0 - xi, xi)
        return x

    def _normalize(self, x: torch.Tensor, out_channels: int) -> torch.Tensor:
        """ToDtype(float32, scale=True) + Normalize, fused as ``x * scale + shift``; replicates a
        1-channel batch to ``out_channels``."""
        scale, shift = self._norm[out_channels]
        return torch.addcmul(shift, x, scale)

    def __call__(self, image: Any) -> List[torch.Tensor]:
        img, in_channels = self._load(image)
        out_channels = 3 if (self.grayscale_to_rgb or in_channels == 3) else 1
        params = self._sample_params(img.shape[-2], img.shape[-1])
        return self._apply(img, params, out_channels)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(preset={self.preset!r}, global_size={self.global_size}, "
            f"local_size={self.local_size}, n_local={self.n_local}, "
            f"global_scale={self.global_scale}, local_scale={self.local_scale}, "
            f"mean={self.mean}, std={self.std}, grayscale_to_rgb={self.grayscale_to_rgb})"
        )


class ReferenceMultiCrop:
    """``transform``'s augmentation run as composed ``torchvision.transforms.v2`` objects, crop by
    crop, the way the papers' code runs it (the specification of the fast path, kept for tests
    and benchmarks; about 10x slower on small images)."""

    def __init__(self, transform: MultiCropTransform) -> None:
        self.transform = transform
        self.to_image = ToUint8Image()

    def __call__(self, image: Any) -> List[torch.Tensor]:
        t = self.transform
        img = self.to_image(image)
        crops = [_finish(t.global_transform_0(img)), _finish(t.global_transform_1(img))]
        if t.local_transform is not None:
            crops += [_finish(t.local_transform(img)) for _ in range(t.n_local)]
        return crops

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


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
