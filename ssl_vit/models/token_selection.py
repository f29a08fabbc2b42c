"""The last block on the tokens a loss reads, and only those.

The self-distillation losses read few of the last block's outputs: DINO reads the [CLS] token
of every crop; DINOv2 adds, for the global crops, the patch tokens at the masked positions
(iBOT). The last block's attention still needs every token as key and value, but its
per-token layers after attention (output projection, residuals, second norm, MLP) and the
final norm produce outputs that no loss reads for all the other tokens. With
``VisionTransformer.set_last_block_pruning`` they run on the selected rows only: at the CPU
preset (depth 6, 2 x 37 + 6 x 10 tokens per image) that is about a tenth of the step's matrix
work, with unchanged results up to float summation order (the selected rows are computed by
the same operations on the same inputs). Where only the [CLS] rows are selected (DINO's crops,
DINOv2's local crops, a backbone's [CLS] embedding), the attention itself computes the [CLS]
query alone (``Attention.attend_first_token``).

Drop path draws its per-sample masks exactly as ``DropPath`` does on the whole groups (one
(B, 1, 1) draw per group and branch, in the same order), so one random state drops the same
samples with or without pruning.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ssl_vit.models.stochastic_depth import apply_branch_factors, branch_factors


@dataclass(frozen=True)
class SelectedRows:
    """Which rows of one group's flattened (B * T, D) token matrix the last block computes:
    the [CLS] row of every sequence, then the wanted patch tokens in row-major order."""

    rows: torch.Tensor  # (B + M,) indices into the flattened (B * T) tokens
    samples: torch.Tensor  # (B + M,) the sequence each row belongs to
    batch: int  # sequences in the group (the first ``batch`` rows are their [CLS] tokens)

    @classmethod
    def of(cls, batch: int, tokens: int, prefix: int, patches: torch.Tensor | None,
           device: torch.device) -> "SelectedRows":
        """``patches``: (B, N) bool, True = this patch token's output is wanted, or the (M,)
        flat indices of the wanted patches in the (B * N) patch tokens, row-major (as
        ``mask.reshape(-1).nonzero()``: DINOv2's collate computes them on the host), or None:
        none; ``prefix``: the tokens before the patches ([CLS] and registers). A bool mask
        costs a host synchronisation on an accelerator (its number of True entries sizes the
        output); indices cost none."""
        cls_samples = torch.arange(batch, device=device)
        if patches is None:
            return cls(cls_samples * tokens, cls_samples, batch)
        if patches.dtype == torch.bool:
            patch_samples, patch_index = patches.nonzero(as_tuple=True)  # row-major, as boolean indexing
        else:
            num_patches = tokens - prefix
            patch_samples = torch.div(patches, num_patches, rounding_mode="floor")
            patch_index = patches - patch_samples * num_patches
        samples = torch.cat([cls_samples, patch_samples])
        rows = samples * tokens + torch.cat([torch.zeros_like(cls_samples), prefix + patch_index])
        return cls(rows, samples, batch)

    @property
    def first_tokens_only(self) -> bool:
        """Only the [CLS] row of every sequence is selected."""
        return self.rows.shape[0] == self.batch

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The selected rows (B + M, D) of a group's (B, T, D) tokens."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.rows)


def drop_path_rows(x: torch.Tensor, selections: list[SelectedRows], drop_prob: float,
                   training: bool, law: str = "bernoulli") -> torch.Tensor:
    """Stochastic depth on the concatenated selected rows of several groups: a sequence's rows
    are kept or dropped together, with masks drawn per group as ``DropPath`` draws them (or,
    ``law="subset"``, subsets drawn as ``stochastic_depth.kept_subset`` draws them)."""
    if drop_prob == 0.0 or not training:
        return x
    draws = [branch_factors(s.batch, drop_prob, law, x) for s in selections]
    per_row = torch.cat([factors.index_select(0, s.samples) for (factors, _), s in zip(draws, selections)])
    return apply_branch_factors(x, per_row.unsqueeze(-1), draws[0][1])
