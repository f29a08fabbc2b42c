"""Batched augmentation in the training process (``data.batched_augmentation``).

With the option on, the data workers only cut and resize each image's crops (uint8) and draw
every random parameter of the augmentation, as they always do; the colour jitter, grayscale,
blur, solarisation and normalisation then run once per batch in the training process, after
the batch reached the training device (the accelerator, where there is one), on all images'
crops of one size at once. The parameters are the same draws (same seeds), and the batched
kernels compute per crop exactly what they compute on one image's crops, so on the CPU the
batches are bit-identical to the workers' (tests/data/test_batched_augmentation.py).

What travels: a sample is ``PendingCrops`` (uint8 crops and their parameters) instead of float
crops; the collator stacks the uint8 crops as usual and adds ``global_params`` / ``local_params``
(``CropParamsBatch``, in the batch's crop-major order) and ``crop_channels``; the data module's
``on_after_batch_transfer`` calls :func:`finish_batch`. uint8 batches are also a quarter of the
size on their way to the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from ssl_vit.data.transforms.spec import CropParams


@dataclass
class PendingCrops:
    """One image's crops before augmentation: uint8 (C, h, w) tensors, their parameters, and
    the number of channels the finished crops have (3 for a gray image made RGB)."""

    crops: List[torch.Tensor]
    params: List[CropParams]
    out_channels: int


class CropParamsBatch:
    """The parameters of a batch's crops of one size, crop-major. An opaque holder: batch
    transfer utilities (pin_memory, Lightning's device move) pass it through untouched."""

    __slots__ = ("params",)

    def __init__(self, params: List[CropParams]) -> None:
        self.params = params

    def __len__(self) -> int:
        return len(self.params)


def is_pending(batch) -> bool:
    return isinstance(batch, dict) and "global_params" in batch


def finish_batch(transform, batch: Dict) -> Dict:
    """Augment and normalise a collated batch of pending crops on its device (``transform`` is
    the ``MultiCropTransform`` that cut them); returns the batch with float crops, as the
    workers would have made it."""
    out = dict(batch)
    channels = int(out.pop("crop_channels"))
    gray_images = out.pop("gray_images")
    groups = [("global_crops", "global_params", transform.crop_specs[: transform.n_global])]
    if transform.n_local:
        groups.append(("local_crops", "local_params", [transform.local_spec] * transform.n_local))
    for crops_key, params_key, specs in groups:
        params = out.pop(params_key).params
        crop_major_specs = [spec for spec in specs for _ in range(len(gray_images))]
        gray = list(gray_images) * len(specs)  # crop-major, like the crops
        x = out[crops_key].to(torch.float32)
        if all(gray) or not any(gray):
            out[crops_key] = transform.normalize(transform.augment_group(x, params, crop_major_specs), channels)
            continue
        # A batch of gray and colour images: gray crops on their one channel, as in the workers.
        finished = x.new_empty((x.shape[0], channels, *x.shape[2:]))
        for is_gray in (True, False):
            rows = [i for i, g in enumerate(gray) if g == is_gray]
            part = x[rows, :1] if is_gray else x[rows]
            part = transform.augment_group(part, [params[i] for i in rows], [crop_major_specs[i] for i in rows])
            finished[rows] = transform.normalize(part, channels)
        out[crops_key] = finished
    out.pop("local_params", None)  # present, empty, when there are no local crops
    return out
