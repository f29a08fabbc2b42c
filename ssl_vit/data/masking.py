"""Block-wise patch masking for iBOT / DINOv2.

A mask is built from axis-aligned rectangles of patches ("blocks"). Every rectangle

* covers at least ``min_num_patches`` patches (4 by default),
* covers at most ``max_num_patches`` patches (half of all patches by default),
* has an aspect ratio ``rows / cols`` in ``[min_aspect, max_aspect]`` (0.3 .. 1/0.3), with the
  aspect drawn log-uniformly, and
* fits inside the patch grid.

Rectangles are added (they may overlap earlier ones) until the requested number of masked
patches is reached. A rectangle is only accepted when it masks at least one new patch and no more
new patches than are still missing, so a mask never exceeds its target. When ``max_attempts``
consecutive random placements are all rejected the mask is returned as it is, which can leave it
a few patches short of the target (typically when only 1-3 patches are missing and no >= 4-patch
rectangle overlaps the mask in the right way). Measured with the defaults: masks reach 95-99% of
their target on average on an 8x8 grid (10-50% targets), 97-100% on 16x16.

Difference from the released DINOv2 code, on purpose: there the rectangle's side lengths are
rounded from a continuous (area, aspect) draw and used as they come, so rectangles of 3 patches
or with an aspect slightly outside the bounds (1 x 4 = 0.25) can occur. Here such rounded shapes
are redrawn (a rounding artefact is not a placement attempt; at most 10 draws per attempt), so
every rectangle satisfies the stated bounds.

Randomness comes from a :class:`numpy.random.Generator` (fast scalar draws). Pass one per call
(``rng=``), or give the generator a ``seed``; without either, a seed is drawn once from torch's
global RNG, so ``torch.manual_seed`` makes results reproducible.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

Rect = Tuple[int, int, int, int]  # (top, left, height, width) in patches
RngLike = Union[None, int, np.random.Generator, torch.Generator]

_EPS = 1e-9
# Shape draws whose rounded sides break a bound are redrawn, at most this many per attempt.
_SHAPE_DRAWS_PER_ATTEMPT = 10


def as_numpy_rng(rng: RngLike) -> Optional[np.random.Generator]:
    """Turn ``rng`` into a numpy Generator.

    ``None`` -> ``None``; an ``int`` seeds a new generator; a ``torch.Generator`` is used to draw
    a seed (so it advances); a numpy Generator is returned as is.
    """
    if rng is None or isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=rng).item())
        return np.random.default_rng(seed)
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(
        f"rng must be None, an int seed, a numpy.random.Generator or a torch.Generator, "
        f"got {type(rng).__name__}"
    )


def seed_from_torch() -> int:
    """A 62-bit seed drawn from torch's global RNG (reproducible under torch.manual_seed)."""
    return int(torch.randint(0, 2**62, (1,)).item())


