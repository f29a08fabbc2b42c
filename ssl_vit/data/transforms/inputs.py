"""Image inputs -> uint8 tensors (PIL images of any mode, numpy arrays, uint8 / float tensors)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

try:  # PIL is a torchvision dependency, but keep the module importable without it
    from PIL import Image as _PILImage
except ImportError:  # pragma: no cover
    _PILImage = None


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


def as_plain_tensor(img: torch.Tensor) -> torch.Tensor:
    return img.as_subclass(torch.Tensor)
