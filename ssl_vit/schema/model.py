"""The backbone (``conf/model/``): the arguments of ``VisionTransformer`` plus its name and
optional initial weights."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from ssl_vit.models.attention import ATTENTION_KERNELS
from ssl_vit.models.stochastic_depth import DROP_PATH_LAWS
from ssl_vit.models.vision_transformer import FFN_LAYERS, POS_EMBEDS
from ssl_vit.schema.fields import int_at_least, number_at_least, number_in, one_of, rule, setting


@dataclass
class ModelConfig:
    name: str = setting(MISSING, "the preset's name (vit_tiny ... vit_giant, vit_cpu)")
    img_size: int = setting(224, "the resolution the position table is built for (others interpolate)",
                            **rule(int_at_least(1)))
    patch_size: int = setting(16, "patch side in pixels", **rule(int_at_least(1)))
    embed_dim: int = setting(768, "token width (a multiple of num_heads)", **rule(int_at_least(1)))
    depth: int = setting(12, "transformer blocks", **rule(int_at_least(1)))
    num_heads: int = setting(12, "attention heads", **rule(int_at_least(1)))
    mlp_ratio: float = setting(4.0, "MLP hidden width / embed_dim", **rule(number_at_least(0, inclusive=False)))
    qkv_bias: bool = setting(True, "bias in the qkv projection")
    ffn_layer: str = setting("mlp", "mlp | swiglu", **rule(one_of(FFN_LAYERS)))
    init_values: Optional[float] = setting(None, "LayerScale's initial value (null: no LayerScale)",
                                           **rule(number_at_least(0, inclusive=False)))
    drop_path_rate: float = setting(0.0, "stochastic depth of the student", **rule(number_in(0, 1, high_open=True)))
    drop_path_uniform: bool = setting(False, "the same rate in every block (else linear in depth)")
    drop_path_law: str = setting("auto", "auto (the method's official law: subset for DINOv2 and distillation, "
                                 "bernoulli for DINO and MAE) | bernoulli (per-sample masks) | subset (a random "
                                 "subset of B(1-rate) samples gets each branch, computed on those only; "
                                 "ssl_vit/models/stochastic_depth.py)", **rule(one_of(("auto",) + DROP_PATH_LAWS)))
    num_register_tokens: int = setting(0, "register tokens", **rule(int_at_least(0)))
    pos_embed: str = setting("learned", "learned | sincos | rope", **rule(one_of(POS_EMBEDS)))
    rope_theta: float = setting(100.0, "2-D RoPE base period", **rule(number_at_least(0, inclusive=False)))
    interpolate_offset: float = setting(0.0, "position interpolation offset (DINOv2's 0.1 for its weights)",
                                        **rule(number_at_least(0)))
    interpolate_antialias: bool = setting(False, "antialiased position interpolation")
    norm_eps: float = setting(1e-6, "LayerNorm epsilon", **rule(number_at_least(0, inclusive=False)))
    init: Optional[str] = setting(None, "start from these backbone weights (a checkpoint or an export)")
    activation_checkpointing: bool = setting(False, "recompute each block's activations in the backward pass "
                                             "(less memory, about a third more compute)")
    compile: bool = setting(False, "torch.compile each transformer block (compiles for a minute or more at the "
                            "start; on the CPU it needs a C++ compiler)")
    attention: str = setting("auto", "attention kernel: auto (sdpa; explicit for bf16 on the CPU) | sdpa | explicit "
                             "(softmax(qk^T)v); same results, speed by machine (benchmarks/attention.py)",
                             **rule(one_of(ATTENTION_KERNELS)))
    pack_crops: bool = setting(False, "multi-crop: all crop sizes as one packed token matrix through the blocks "
                               "(block-diagonal attention); same results, speed by machine "
                               "(benchmarks/packing.py)")
    prune_last_block: bool = setting(True, "the last block computes only the tokens a loss reads ([CLS], iBOT's "
                                     "masked patches; ssl_vit/models/token_selection.py): same results, less work")
