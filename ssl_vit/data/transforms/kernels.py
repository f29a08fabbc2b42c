"""Batched augmentation kernels on float32 (N, C, H, W) tensors holding uint8 values, reproducing
the uint8 arithmetic of the v2 kernels (``.to(torch.uint8)`` truncates, the blur rounds), and
:func:`augment_crops`, which applies one image's crops' parameters to a batch of same-size crops."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as TF

from ssl_vit.data.transforms.spec import BRIGHTNESS, CONTRAST, HUE, SATURATION, CropParams, CropSpec


def luma_floor(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> floored luma (N, 1, H, W), computed as v2's rgb_to_grayscale does."""
    r, g, b = x.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def blend_step(x: torch.Tensor, coef: torch.Tensor, contrast: bool, saturation: bool) -> torch.Tensor:
    """One step of the colour jitter on a batch. Brightness, contrast and saturation are all
    blends ``x * f + ref * (1 - f)`` (ref: 0, the mean luma, the floored luma) truncated to uint8
    values; ``coef`` (3, N, 1, 1, 1) holds per sample f (1: unchanged), (1 - f) for a contrast
    step (else 0) and (1 - f) for a saturation step (else 0)."""
    out = x * coef[0]
    if contrast or saturation:
        luma = x if x.shape[1] == 1 else luma_floor(x)
        ref = luma.mean(dim=(1, 2, 3), keepdim=True).mul_(coef[1]) if contrast else None
        if saturation:
            ref = luma * coef[2] if ref is None else ref + luma * coef[2]
        out += ref
    return out.clamp_(0, 255).trunc_()


_HSV_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)


def adjust_hue(x: torch.Tensor, shifts: List[float]) -> torch.Tensor:
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
    h6 = h6.div_(d).add_(torch.tensor(shifts, dtype=torch.float32, device=x.device).mul_(6.0).view(-1, 1, 1))
    k = torch.remainder(h6.unsqueeze(1) + _HSV_OFFSETS.to(x.device), 6.0)
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


class MatrixGaussianBlur:
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
        a_h = self._matrices(weights, h).to(x.device)
        a_w = a_h if w == h else self._matrices(weights, w).to(x.device)
        n, c = x.shape[:2]
        # x @ A_w^T as one (C*H, W) x (W, W) product per sample, then A_h @ (.) per channel
        y = torch.bmm(x.reshape(n, c * h, w), a_w.view(n, w, w).transpose(1, 2))
        return torch.matmul(a_h, y.view(n, c, h, w)).round_()


# The antialiased bicubic kernel F.interpolate dispatches to (skips its Python argument checks).
_upsample_bicubic_aa = getattr(torch._C._nn, "_upsample_bicubic2d_aa", None)


def resized_crop_uint8(img: torch.Tensor, p: CropParams, size: List[int]) -> torch.Tensor:
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



def augment_crops(
    x: torch.Tensor, params: List[CropParams], specs: List[CropSpec], blur: MatrixGaussianBlur
) -> torch.Tensor:
    """Flip, colour jitter, grayscale, blur and solarise a batch of same-size crops (float32
    uint8 values), each crop with its own parameters: one image's crops in the workers, or the
    crops of a whole batch in the training process (``data.batched_augmentation``; on ``x``'s
    device, with the same result)."""
    n, c = x.shape[:2]
    device = x.device
    # horizontal flip
    flips = [p.flip for p in params]
    if all(flips):
        x = x.flip(-1)
    elif any(flips):
        x = torch.where(torch.tensor(flips, device=device).view(n, 1, 1, 1), x.flip(-1), x)
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
        coef = torch.tensor(rows, dtype=torch.float32, device=device).view(n_steps, 3, n, 1, 1, 1)
        for step, (blend, contrast, saturation, hue) in enumerate(steps):
            if blend:
                x = blend_step(x, coef[step], contrast, saturation)
            if hue:
                shifts = [orders[i][step][1] for i in hue]
                if len(hue) == n:
                    x = adjust_hue(x, shifts)
                else:
                    x[hue] = adjust_hue(x[hue], shifts)
    # random grayscale (an identity on one channel)
    gray = [p.grayscale for p in params]
    if c == 3 and any(gray):
        x = torch.where(torch.tensor(gray, device=device).view(n, 1, 1, 1), luma_floor(x), x)
    # Gaussian blur
    sigmas = [p.blur_sigma for p in params]
    blurred = [i for i, s in enumerate(sigmas) if s is not None]
    if len(blurred) == n or (blurred and x.shape[-2] * x.shape[-1] <= _BLUR_WHOLE_BATCH_MAX_AREA):
        x = blur(x, sigmas)
    elif blurred:
        x[blurred] = blur(x[blurred], [sigmas[i] for i in blurred])
    # solarisation: the pixels at or above the crop's threshold, in the crops that solarise
    thresholds = [float(spec.solarize_threshold) if p.solarize else math.inf for p, spec in zip(params, specs)]
    if any(t != math.inf for t in thresholds):
        at_or_above = x >= torch.tensor(thresholds, device=device).view(n, 1, 1, 1)
        x = torch.where(at_or_above, 255.0 - x, x)
    return x
