"""One crop's random parameters from uniforms, with the laws of the v2 transforms (all crops of an
image come from one ``torch.rand`` call: see :meth:`MultiCropTransform._sample_params`)."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

from ssl_vit.data.transforms.spec import CropParams, CropSpec


_RRC_ATTEMPTS = 10
# Uniforms per crop: 2 per RandomResizedCrop attempt, top, left, flip, jitter on/off, 4 sort keys
# (jitter order), 4 jitter factors, grayscale, blur on/off, sigma, solarize.
_U_TOP = 2 * _RRC_ATTEMPTS
UNIFORMS_PER_CROP = _U_TOP + 16


def sample_crop(spec: CropSpec, u: Sequence[float], height: int, width: int) -> CropParams:
    """One crop's parameters from ``UNIFORMS_PER_CROP`` uniforms in [0, 1), with the laws of the v2
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
