"""The methods (``conf/method/``) and their optimisers (``conf/optim/``), one schema each."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from ssl_vit.data.masking import LAWS as MASK_LAWS
from ssl_vit.losses.center import CENTER_REDUCTIONS
from ssl_vit.methods.teacher_targets import CENTERINGS
from ssl_vit.methods.frozen_teacher import TARGETS
from ssl_vit.methods.schedules import TEACHER_TEMP_SCHEDULES
from ssl_vit.schema.fields import int_at_least, number_at_least, number_in, one_of, pair_in, rule, setting
from ssl_vit.schema.run import PicturesConfig

POSITIVE = number_at_least(0, inclusive=False)
NON_NEGATIVE = number_at_least(0)
MOMENTUM = number_in(0, 1)


@dataclass
class CropsConfig:
    global_size: int = setting(224, "side of the global crops in pixels (a multiple of the patch size)",
                               **rule(int_at_least(1)))
    local_size: Optional[int] = setting(None, "side of the local crops", **rule(int_at_least(1)))
    n_local: int = setting(0, "local crops per image", **rule(int_at_least(0)))
    global_scale: Tuple[float, float] = setting((0.32, 1.0), "RandomResizedCrop area range of the global crops",
                                                **rule(pair_in(0, 1)))
    local_scale: Optional[Tuple[float, float]] = setting(None, "area range of the local crops", **rule(pair_in(0, 1)))
    augmentation: str = setting("dinov2", "dinov2 | dino (multi-crop presets) | mae (one view)",
                                **rule(one_of(("dinov2", "dino", "mae"))))


@dataclass
class SingleViewCropsConfig:
    """MAE's one view (no local crops, so no local keys)."""

    global_size: int = setting(224, "side of the view in pixels (a multiple of the patch size)",
                               **rule(int_at_least(1)))
    global_scale: Tuple[float, float] = setting((0.2, 1.0), "RandomResizedCrop area range", **rule(pair_in(0, 1)))
    n_local: int = setting(0, "no local crops", allowed="0", ok=lambda v: v == 0)
    augmentation: str = setting("mae", "mae: random resized crop and flip", **rule(one_of(("mae",))))


@dataclass
class HeadConfig:
    out_dim: int = setting(65536, "prototypes", **rule(int_at_least(1)))
    hidden_dim: int = setting(2048, "MLP width", **rule(int_at_least(1)))
    bottleneck_dim: int = setting(256, "bottleneck width", **rule(int_at_least(1)))
    nlayers: int = setting(3, "MLP layers", **rule(int_at_least(1)))
    norm_last_layer: bool = setting(True, "freeze the weight norm's scale of the last layer")


@dataclass
class IBOTConfig:
    loss_weight: float = setting(1.0, "weight of the masked-patch loss", **rule(NON_NEGATIVE))
    mask_probability: float = setting(0.5, "share of global crops that are masked", **rule(number_in(0, 1)))
    mask_ratio: Tuple[float, float] = setting((0.1, 0.5), "range of the masked share of a crop's patches",
                                              **rule(pair_in(0, 1, low_open=False)))
    mask_law: str = setting("official", "block-mask law", **rule(one_of(MASK_LAWS)))
    separate_head: bool = setting(False, "a head of its own for the patch tokens")
    center_reduction: str = setting("process_mean", "how the patch center is averaged",
                                    **rule(one_of(CENTER_REDUCTIONS)))
    head: HeadConfig = setting(help="the patch head (with separate_head)", factory=HeadConfig)


@dataclass
class TeacherTemperatures:
    """The keys DINO, DINOv2 and distillation share (teacher temperature schedule, head freeze)."""

    student_temp: float = setting(0.1, "student softmax temperature", **rule(POSITIVE))
    center_momentum: float = setting(0.9, "EMA momentum of the center", **rule(MOMENTUM))
    teacher_temp: float = setting(0.04, "teacher temperature after the warm-up", **rule(POSITIVE))
    warmup_teacher_temp: float = setting(0.04, "teacher temperature at the start", **rule(POSITIVE))
    warmup_teacher_temp_epochs: float = setting(0.0, "linear warm-up of the teacher temperature, in epochs",
                                                **rule(NON_NEGATIVE))
    teacher_temp_schedule: str = setting("per_step", "per_step | per_epoch (DINO's code)",
                                         **rule(one_of(TEACHER_TEMP_SCHEDULES)))
    freeze_last_layer_epochs: float = setting(1.0, "lr 0 for the heads' last layer during these epochs",
                                              **rule(NON_NEGATIVE))
    koleo_loss_weight: float = setting(0.0, "KoLeo regulariser weight", **rule(NON_NEGATIVE))


@dataclass
class DINOConfig(TeacherTemperatures):
    name: str = setting("dino", "the method")
    crops: CropsConfig = setting(help="multi-crop augmentation", factory=CropsConfig)
    head: HeadConfig = setting(help="the DINO head", factory=HeadConfig)
    momentum_teacher: float = setting(0.996, "teacher EMA momentum at the start (cosine to 1)", **rule(MOMENTUM))


@dataclass
class DINOv2Config(DINOConfig):
    name: str = setting("dinov2", "the method")
    ibot: IBOTConfig = setting(help="masked-patch (iBOT) loss", factory=IBOTConfig)
    dino_loss_weight: float = setting(1.0, "weight of the [CLS] loss", **rule(NON_NEGATIVE))
    centering: str = setting("centering", "centering | sinkhorn_knopp", **rule(one_of(CENTERINGS)))


