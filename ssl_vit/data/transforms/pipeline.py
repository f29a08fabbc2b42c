"""The multi-crop transform (the fast path) and its reference made of composed v2 transforms."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchvision.transforms import v2

from ssl_vit.data.transforms.deferred import PendingCrops
from ssl_vit.data.transforms.inputs import ToUint8Image, _PILImage, as_plain_tensor
from ssl_vit.data.transforms.kernels import MatrixGaussianBlur, augment_crops, resized_crop_uint8
from ssl_vit.data.transforms.sampling import UNIFORMS_PER_CROP, sample_crop
from ssl_vit.data.transforms.spec import (
    BLUR_P_GLOBAL_0, BLUR_P_GLOBAL_1, BLUR_P_LOCAL, IMAGENET_MEAN, IMAGENET_STD, PRESETS, SOLARIZE_P_GLOBAL_1,
    CropParams, CropSpec, Size, check_scale, check_size, check_stats, is_int,
)


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
        defer_augmentation: return each image's uint8 crops and their parameters
            (:class:`PendingCrops`) and leave the rest of the augmentation to the training
            process (``deferred.finish_batch``; ``data.batched_augmentation``).

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
        defer_augmentation: bool = False,
    ) -> None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        if not is_int(n_local) or n_local < 0:
            raise ValueError(f"n_local must be an int >= 0, got {n_local!r}")
        self.preset = preset
        self.n_local = int(n_local)
        self.global_size = check_size("global_size", global_size)
        if local_size is None and self.n_local == 0:
            self.local_size = None
        else:
            self.local_size = check_size("local_size", local_size)
        self.global_scale = check_scale(
            "global_scale", PRESETS[preset]["global_scale"] if global_scale is None else global_scale
        )
        self.local_scale = check_scale(
            "local_scale", PRESETS[preset]["local_scale"] if local_scale is None else local_scale
        )
        self.mean = check_stats("mean", mean, positive=False)
        self.std = check_stats("std", std, positive=True)
        if not isinstance(grayscale_to_rgb, bool):
            raise ValueError(f"grayscale_to_rgb must be a bool, got {grayscale_to_rgb!r}")
        self.grayscale_to_rgb = grayscale_to_rgb
        self.defer_augmentation = bool(defer_augmentation)

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
            spec.size: MatrixGaussianBlur(spec.blur_kernel_size)
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
        u = torch.rand(self.n_crops, UNIFORMS_PER_CROP, dtype=torch.float64).tolist()
        return [sample_crop(spec, row, height, width) for spec, row in zip(self.crop_specs, u)]

    def _apply(self, img: torch.Tensor, params: List[CropParams], out_channels: int) -> List[torch.Tensor]:
        """Augment uint8 ``img`` (C, H, W) with the given per-crop parameters."""
        groups = [(self.global_size, params[:2], self.crop_specs[:2])]
        if self.n_local:
            groups.append((self.local_size, params[2:], self.crop_specs[2:]))
        crops: List[torch.Tensor] = []
        img = img.unsqueeze(0)
        for size, group, specs in groups:
            out_size = list(size)
            x = torch.cat([resized_crop_uint8(img, p, out_size) for p in group]).to(torch.float32)
            x = self.augment_group(x, group, specs)
            crops.extend(self.normalize(x, out_channels).unbind(0))
        return crops

    def augment_group(self, x: torch.Tensor, params: List[CropParams], specs: List[CropSpec]) -> torch.Tensor:
        """Flip, colour, blur and solarise same-size crops (float32 holding uint8 values): one
        image's, or a whole batch's (``deferred.finish_batch``)."""
        return augment_crops(x, params, specs, self._blur[specs[0].size])

    def normalize(self, x: torch.Tensor, out_channels: int) -> torch.Tensor:
        """ToDtype(float32, scale=True) + Normalize, fused as ``x * scale + shift``; replicates a
        1-channel batch to ``out_channels``."""
        scale, shift = (t.to(x.device) for t in self._norm[out_channels])
        return torch.addcmul(shift, x, scale)

    def __call__(self, image: Any) -> List[torch.Tensor]:
        img, in_channels = self._load(image)
        out_channels = 3 if (self.grayscale_to_rgb or in_channels == 3) else 1
        params = self._sample_params(img.shape[-2], img.shape[-1])
        if self.defer_augmentation:
            sizes = [list(spec.size) for spec in self.crop_specs]
            crops = [resized_crop_uint8(img.unsqueeze(0), p, size)[0] for p, size in zip(params, sizes)]
            return PendingCrops(crops, params, out_channels)
        return self._apply(img, params, out_channels)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(preset={self.preset!r}, global_size={self.global_size}, "
            f"local_size={self.local_size}, n_local={self.n_local}, "
            f"global_scale={self.global_scale}, local_scale={self.local_scale}, "
            f"mean={self.mean}, std={self.std}, grayscale_to_rgb={self.grayscale_to_rgb}, "
            f"defer_augmentation={self.defer_augmentation})"
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
        crops = [as_plain_tensor(t.global_transform_0(img)), as_plain_tensor(t.global_transform_1(img))]
        if t.local_transform is not None:
            crops += [as_plain_tensor(t.local_transform(img)) for _ in range(t.n_local)]
        return crops

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"
