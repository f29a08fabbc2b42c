"""Multi-crop collation with iBOT block masks (DINOv2 data pipeline).

A sample is ``(crops, label)`` with ``crops = [global_0, global_1, ..., local_0, local_1, ...]``
(the first ``n_global`` entries are the global crops). A batch of B samples becomes::

    global_crops   (n_global*B, C, H, W)  crop-major: all images' global_0, then all global_1, ...
    local_crops    (n_local*B, C, h, w)   crop-major too; shape (0, C, 0, 0) when there are none
    masks          (n_global*B, N) bool   True = patch replaced by the mask token (N = rows*cols
                                          of the mask generator's grid, row-major)
    labels         (B,) long              -1 where the label is missing (None or -1)
    n_masked_patches  0-d long tensor     total True entries in ``masks``
    n_masked_crops    0-d long tensor     global crops whose mask is not empty
    mask_weights   (M,) float32           for each masked token, 1 / (masked patches of its crop)
    masked_indices (M,) long              flat indices into the (n_global*B * N) patch tokens
                                          of the masked ones, ascending (crop-major, then patch)

Masking follows DINOv2: exactly ``floor(mask_probability * n_global*B)`` of the global crops get
a mask; for ``n`` masked crops, crop ``i`` draws its ratio uniformly from the ``i``-th interval of
``linspace(lo, hi, n + 1)`` and asks the generator for ``int(N * ratio)`` patches; the other crops
get empty masks; then the ``n_global*B`` masks are shuffled across crops, so the global crops of
one image are masked independently of each other.

With the weights, the iBOT loss of DINOv2 is
``-(sum over masked tokens of weight * sum_k t_k log s_k) / (n_global*B)``: a mean over the masked
patches of each image, then over all global crops (unmasked crops count as zero).

Randomness: when the samples are triples ``(crops, label, seed)`` (the training sampler's keys,
see :mod:`ssl_vit.data.sampler`), each batch's masks come from a generator seeded by the
collator's seed and the batch's sample seeds: the same batch gets the same masks in any worker,
in any process of a distributed run, and after a resume. For plain pairs, a numpy Generator
owned by the collator: in the main process it is seeded by ``seed``
(or, when ``seed`` is None, from torch's global RNG at the first batch). Inside a DataLoader
worker it is re-seeded from ``(seed, worker_info.seed)`` the first time the worker uses it, so
workers draw different masks, and new workers of a later epoch draw new ones; the DataLoader's
base seed comes from torch's global RNG, so ``torch.manual_seed`` / Lightning's
``seed_everything`` keep everything reproducible.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ssl_vit.data.masking import BlockMaskGenerator, seed_from_torch
from ssl_vit.data.transforms.deferred import CropParamsBatch, PendingCrops

__all__ = ["MultiCropCollator", "mask_fields", "stratified_mask_targets"]


def stratified_mask_targets(
    n_masked: int,
    num_patches: int,
    ratio_range: Tuple[float, float],
    rng: np.random.Generator,
) -> List[int]:
    """Targets ``int(num_patches * r_i)``, ``r_i ~ U(edges[i], edges[i+1])`` with
    ``edges = linspace(lo, hi, n_masked + 1)``; ascending stratum order."""
    if n_masked <= 0:
        return []
    edges = np.linspace(ratio_range[0], ratio_range[1], n_masked + 1)
    ratios = rng.uniform(edges[:-1], edges[1:])
    return [int(num_patches * float(r)) for r in ratios]


def mask_fields(masks: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The batch entries derived from the ``(n_global*B, N)`` masks (see the module docstring):
    ``masks``, ``n_masked_patches``, ``n_masked_crops``, ``mask_weights``, ``masked_indices``."""
    counts = masks.sum(dim=1)
    per_crop_weight = 1.0 / counts.clamp(min=1).to(torch.float32)
    return {
        "masks": masks,
        "n_masked_patches": counts.sum(),
        "n_masked_crops": (counts > 0).sum(),
        "mask_weights": per_crop_weight.unsqueeze(1).expand_as(masks)[masks],
        "masked_indices": masks.reshape(-1).nonzero().reshape(-1),
    }


def _label_to_int(label: Any) -> int:
    if label is None:
        return -1
    if isinstance(label, torch.Tensor):
        if label.numel() != 1:
            raise ValueError(f"a label must be a scalar, got a tensor of shape {tuple(label.shape)}")
        label = label.item()
    try:
        return int(label)
    except (TypeError, ValueError):
        raise ValueError(f"a label must be an int, None or -1, got {label!r}") from None


