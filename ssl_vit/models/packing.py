"""Packed multi-crop sequences: the crops of every size as one flat run of tokens.

Multi-crop training feeds the backbone groups of crops of different sizes (two global crops of
37 tokens, six local ones of 10, ...). Unpacked, each block runs its per-token layers (norms,
qkv, projection, MLP) once per group. Packed, the residual stream of all groups is one
(tokens, width) matrix for the whole forward pass: the per-token layers run once on it as one
large matrix product, and only attention looks at the groups, through views of the packed
matrix (block-diagonal attention: every sequence attends to itself only). No copies are made
to gather or scatter the groups except the attention output of each block.

The result equals the unpacked forward up to float summation order, drop path included: the
per-sample drop masks are drawn group by group in the unpacked order, so one random state
gives the same masks either way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ssl_vit.models.stochastic_depth import apply_branch_factors, branch_factors


@dataclass(frozen=True)
class PackedLayout:
    """Where each group of equally long sequences sits in the packed token matrix."""

    groups: tuple[tuple[int, int], ...]  # (sequences, tokens per sequence), in order

    @classmethod
    def of(cls, xs: list[torch.Tensor]) -> "PackedLayout":
        return cls(tuple((x.shape[0], x.shape[1]) for x in xs))

    @property
    def sizes(self) -> list[int]:
        """Rows of the packed matrix per group."""
        return [batch * tokens for batch, tokens in self.groups]

    def pack(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """(B_i, T_i, D) groups -> one (sum B_i T_i, D) matrix."""
        return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])

    def unpack(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of ``pack``: views (B_i, T_i, D) of the packed matrix, without copies."""
        return [
            part.view(batch, tokens, -1)
            for part, (batch, tokens) in zip(packed.split(self.sizes), self.groups)
        ]

    def per_token(self, per_sequence: list[torch.Tensor]) -> torch.Tensor:
        """Per-sequence values (one (B_i, ...) tensor per group) repeated over each sequence's
        tokens, as a (sum B_i T_i, ...) tensor aligned with the packed matrix."""
        return torch.cat([
            values.repeat_interleave(tokens, dim=0) for values, (_, tokens) in zip(per_sequence, self.groups)
        ])


def drop_path_packed(x: torch.Tensor, layout: PackedLayout, drop_prob: float, training: bool,
                     law: str = "bernoulli") -> torch.Tensor:
    """Stochastic depth on a packed residual branch: each sequence's tokens are kept or dropped
    together. Masks are drawn per group with the shapes ``DropPath`` uses on the unpacked groups,
    in the same order, so the same random state drops the same samples (``law="subset"``: the
    subsets of ``stochastic_depth.kept_subset``, likewise per group in order)."""
    if drop_prob == 0.0 or not training:
        return x
    draws = [branch_factors(batch, drop_prob, law, x) for batch, _ in layout.groups]
    return apply_branch_factors(x, layout.per_token([factors.view(-1, 1) for factors, _ in draws]), draws[0][1])