@dataclass
class TeacherLoadKwargs:
    num_heads: Optional[int] = setting(None, "heads of a file that does not say", **rule(int_at_least(1)))
    patch_size: Optional[int] = setting(None, "patch size of a file that does not say", **rule(int_at_least(1)))
    interpolate_offset: Optional[float] = setting(None, "position interpolation offset", **rule(NON_NEGATIVE))
    interpolate_antialias: Optional[bool] = setting(None, "antialiased position interpolation")


@dataclass
class TeacherConfig:
    checkpoint: Optional[str] = setting(None, "the teacher: a DINO / DINOv2 / distill checkpoint, an export or "
                                        "outside weights (required)")
    target: str = setting("auto", "heads | features | auto (heads when the file has them)",
                          **rule(one_of(TARGETS)))
    load_kwargs: TeacherLoadKwargs = setting(help="load_backbone's keywords for a headless file",
                                             factory=TeacherLoadKwargs)


@dataclass
class FeatureLossConfig:
    cls_weight: float = setting(1.0, "1 - cosine on [CLS]", **rule(NON_NEGATIVE))
    patch_weight: float = setting(1.0, "1 - cosine on the patch tokens", **rule(NON_NEGATIVE))


@dataclass
class DistillConfig(TeacherTemperatures):
    name: str = setting("distill", "the method")
    teacher: TeacherConfig = setting(help="the frozen teacher", factory=TeacherConfig)
    crops: CropsConfig = setting(help="multi-crop augmentation", factory=CropsConfig)
    centering: str = setting("sinkhorn_knopp", "targets from the teacher's heads", **rule(one_of(CENTERINGS)))
    dino_loss_weight: float = setting(1.0, "weight of the [CLS] loss", **rule(NON_NEGATIVE))
    ibot_loss_weight: float = setting(1.0, "weight of the patch loss (every patch token)", **rule(NON_NEGATIVE))
    feature_loss: FeatureLossConfig = setting(help="target=features", factory=FeatureLossConfig)
    ema_momentum: float = setting(0.992, "momentum of the EMA student (the final model)", **rule(MOMENTUM))


@dataclass
class DecoderConfig:
    embed_dim: int = setting(512, "decoder width (a multiple of num_heads)", **rule(int_at_least(1)))
    depth: int = setting(8, "decoder blocks", **rule(int_at_least(1)))
    num_heads: int = setting(16, "decoder heads", **rule(int_at_least(1)))
    mlp_ratio: float = setting(4.0, "decoder MLP ratio", **rule(POSITIVE))


@dataclass
class MAEConfig:
    name: str = setting("mae", "the method")
    crops: SingleViewCropsConfig = setting(help="one view: random resized crop and flip",
                                           factory=SingleViewCropsConfig)
    mask_ratio: float = setting(0.75, "share of patches removed per image", **rule(number_in(0, 1, True, True)))
    norm_pix_loss: bool = setting(False, "targets normalised per patch")
    decoder: DecoderConfig = setting(help="the light decoder", factory=DecoderConfig)
    pictures: PicturesConfig = setting(help="original / masked / reconstruction pictures",
                                       factory=lambda: PicturesConfig(every_n_steps=100))


LR_SCALINGS = ("linear", "sqrt", "none")
ADAMW_IMPLEMENTATIONS = ("fused", "foreach", "for_loop")


@dataclass
class AdamWConfig:
    """MAE's optimisation: AdamW, warm-up then half-cycle cosine."""

    lr: float = setting(1.5e-4, "base lr, scaled by lr_scaling with the global batch size", **rule(POSITIVE))
    lr_scaling: str = setting("linear", "linear (x batch / 256) | sqrt (x sqrt(batch / 1024)) | none",
                              **rule(one_of(LR_SCALINGS)))
    min_lr: float = setting(0.0, "lr at the end", **rule(NON_NEGATIVE))
    warmup_epochs: float = setting(40.0, "linear warm-up, in epochs", **rule(NON_NEGATIVE))
    weight_decay: float = setting(0.05, "weight decay", **rule(NON_NEGATIVE))
    betas: Tuple[float, float] = setting((0.9, 0.95), "AdamW betas", allowed="a pair [b1, b2], each in [0, 1)",
                                         ok=lambda v: len(v) == 2 and all(number_in(0, 1, high_open=True)[1](b)
                                                                          for b in v))
    implementation: str = setting("fused", "torch's AdamW kernel: fused (one kernel; 3x faster than foreach on the "
                                  "CPU, the same update up to rounding) | foreach (one op per step over all "
                                  "tensors, the same arithmetic as for_loop) | for_loop (per tensor, torch's CPU "
                                  "default)", **rule(one_of(ADAMW_IMPLEMENTATIONS)))


@dataclass
class SelfDistillationOptimConfig(AdamWConfig):
    """DINO / DINOv2 / distillation: weight decay on a cosine, clipping, layer-wise decay."""

    weight_decay_end: float = setting(0.4, "weight decay at the end (cosine)", **rule(NON_NEGATIVE))
    clip_grad: Optional[float] = setting(3.0, "global norm clipping per student module (null: none)",
                                         **rule(POSITIVE))
    layerwise_decay: Optional[float] = setting(None, "lr x decay^(depth - i) per block (null: none)",
                                               **rule(number_in(0, 1, low_open=True)))
    patch_embed_lr_mult: float = setting(1.0, "lr multiplier of the patch embedding", **rule(NON_NEGATIVE))


METHOD_SCHEMAS = {"dino": DINOConfig, "dinov2": DINOv2Config, "distill": DistillConfig, "mae": MAEConfig}
OPTIM_SCHEMAS = {"dino": SelfDistillationOptimConfig, "dinov2": SelfDistillationOptimConfig,
                 "distill": SelfDistillationOptimConfig, "mae": AdamWConfig}