class MultiCropCollator:
    """``collate_fn`` for multi-crop SSL batches with block masks (see the module docstring).

    Args:
        mask_generator: a :class:`BlockMaskGenerator` (or any callable
            ``gen(num_patches, rng=np.random.Generator) -> bool (rows, cols)`` with a
            ``num_patches`` attribute), or None to produce no masks at all.
        mask_ratio_range: ``(lo, hi)`` of the stratified mask ratios, 0 <= lo <= hi <= 1.
        mask_probability: fraction of the global crops that get a mask, in [0, 1].
        n_global: number of global crops per sample (the first entries of its crop list).
        seed: seed of the collator's RNG (see the module docstring for workers).
        generator: an explicit numpy Generator to use instead (never re-seeded).
    """

    accepts_sample_seeds = True  # the data module then hands it (crops, label, seed) triples

    def __init__(
        self,
        mask_generator: Optional[BlockMaskGenerator],
        mask_ratio_range: Sequence[float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        n_global: int = 2,
        seed: Optional[int] = None,
        generator: Optional[np.random.Generator] = None,
    ) -> None:
        try:
            lo, hi = (float(v) for v in mask_ratio_range)
        except (TypeError, ValueError):
            raise ValueError(
                f"mask_ratio_range must be a pair (lo, hi), got {mask_ratio_range!r}"
            ) from None
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(
                f"mask_ratio_range must satisfy 0 <= lo <= hi <= 1, got {mask_ratio_range!r}"
            )
        if not (0.0 <= float(mask_probability) <= 1.0):
            raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability!r}")
        if int(n_global) != n_global or n_global < 1:
            raise ValueError(f"n_global must be a positive int, got {n_global!r}")
        if mask_generator is not None and not hasattr(mask_generator, "num_patches"):
            raise ValueError("mask_generator must have a num_patches attribute")
        if generator is not None and not isinstance(generator, np.random.Generator):
            raise ValueError(
                f"generator must be a numpy.random.Generator, got {type(generator).__name__}"
            )
        self.mask_generator = mask_generator
        self.mask_ratio_range = (lo, hi)
        self.mask_probability = float(mask_probability)
        self.n_global = int(n_global)
        self.seed = seed
        self._fixed_rng = generator
        self._rng: Optional[np.random.Generator] = None
        self._rng_owner: Optional[Tuple[int, int]] = None  # (worker id, worker seed) or None

    # ------------------------------------------------------------------ rng
    def _get_rng(self) -> np.random.Generator:
        if self._fixed_rng is not None:
            return self._fixed_rng
        info = torch.utils.data.get_worker_info()
        owner = None if info is None else (int(info.id), int(info.seed))
        if self._rng is None or owner != self._rng_owner:
            if owner is None:
                entropy = self.seed if self.seed is not None else seed_from_torch()
            else:
                entropy = [0 if self.seed is None else int(self.seed), owner[1] % 2**63]
            self._rng = np.random.default_rng(entropy)
            self._rng_owner = owner
        return self._rng

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mask_generator={self.mask_generator!r}, "
            f"mask_ratio_range={self.mask_ratio_range}, mask_probability={self.mask_probability}, "
            f"n_global={self.n_global}, seed={self.seed})"
        )

    def batch_rng(self, sample_seeds: Sequence[int]) -> np.random.Generator:
        """The masks' generator for a batch whose samples carry seeds (the training sampler's):
        a function of the collator's seed and the batch's sample seeds only, so a batch gets the
        same masks in any worker, after a resume, and on whichever process draws it."""
        return np.random.default_rng([0 if self.seed is None else int(self.seed), *sample_seeds])

    def num_masked_crops(self, n_crops: int) -> int:
        """``floor(mask_probability * n_crops)`` (a 1e-9 slack absorbs float error, 0.29*100)."""
        return int(math.floor(self.mask_probability * n_crops + 1e-9))

    # ------------------------------------------------------------------ masks
    def make_masks(self, n_crops: int, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        """``(n_crops, N)`` bool masks: stratified targets for the masked crops, then shuffled."""
        rng = self._get_rng() if rng is None else rng
        gen = self.mask_generator
        if gen is None:
            return torch.zeros(n_crops, 0, dtype=torch.bool)
        n_patches = int(gen.num_patches)
        masks = torch.zeros(n_crops, n_patches, dtype=torch.bool)
        n_masked = self.num_masked_crops(n_crops)
        targets = stratified_mask_targets(n_masked, n_patches, self.mask_ratio_range, rng)
        for i, target in enumerate(targets):
            m = torch.as_tensor(np.asarray(gen(target, rng=rng)), dtype=torch.bool)
            if m.numel() != n_patches:
                raise ValueError(
                    f"mask generator returned {m.numel()} entries, expected num_patches={n_patches}"
                )
            masks[i] = m.reshape(-1)
        perm = torch.from_numpy(rng.permutation(n_crops))
        return masks[perm]

    # ------------------------------------------------------------------ collate
    @staticmethod
    def _stack_crop_major(per_sample: List[List[torch.Tensor]], kind: str) -> torch.Tensor:
        n_views = len(per_sample[0])
        shape = tuple(per_sample[0][0].shape)
        for i, crops in enumerate(per_sample):
            for j, c in enumerate(crops):
                if tuple(c.shape) != shape:
                    raise ValueError(
                        f"{kind} crop {j} of sample {i} has shape {tuple(c.shape)}, "
                        f"expected {shape} like {kind} crop 0 of sample 0"
                    )
        # view-major: [view0 of every image, view1 of every image, ...]
        return torch.stack([per_sample[i][v] for v in range(n_views) for i in range(len(per_sample))])

    def __call__(self, samples: Sequence[Any]) -> Dict[str, torch.Tensor]:
        if len(samples) == 0:
            raise ValueError("cannot collate an empty batch")
        crops_per_sample: List[List[torch.Tensor]] = []
        pending: List[PendingCrops] = []
        labels: List[int] = []
        seeds: List[int] = []
        for i, sample in enumerate(samples):
            if isinstance(sample, (tuple, list)) and len(sample) == 2:
                crops, label = sample
            elif isinstance(sample, (tuple, list)) and len(sample) == 3:
                crops, label, sample_seed = sample
                seeds.append(int(sample_seed))
            else:
                raise ValueError(f"sample {i} must be a pair (crops, label) or a triple (crops, label, seed), "
                                 f"got {type(sample).__name__}")
            if isinstance(crops, PendingCrops):
                pending.append(crops)
                crops = crops.crops
            crops = list(crops)
            crops_per_sample.append(crops)
            labels.append(_label_to_int(label))
        n_crops = len(crops_per_sample[0])
        for i, crops in enumerate(crops_per_sample):
            if len(crops) != n_crops:
                raise ValueError(
                    f"sample {i} has {len(crops)} crops, sample 0 has {n_crops}: every sample "
                    "needs the same number of crops"
                )
        if n_crops < self.n_global:
            raise ValueError(f"samples have {n_crops} crops, fewer than n_global={self.n_global}")
        B = len(samples)
        g = self.n_global
        if pending:
            crops_per_sample = _same_channel_count(crops_per_sample, len(pending), B)
        global_crops = self._stack_crop_major([c[:g] for c in crops_per_sample], "global")
        if n_crops > g:
            local_crops = self._stack_crop_major([c[g:] for c in crops_per_sample], "local")
        else:
            local_crops = global_crops.new_empty((0, global_crops.shape[1], 0, 0))

        if seeds and len(seeds) != B:
            raise ValueError(f"{len(seeds)} of the {B} samples carry a seed: give one to every sample or to none")
        masks = self.make_masks(g * B, rng=self.batch_rng(seeds) if seeds else None)
        batch = {
            "global_crops": global_crops,
            "local_crops": local_crops,
            "labels": torch.tensor(labels, dtype=torch.long),
            **mask_fields(masks),
        }
        if pending:  # augmentation finished in the training process (transforms.deferred)
            batch["global_params"] = CropParamsBatch([pending[i].params[v] for v in range(g) for i in range(B)])
            batch["local_params"] = CropParamsBatch(
                [pending[i].params[v] for v in range(g, n_crops) for i in range(B)])
            batch["crop_channels"] = max(p.out_channels for p in pending)
            # plain bools, not a tensor: reading them on the device would synchronise every step
            batch["gray_images"] = tuple(p.crops[0].shape[0] == 1 for p in pending)
        return batch


def _same_channel_count(crops_per_sample: List[List[torch.Tensor]], n_pending: int, batch: int):
    """Pending (uint8) crops of gray images have one channel, of colour images three: a batch
    holding both carries the gray ones replicated to three channels (``finish_batch`` augments
    them on their first channel, as the workers would)."""
    if n_pending != batch:
        raise ValueError(f"{n_pending} of the {batch} samples carry pending crops: all or none must")
    channels = {c.shape[0] for crops in crops_per_sample for c in crops}
    if len(channels) == 1:
        return crops_per_sample
    return [[c.expand(3, *c.shape[1:]) if c.shape[0] == 1 else c for c in crops] for crops in crops_per_sample]
