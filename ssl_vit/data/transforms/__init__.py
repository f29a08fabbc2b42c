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

Layout: ``spec`` (parameters, presets, :class:`CropSpec`), ``sampling`` (random draws),
``kernels`` (batched uint8-exact operations), ``inputs`` (image conversion), ``pipeline``
(:class:`MultiCropTransform`, :class:`ReferenceMultiCrop`), ``eval_transform``
(:class:`EvalTransform`).
"""
from ssl_vit.data.transforms.eval_transform import EvalTransform
from ssl_vit.data.transforms.inputs import ToUint8Image
from ssl_vit.data.transforms.pipeline import MultiCropTransform, ReferenceMultiCrop
from ssl_vit.data.transforms.spec import (
    BLUR_P_GLOBAL_0, BLUR_P_GLOBAL_1, BLUR_P_LOCAL, BLUR_SIGMA, BRIGHTNESS, COLOR_JITTER, COLOR_JITTER_P, CONTRAST,
    CROP_RATIO, FLIP_P, GRAYSCALE_P, HUE, IMAGENET_MEAN, IMAGENET_STD, PRESETS, SATURATION, SOLARIZE_P_GLOBAL_1,
    SOLARIZE_THRESHOLD_UINT8, CropParams, CropSpec, blur_kernel_size,
)

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
    # the papers' parameters (spec.py)
    "BLUR_P_GLOBAL_0", "BLUR_P_GLOBAL_1", "BLUR_P_LOCAL", "BLUR_SIGMA", "COLOR_JITTER", "COLOR_JITTER_P",
    "CROP_RATIO", "FLIP_P", "GRAYSCALE_P", "SOLARIZE_P_GLOBAL_1", "SOLARIZE_THRESHOLD_UINT8",
    "BRIGHTNESS", "CONTRAST", "SATURATION", "HUE",
]
