"""Multi-head self-attention on ``scaled_dot_product_attention``, with optional 2-D RoPE."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_vit.models.layers import scaled_linear
from ssl_vit.models.packing import PackedLayout
from ssl_vit.models.pos_embed import apply_rope

RopeTables = tuple[torch.Tensor, torch.Tensor] | None
# "sdpa": torch's scaled_dot_product_attention (its flash / memory-efficient kernels);
# "explicit": softmax(q k^T) v as three plain operations; "auto": sdpa, except for bf16 / fp16
# on the CPU, where benchmarks/attention.py measured the explicit path 2-6x faster fwd+bwd (in fp32
# the CPU's SDPA was 10-20% faster; docs/benchmarks.md).
ATTENTION_KERNELS = ("auto", "sdpa", "explicit")


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.kernel = "auto"  # a speed choice, not architecture: VisionTransformer.set_attention_kernel

    def use_explicit(self, q: torch.Tensor) -> bool:
        if self.kernel == "auto":
            return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
        return self.kernel == "explicit"

    def split_heads(self, qkv: torch.Tensor, batch: int, tokens: int) -> tuple[torch.Tensor, ...]:
        """q, k, v as (B, heads, T, head_dim) views of the (B, T, 3 * D) projection (channels
        ordered [q | k | v], each head-major, as in timm and DINOv2). Split along the channels
        rather than unbound from a (3, B, heads, T, head_dim) permutation: the same views, but the
        backward gathers the three gradients with one concatenation instead of a stack and a copy."""
        qkv = qkv.reshape(batch, tokens, 3 * self.num_heads * self.head_dim)
        return tuple(t.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))

    def attend(self, qkv: torch.Tensor, batch: int, tokens: int, rope: RopeTables) -> torch.Tensor:
        """Attention of one group of equally sized sequences; returns (B, T, D) before ``proj``."""
        q, k, v = self.split_heads(qkv, batch, tokens)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.softmax_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, -1)

    def softmax_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(head_dim)) v on (B, heads, T, head_dim), by the chosen kernel."""
        if self.use_explicit(q):
            # In bf16 on the CPU, plain softmax(q k^T) v runs forward+backward 2-6x faster than
            # torch's CPU flash kernel at ViT sequence lengths (benchmarks/attention.py).
            return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return F.scaled_dot_product_attention(q, k, v)

    def forward(self, x: torch.Tensor, rope: RopeTables = None, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``out_scale`` (every ``forward*``): a LayerScale's gamma, folded into ``proj``."""
        batch, tokens, _ = x.shape
        return self.project(self.attend(self.qkv(x), batch, tokens, rope), out_scale)

    def project(self, attended: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The output projection, scaled per channel by ``out_scale`` if given (``scaled_linear``)."""
        return scaled_linear(self.proj, attended, out_scale)

    def attend_first_token(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        """The attention output (B, D), before ``proj``, of each sequence's first token ([CLS])
        only: keys and values from every token, the query from the [CLS] token alone (its rows
        of the qkv weight), so no query projection or attention row is computed for the others.
        Equal to ``attend(...)[:, 0]`` up to float rounding. The [CLS] token is a prefix token,
        which RoPE never rotates."""
        batch, tokens, dim = x.shape
        weight, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, 0], weight[:dim], None if bias is None else bias[:dim])
        kv = F.linear(x, weight[dim:], None if bias is None else bias[dim:])
        q = q.view(batch, 1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, 1, head_dim)
        k, v = (t.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2) for t in kv.chunk(2, dim=-1))
        if rope is not None:
            k = apply_rope(k, *rope)
        return self.softmax_attention(q, k, v).reshape(batch, dim)

    def forward_list(self, xs: list[torch.Tensor], ropes: list[RopeTables],
                     out_scale: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Several groups of different sequence lengths: the projections run once on all tokens."""
        return tokenwise(lambda a: self.project(a, out_scale), self.attend_list(xs, ropes))

    def attend_list(self, xs: list[torch.Tensor], ropes: list[RopeTables]) -> list[torch.Tensor]:
        """``forward_list`` before the output projection: (B, T, D) per group."""
        qkv_groups = tokenwise(self.qkv, xs)
        return [self.attend(qkv, x.shape[0], x.shape[1], rope) for qkv, x, rope in zip(qkv_groups, xs, ropes)]

    def forward_packed(self, x: torch.Tensor, layout: PackedLayout, ropes: list[RopeTables],
                       out_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Packed groups (see ``packing``): the projections run on the packed matrix, attention
        per group on views of it (block-diagonal: each sequence attends to itself)."""
        qkv_groups = layout.unpack(self.qkv(x))
        attended = [
            self.attend(qkv, batch, tokens, rope)
            for qkv, (batch, tokens), rope in zip(qkv_groups, layout.groups, ropes)
        ]
        return self.project(layout.pack(attended), out_scale)

    def attention_map(self, x: torch.Tensor, rope: RopeTables = None) -> torch.Tensor:
        """Softmax attention weights (B, heads, T, T), computed explicitly for inspection."""
        batch, tokens, _ = x.shape
        q, k, _ = self.split_heads(self.qkv(x), batch, tokens)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


# Whether tokenwise concatenates the groups: None = on CUDA devices only (see tokenwise); True or
# False force it either way (the tests run the GPU's path on the CPU this way).
CONCATENATE_GROUPS: bool | None = None


def tokenwise(fn, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Apply a per-token function to the tokens of all groups: on a GPU once on all of them
    concatenated, then split back (one large matrix product instead of one per crop size: fewer
    kernel launches); on the CPU group by group, where launches cost little and the copies of
    the concatenation do (measured on the CPU preset's DINOv2 step, 2-core Xeon: 3-9% faster)."""
    concatenate = xs[0].is_cuda if CONCATENATE_GROUPS is None else CONCATENATE_GROUPS
    if len(xs) == 1 or not concatenate:
        return [fn(x) for x in xs]
    flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
    out = fn(flat)
    sizes = [x.shape[0] * x.shape[1] for x in xs]
    return [o.reshape(x.shape[0], x.shape[1], -1) for o, x in zip(out.split(sizes), xs)]