class BlockMaskGenerator:
    """Draw block-wise boolean masks of shape ``grid`` (rows, cols), True = masked patch.

    Args:
        grid: patch grid ``(rows, cols)`` (an int means a square grid).
        min_num_patches: smallest rectangle, in patches (default 4).
        max_num_patches: largest rectangle, in patches; default ``int(0.5 * rows * cols)``.
        min_aspect: smallest ``rows / cols`` of a rectangle (default 0.3).
        max_aspect: largest ``rows / cols``; default ``1 / min_aspect``.
        max_attempts: consecutive rejected rectangles after which a mask is returned as it is.
        seed: seed of the generator's own RNG, used when no ``rng`` is passed to a call.

    Call: ``gen(num_masking_patches, rng=None)`` -> ``torch.bool`` tensor ``(rows, cols)`` with
    at most ``num_masking_patches`` True entries.
    """

    def __init__(
        self,
        grid: Union[int, Sequence[int]],
        min_num_patches: int = 4,
        max_num_patches: Optional[int] = None,
        min_aspect: float = 0.3,
        max_aspect: Optional[float] = None,
        max_attempts: int = 10,
        seed: Optional[int] = None,
    ) -> None:
        if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
            grid = (int(grid), int(grid))
        try:
            rows, cols = (int(g) for g in grid)
        except (TypeError, ValueError):
            raise ValueError(f"grid must be an int or a pair (rows, cols), got {grid!r}") from None
        if rows <= 0 or cols <= 0:
            raise ValueError(f"grid must be positive, got {(rows, cols)!r}")
        self.rows, self.cols = rows, cols
        self.num_patches = rows * cols

        if int(min_num_patches) != min_num_patches or min_num_patches < 1:
            raise ValueError(f"min_num_patches must be a positive int, got {min_num_patches!r}")
        self.min_num_patches = int(min_num_patches)
        if max_num_patches is None:
            max_num_patches = int(0.5 * self.num_patches)
        if int(max_num_patches) != max_num_patches or not (
            self.min_num_patches <= max_num_patches <= self.num_patches
        ):
            raise ValueError(
                f"max_num_patches must be an int in [min_num_patches={self.min_num_patches}, "
                f"num_patches={self.num_patches}], got {max_num_patches!r}"
            )
        self.max_num_patches = int(max_num_patches)

        if not (min_aspect > 0 and math.isfinite(min_aspect)):
            raise ValueError(f"min_aspect must be a positive number, got {min_aspect!r}")
        if max_aspect is None:
            max_aspect = 1.0 / min_aspect
        if not (max_aspect >= min_aspect and math.isfinite(max_aspect)):
            raise ValueError(
                f"max_aspect must be a number >= min_aspect={min_aspect}, got {max_aspect!r}"
            )
        self.min_aspect, self.max_aspect = float(min_aspect), float(max_aspect)
        self._log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))

        if int(max_attempts) != max_attempts or max_attempts < 1:
            raise ValueError(f"max_attempts must be a positive int, got {max_attempts!r}")
        self.max_attempts = int(max_attempts)

        if not any(
            self.is_valid_shape(h, w)
            for h in range(1, rows + 1)
            for w in range(1, cols + 1)
        ):
            raise ValueError(
                f"no rectangle fits grid {(rows, cols)} with {self.min_num_patches} <= area <= "
                f"{self.max_num_patches} and aspect in [{self.min_aspect:.4g}, "
                f"{self.max_aspect:.4g}]: lower min_num_patches or use a larger grid"
            )
        self.seed = seed
        self._rng: Optional[np.random.Generator] = None

    # ------------------------------------------------------------------ helpers
    @property
    def grid(self) -> Tuple[int, int]:
        return self.rows, self.cols

    def get_shape(self) -> Tuple[int, int]:
        return self.rows, self.cols

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(grid={self.grid}, min_num_patches={self.min_num_patches}, "
            f"max_num_patches={self.max_num_patches}, min_aspect={self.min_aspect:.4g}, "
            f"max_aspect={self.max_aspect:.4g}, max_attempts={self.max_attempts})"
        )

    def is_valid_shape(self, h: int, w: int) -> bool:
        """Whether an ``h x w`` rectangle satisfies the size, aspect and grid bounds."""
        if not (1 <= h <= self.rows and 1 <= w <= self.cols):
            return False
        if not (self.min_num_patches <= h * w <= self.max_num_patches):
            return False
        aspect = h / w
        return self.min_aspect - _EPS <= aspect <= self.max_aspect + _EPS

    def _resolve_rng(self, rng: RngLike) -> np.random.Generator:
        rng = as_numpy_rng(rng)
        if rng is not None:
            return rng
        if self._rng is None:
            self._rng = np.random.default_rng(
                self.seed if self.seed is not None else seed_from_torch()
            )
        return self._rng

    def _add_rectangle(
        self, mask: np.ndarray, budget: int, rng: np.random.Generator
    ) -> Tuple[Optional[Rect], int]:
        """Try up to ``max_attempts`` rectangles; mask the first that adds 1..budget patches."""
        hi = max(self.min_num_patches, min(self.max_num_patches, budget))
        attempts = draws = 0
        while attempts < self.max_attempts and draws < _SHAPE_DRAWS_PER_ATTEMPT * self.max_attempts:
            draws += 1
            area = rng.uniform(self.min_num_patches, hi)
            aspect = math.exp(rng.uniform(*self._log_aspect))
            h = int(math.floor(math.sqrt(area * aspect) + 0.5))
            w = int(math.floor(math.sqrt(area / aspect) + 0.5))
            if not self.is_valid_shape(h, w):
                continue  # a rounding artefact, not a placement: draw the shape again
            attempts += 1
            top = int(rng.integers(0, self.rows - h + 1))
            left = int(rng.integers(0, self.cols - w + 1))
            window = mask[top : top + h, left : left + w]
            new = h * w - int(window.sum())
            if 0 < new <= budget:
                window[...] = True
                return (top, left, h, w), new
        return None, 0

    # ------------------------------------------------------------------ public
    def generate(
        self, num_masking_patches: int, rng: RngLike = None
    ) -> Tuple[np.ndarray, List[Rect]]:
        """Return ``(mask, rectangles)``: a numpy bool mask and the accepted rectangles
        ``(top, left, height, width)`` in the order they were added."""
        if int(num_masking_patches) != num_masking_patches or num_masking_patches < 0:
            raise ValueError(
                f"num_masking_patches must be a non-negative int, got {num_masking_patches!r}"
            )
        target = min(int(num_masking_patches), self.num_patches)
        rng = self._resolve_rng(rng)
        mask = np.zeros((self.rows, self.cols), dtype=bool)
        rects: List[Rect] = []
        count = 0
        while count < target:
            rect, new = self._add_rectangle(mask, target - count, rng)
            if rect is None:
                break
            rects.append(rect)
            count += new
        return mask, rects

    def __call__(self, num_masking_patches: int = 0, rng: RngLike = None) -> torch.Tensor:
        mask, _ = self.generate(num_masking_patches, rng)
        return torch.from_numpy(mask)
