"""Pre-LN transformer block: x + DropPath(LS(Attn(LN(x)))), then x + DropPath(LS(FFN(LN(x)))),
with each LayerScale folded into its branch's output projection (``layers.scaled_linear``).

Drop path follows ``drop_path_law`` (``stochastic_depth``): per-sample Bernoulli masks on the
branch computed for every sample, or DINOv2's fixed-size subsets with the branch computed on the
kept samples only."""
from __future__ import annotations

import torch
from torch import nn

from ssl_vit.models.attention import Attention, RopeTables, tokenwise
from ssl_vit.models.layers import DropPath, LayerScale, Mlp, SwiGLU, swiglu_hidden_dim
from ssl_vit.models.packing import PackedLayout, drop_path_packed
from ssl_vit.models.stochastic_depth import add_residuals_on_subsets
from ssl_vit.models.token_selection import SelectedRows, drop_path_rows

FFN_LAYERS = ("mlp", "swiglu")


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_layer: str = "mlp",
        init_values: float | None = None,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        if ffn_layer == "mlp":
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
        elif ffn_layer == "swiglu":
            self.mlp = SwiGLU(dim, swiglu_hidden_dim(dim, mlp_ratio))
        else:
            raise ValueError(f"ffn_layer must be one of {FFN_LAYERS}, got {ffn_layer!r}")
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)
        self.drop_path_law = "bernoulli"  # VisionTransformer.set_drop_path_law: the method's choice

    def layer_scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The gammas of ``ls1`` / ``ls2`` (None without LayerScale), folded into the branches'
        output projections (``layers.scaled_linear``) rather than applied to their outputs."""
        return tuple(ls.gamma if isinstance(ls, LayerScale) else None for ls in (self.ls1, self.ls2))

    def drops_subsets(self) -> bool:
        """Drop path by the subset law now (training, a non-zero rate): branches on kept samples only."""
        return self.training and self.drop_path_law == "subset" and self.drop_path1.drop_prob > 0.0

    def forward(self, x: torch.Tensor, rope: RopeTables = None) -> torch.Tensor:
        if self.drops_subsets():
            return self.forward_list([x], [rope])[0]
        gamma1, gamma2 = self.layer_scales()
        x = x + self.drop_path1(self.attn(self.norm1(x), rope, gamma1))
        x = x + self.drop_path2(self.mlp(self.norm2(x), gamma2))
        return x

    def forward_list(self, xs: list[torch.Tensor], ropes: list[RopeTables]) -> list[torch.Tensor]:
        """The same computation for groups of different lengths (multi-crop), batching the
        per-token layers across groups; drop path stays per sample within each group."""
        gamma1, gamma2 = self.layer_scales()
        if self.drops_subsets():
            xs = add_residuals_on_subsets(xs, self.drop_path1.drop_prob, lambda kept: self.attn.forward_list(
                tokenwise(self.norm1, kept), ropes, gamma1))
            return add_residuals_on_subsets(xs, self.drop_path2.drop_prob, lambda kept: tokenwise(
                lambda t: self.mlp(self.norm2(t), gamma2), kept))
        attended = self.attn.forward_list(tokenwise(self.norm1, xs), ropes, gamma1)
        xs = [x + self.drop_path1(a) for x, a in zip(xs, attended)]
        fed = tokenwise(lambda t: self.mlp(self.norm2(t), gamma2), xs)
        return [x + self.drop_path2(f) for x, f in zip(xs, fed)]

    def forward_packed(self, x: torch.Tensor, layout: PackedLayout, ropes: list[RopeTables]) -> torch.Tensor:
        """The same computation on packed groups (``packing``): per-token layers once on the
        packed (tokens, width) matrix, attention per group, drop path per sequence."""
        gamma1, gamma2 = self.layer_scales()
        attended = self.attn.forward_packed(self.norm1(x), layout, ropes, gamma1)
        law = self.drop_path_law
        x = x + drop_path_packed(attended, layout, self.drop_path1.drop_prob, self.training, law)
        fed = self.mlp(self.norm2(x), gamma2)
        return x + drop_path_packed(fed, layout, self.drop_path2.drop_prob, self.training, law)

    def forward_selected(self, xs: list[torch.Tensor], ropes: list[RopeTables],
                         selections: list[SelectedRows]) -> torch.Tensor:
        """The same computation for the selected rows of each group only (``token_selection``),
        returned concatenated in group order: attention reads every token as key and value (and
        computes the [CLS] query alone where only [CLS] rows are selected), the layers after it
        run on the selected rows."""
        normed = tokenwise(self.norm1, xs)
        attended = torch.cat([
            self.attn.attend_first_token(n, rope) if s.first_tokens_only
            else s.take(self.attn.attend(self.attn.qkv(n), n.shape[0], n.shape[1], rope))
            for n, rope, s in zip(normed, ropes, selections)])
        x = torch.cat([s.take(x) for s, x in zip(selections, xs)])
        law = self.drop_path_law
        gamma1, gamma2 = self.layer_scales()
        x = x + drop_path_rows(self.attn.project(attended, gamma1), selections, self.drop_path1.drop_prob,
                               self.training, law)
        fed = self.mlp(self.norm2(x), gamma2)
        return x + drop_path_rows(fed, selections, self.drop_path2.drop_prob, self.training, law)
