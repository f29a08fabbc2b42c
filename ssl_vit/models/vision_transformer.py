"""The one Vision Transformer backbone shared by every method.

Token layout: [CLS], register tokens, then patch tokens in row-major order. Registers get no
position embedding. Input paths:
  * ``forward_features(images, masks)``: masked patches are replaced by the mask token before
    positions are added (iBOT / DINOv2 student);
  * ``forward_features([batch_a, batch_b, ...])``: several crop sizes in one call (multi-crop);
  * ``forward_cls_and_patches(images, masks, patches)``: the [CLS] token and the patch tokens at
    ``patches`` only, what the self-distillation losses read (``forward`` uses it for the [CLS]
    embedding); with ``set_last_block_pruning`` the last block computes only these
    (``token_selection``);
  * ``forward_visible(images, ids_keep)``: encode only the given patches (MAE encoder);
  * ``last_self_attention(images)``: attention weights of the last block (visualisation).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ssl_vit.models.attention import ATTENTION_KERNELS
from ssl_vit.models.block import FFN_LAYERS, Block
from ssl_vit.models.packing import PackedLayout
from ssl_vit.models.patch_embed import PatchEmbed
from ssl_vit.models.pos_embed import Rope2D, interpolate_pos_embed, sincos_2d_table
from ssl_vit.models.stochastic_depth import DROP_PATH_LAWS
from ssl_vit.models.token_selection import SelectedRows

POS_EMBEDS = ("learned", "sincos", "rope")


class VisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_layer: str = "mlp",
        init_values: float | None = None,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        num_register_tokens: int = 0,
        pos_embed: str = "learned",
        rope_theta: float = 100.0,
        interpolate_offset: float = 0.0,
        interpolate_antialias: bool = False,
        norm_eps: float = 1e-6,
        in_chans: int = 3,
    ):
        super().__init__()
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
        if ffn_layer not in FFN_LAYERS:
            raise ValueError(f"ffn_layer must be one of {FFN_LAYERS}, got {ffn_layer!r}")
        if in_chans != 3:
            raise ValueError(f"the backbone always takes 3-channel images, got in_chans={in_chans}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        # Everything needed to rebuild this backbone: stored in checkpoints and exports.
        self.arch = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.arch["img_size"] = list(img_size) if isinstance(img_size, (tuple, list)) else img_size

        self.embed_dim = embed_dim
        self.patch_size = int(patch_size)
        self.num_heads = num_heads
        self.num_register_tokens = num_register_tokens
        self.pos_embed_type = pos_embed
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        rows, cols = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.base_grid = self.patch_embed.grid_size(rows, cols)
        num_patches = self.base_grid[0] * self.base_grid[1]

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        # Learned table: [CLS] entry first, then the base grid (the DINOv2 layout).
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim)) if pos_embed == "learned" else None
        )
        self.rope = Rope2D(embed_dim // num_heads, rope_theta) if pos_embed == "rope" else None

        if drop_path_uniform:
            rates = [drop_path_rate] * depth
        else:  # linear ramp 0 -> rate over depth
            rates = [drop_path_rate * i / (depth - 1) if depth > 1 else drop_path_rate for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, ffn_layer, init_values, rate, norm_eps)
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.grad_checkpointing = False  # set_grad_checkpointing(): a training option, not architecture
        self.pack_crops = False  # set_crop_packing(): likewise
        self.prune_last_block = True  # set_last_block_pruning(): likewise (on: same results, less work)
        self.init_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block: while gradients are recorded, each block keeps only
        its input and recomputes its activations in the backward pass (about one more forward of
        compute for activation memory of one block instead of all). Drop path draws the same
        masks in the recomputation (the random state is restored)."""
        self.grad_checkpointing = bool(enable)

    def set_crop_packing(self, enable: bool = True) -> None:
        """Multi-crop calls keep the tokens of all crop sizes as one packed matrix through the
        blocks (``packing``: per-token layers once on all tokens, block-diagonal attention per
        crop size) instead of one tensor per crop size. Same results up to float summation
        order; which is faster depends on the machine (``benchmarks/packing.py``)."""
        self.pack_crops = bool(enable)

    def set_last_block_pruning(self, enable: bool = True) -> None:
        """``forward_cls_and_patches`` (and ``forward``) run the last block's layers after
        attention and the final norm on the tokens they return only (``token_selection``). Same
        results up to float summation order, less work: the other tokens' outputs are unused."""
        self.prune_last_block = bool(enable)

    def set_drop_path_law(self, law: str) -> None:
        """``"bernoulli"`` (per-sample masks, timm / DINO / MAE) or ``"subset"`` (DINOv2's
        fixed-size random subsets, the branches computed on the kept samples only) in every
        block (``stochastic_depth``). A training choice of the method, not architecture."""
        if law not in DROP_PATH_LAWS:
            raise ValueError(f"drop path law must be one of {DROP_PATH_LAWS}, got {law!r}")
        for block in self.blocks:
            block.drop_path_law = law

    def set_attention_kernel(self, kernel: str) -> None:
        """``"auto"`` (SDPA, but the explicit softmax(qk^T)v for bf16 / fp16 on the CPU), ``"sdpa"`` or
        ``"explicit"`` in every block (``attention.ATTENTION_KERNELS``); same results up to float
        rounding, speed by machine (``benchmarks/attention.py``)."""
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")
        for block in self.blocks:
            block.attn.kernel = kernel

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` each block: its ``forward`` and its multi-crop ``forward_list`` (one
        compiled graph per block, reused by every block of the same shapes; the crop sizes of a
        multi-crop call compile once each). A training option (``model.compile``), not part of
        the architecture: the weights and the state dict are unchanged."""
        for block in self.blocks:
            block.forward = torch.compile(block.forward, **options)
            block.forward_list = torch.compile(block.forward_list, **options)
            block.forward_packed = torch.compile(block.forward_packed, **options)
            block.forward_selected = torch.compile(block.forward_selected, **options)

    def run_block(self, block_fn, *inputs):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block_fn, *inputs, use_reentrant=False)
        return block_fn(*inputs)

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Patch embedding as a linear layer on flattened patches (MAE's choice).
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)

    # ------------------------------------------------------------ positions
    def patch_positions(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """Absolute positions (1, rows*cols, D) of the patch tokens for a grid, or None (RoPE)."""
        if self.pos_embed_type == "learned":
            return interpolate_pos_embed(
                self.pos_embed[:, 1:], self.base_grid, grid, self.interpolate_offset, self.interpolate_antialias
            )
        if self.pos_embed_type == "sincos":
            table = sincos_2d_table(self.embed_dim, *grid)
            return table.to(device=self.cls_token.device, dtype=self.cls_token.dtype).unsqueeze(0)
        return None

    def rope_tables(self, grid: tuple[int, int]):
        return self.rope(*grid) if self.rope is not None else None

    def _check_masks(self, masks: torch.Tensor, batch: int, num_patches: int) -> None:
        if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool:
            got = masks.dtype if isinstance(masks, torch.Tensor) else type(masks).__name__
            raise TypeError(f"masks must be a bool tensor (True = masked patch), got {got}")
        if tuple(masks.shape) != (batch, num_patches):
            raise ValueError(
                f"masks must have shape (B, N) = ({batch}, {num_patches}) for these images, "
                f"got {tuple(masks.shape)}"
            )

    def prepare_tokens(self, images: torch.Tensor, masks: torch.Tensor | None = None):
        """Patch embedding, mask tokens, positions, [CLS] and registers -> (B, T, D), grid."""
        x, grid = self.patch_embed(images)
        batch, num_patches, _ = x.shape
        if masks is not None:
            self._check_masks(masks, batch, num_patches)
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        positions = self.patch_positions(grid)
        cls = self.cls_token
        if positions is not None:
            x = x + positions
        if self.pos_embed is not None:
            cls = cls + self.pos_embed[:, :1]
        prefix = [cls.expand(batch, -1, -1)]
        if self.register_tokens is not None:
            prefix.append(self.register_tokens.expand(batch, -1, -1))
        return torch.cat(prefix + [x], dim=1), grid

    # -------------------------------------------------------------- outputs
    def split_tokens(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        normed = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1 : 1 + r],
            "x_norm_patchtokens": normed[:, 1 + r :],
            "x_prenorm": x,
        }

    def forward_features(self, images, masks=None):
        """Dict of normalised tokens for a batch, or a list of dicts for a list of batches."""
        if isinstance(images, (list, tuple)):
            return self.forward_features_list(list(images), masks)
        x, grid = self.prepare_tokens(images, masks)
        rope = self.rope_tables(grid)
        for block in self.blocks:
            x = self.run_block(block, x, rope)
        return self.split_tokens(x)

    def forward_features_list(self, images: list[torch.Tensor], masks=None) -> list[dict]:
        """Multi-crop: groups of crops of different sizes go through the blocks together (packed
        into one token matrix with ``set_crop_packing``)."""
        if masks is None:
            masks = [None] * len(images)
        if len(masks) != len(images):
            raise ValueError(f"got {len(images)} image batches but {len(masks)} masks (use None for unmasked)")
        xs, ropes = self.prepare_token_groups(images, masks)
        return [self.split_tokens(x) for x in self.run_blocks_on_groups(self.blocks, xs, ropes)]

    def prepare_token_groups(self, images: list[torch.Tensor], masks: list) -> tuple[list, list]:
        prepared = [self.prepare_tokens(img, m) for img, m in zip(images, masks)]
        return [x for x, _ in prepared], [self.rope_tables(grid) for _, grid in prepared]

    def run_blocks_on_groups(self, blocks, xs: list[torch.Tensor], ropes: list) -> list[torch.Tensor]:
        if self.pack_crops:
            layout = PackedLayout.of(xs)
            packed = layout.pack(xs)
            for block in blocks:
                packed = self.run_block(block.forward_packed, packed, layout, ropes)
            return layout.unpack(packed)
        for block in blocks:
            xs = self.run_block(block.forward_list, xs, ropes)
        return xs

    def forward_cls_and_patches(self, images, masks=None, patches=None):
        """The normalised [CLS] token of every image and the patch tokens at ``patches``, a
        (B, N) bool tensor (True = wanted; None: no patch token) or the (M,) integer indices of
        the wanted patches in the flattened (B * N) patch tokens (as ``mask.reshape(-1).nonzero()``;
        unlike a mask they need no host synchronisation on an accelerator), as
        ``{"x_norm_clstoken": (B, D), "x_norm_selected_patchtokens": (M, D)}``, the M patches in
        row-major order (as ``x_norm_patchtokens[patches]``), or in the order of the indices. Lists
        of image batches, masks and patches give a list of dicts (multi-crop). Pruned (``set_last_block_pruning``), the last block and the final
        norm compute these tokens only."""
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        masks = [masks] if single else list(masks) if masks is not None else [None] * len(images)
        patches = [patches] if single else list(patches) if patches is not None else [None] * len(images)
        if not len(images) == len(masks) == len(patches):
            raise ValueError(f"got {len(images)} image batches, {len(masks)} masks and {len(patches)} patch "
                             "selections (use None for none)")
        if self.prune_last_block:
            outs = self._cls_and_patches_pruned(images, masks, patches)
        else:
            full = [self.forward_features(images[0], masks[0])] if single else self.forward_features_list(images, masks)
            outs = []
            for out, p in zip(full, patches):
                tokens = out["x_norm_patchtokens"]
                _check_patch_selection(p, tokens.shape[0], tokens.shape[1])
                selected = (tokens.new_zeros(0, tokens.shape[-1]) if p is None else tokens[p] if p.dtype == torch.bool
                            else tokens.reshape(-1, tokens.shape[-1]).index_select(0, p))
                outs.append({"x_norm_clstoken": out["x_norm_clstoken"], "x_norm_selected_patchtokens": selected})
        return outs[0] if single else outs

    def _cls_and_patches_pruned(self, images: list, masks: list, patches: list) -> list[dict]:
        """Every block but the last on all tokens, the last one on the selected rows only."""
        xs, ropes = self.prepare_token_groups(images, masks)
        xs = self.run_blocks_on_groups(self.blocks[:-1], xs, ropes)
        prefix = 1 + self.num_register_tokens
        for x, p in zip(xs, patches):
            _check_patch_selection(p, x.shape[0], x.shape[1] - prefix)
        selections = [SelectedRows.of(x.shape[0], x.shape[1], prefix, p, x.device) for x, p in zip(xs, patches)]
        rows = self.norm(self.run_block(self.blocks[-1].forward_selected, xs, ropes, selections))
        return [{"x_norm_clstoken": part[: selection.batch], "x_norm_selected_patchtokens": part[selection.batch:]}
                for part, selection in zip(rows.split([len(s.rows) for s in selections]), selections)]

    def forward_visible(self, images: torch.Tensor, ids_keep: torch.Tensor,
                        check_range: bool = True) -> dict[str, torch.Tensor]:
        """Encode only the patches ``ids_keep`` (B, K) (row-major indices), positions added first.

        Returns the dict of ``forward_features`` with ``x_norm_patchtokens`` of shape (B, K, D) in
        the order of ``ids_keep``. ``check_range=False`` skips the check of the indices' values,
        which synchronises with an accelerator (MAE's own masking draws valid ones every step).
        """
        if self.pos_embed_type == "rope":
            raise ValueError("forward_visible needs absolute positions; pos_embed='rope' is not supported")
        x, grid = self.patch_embed(images)
        batch, num_patches, dim = x.shape
        if ids_keep.ndim != 2 or ids_keep.shape[0] != batch or ids_keep.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"ids_keep must be an integer tensor of shape (B, K) with B={batch}, "
                f"got {ids_keep.dtype} of shape {tuple(ids_keep.shape)}"
            )
        if check_range and ids_keep.numel() and (ids_keep.min() < 0 or ids_keep.max() >= num_patches):
            raise ValueError(f"ids_keep must index patches in [0, {num_patches}), got values out of range")
        x = x + self.patch_positions(grid)
        x = torch.gather(x, 1, ids_keep.long().unsqueeze(-1).expand(-1, -1, dim))
        cls = self.cls_token + (self.pos_embed[:, :1] if self.pos_embed is not None else 0)
        prefix = [cls.expand(batch, -1, -1)]
        if self.register_tokens is not None:
            prefix.append(self.register_tokens.expand(batch, -1, -1))
        x = torch.cat(prefix + [x], dim=1)
        for block in self.blocks:
            x = self.run_block(block, x)
        return self.split_tokens(x)

    @torch.no_grad()
    def last_self_attention(self, images: torch.Tensor) -> torch.Tensor:
        """Attention weights (B, heads, T, T) of the last block; the fast path never builds them."""
        x, grid = self.prepare_tokens(images)
        rope = self.rope_tables(grid)
        for block in self.blocks[:-1]:
            x = block(x, rope)
        last = self.blocks[-1]
        return last.attn.attention_map(last.norm1(x), rope)

    def forward(self, images):
        """The [CLS] embedding (B, D) (a list of them for a list of batches)."""
        out = self.forward_cls_and_patches(images)
        if isinstance(out, list):
            return [o["x_norm_clstoken"] for o in out]
        return out["x_norm_clstoken"]

    def no_weight_decay_names(self) -> set[str]:
        """Token parameters, listed for optimisers that exclude them (DINOv2 does decay them)."""
        return {"cls_token", "register_tokens", "mask_token", "pos_embed"}


def _check_patch_selection(patches: torch.Tensor | None, batch: int, num_patches: int) -> None:
    """A (B, N) bool mask or (M,) integer indices into the B * N patch tokens. The indices'
    range is asserted on the device (``torch._assert_async``): reading it on the host would wait
    for an accelerator."""
    if patches is None:
        return
    wanted = f"a bool tensor of shape (B, N) = ({batch}, {num_patches}) or integer indices of shape (M,) in " \
             f"[0, {batch * num_patches})"
    if not isinstance(patches, torch.Tensor):
        raise ValueError(f"patches must be {wanted}, got {type(patches).__name__}")
    if patches.dtype == torch.bool:
        if tuple(patches.shape) != (batch, num_patches):
            raise ValueError(f"patches must be {wanted}, got a bool tensor of shape {tuple(patches.shape)}")
        return
    if patches.dtype not in (torch.int64, torch.int32) or patches.ndim != 1:
        raise ValueError(f"patches must be {wanted}, got {patches.dtype} of shape {tuple(patches.shape)}")
    if patches.numel():
        torch._assert_async((patches.min() >= 0) & (patches.max() < batch * num_patches),
                            f"patches must be {wanted}: an index is out of range")


def build_backbone(arch: dict[str, Any]) -> VisionTransformer:
    """Build from a plain dict (a preset, a config node or a checkpoint's stored ``arch``)."""
    arch = dict(arch)
    if isinstance(arch.get("img_size"), list):
        arch["img_size"] = tuple(arch["img_size"])
    try:
        return VisionTransformer(**arch)
    except TypeError as err:
        allowed = sorted(VisionTransformer.__init__.__code__.co_varnames[1:VisionTransformer.__init__.__code__.co_argcount])
        raise TypeError(f"unknown backbone argument in {sorted(arch)}; allowed: {allowed} ({err})") from None
