"""Projection heads for self-distillation (DINO, and DINOv2's DINO / iBOT heads).

``DINOHead`` follows the released DINO / DINOv2 heads:

* an MLP ``Linear-GELU-(Linear-GELU)*(nlayers-2)-Linear`` from ``in_dim`` to ``bottleneck_dim``
  (``nlayers=1`` is a single Linear), trunc-normal(0.02) weights and zero biases;
* L2 normalisation of the bottleneck (``F.normalize(dim=-1, p=2)``; eps 1e-12, or 1e-6 for fp16
  inputs as in DINOv2, where 1e-12 underflows);
* a weight-normalised last layer without bias, ``W[k] = g[k] * V[k] / ||V[k]||`` (one norm per
  prototype row), with the gain ``g`` initialised to 1.  DINO freezes it at 1
  (``norm_last_layer=True``: every prototype has unit norm, ``g.requires_grad`` is False); DINOv2
  learns it (``norm_last_layer=False``).

The weight norm is written out explicitly with parameters ``last_layer.weight_g`` (shape
``(out_dim, 1)``) and ``last_layer.weight_v`` (``(out_dim, bottleneck_dim)``): the same names and
shapes as ``torch.nn.utils.weight_norm`` produces in the released checkpoints, so their head
weights load unchanged.  As in the released code the MLP is initialised before the last layer
is built, so ``weight_v`` keeps ``nn.Linear``'s default initialisation (its scale does not change
the output, only the effective step size of the prototype directions).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer ``y = x @ W.T`` with ``W = g * V / ||V||_row`` (weight norm, dim 0)."""

    def __init__(self, in_features: int, out_features: int, learn_gain: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.reset_parameters()
        self.weight_g.requires_grad_(learn_gain)

    def reset_parameters(self) -> None:
        # nn.Linear's default: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)).
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        with torch.no_grad():
            self.weight_g.fill_(1.0)

    @property
    def weight(self) -> torch.Tensor:
        """The effective (out_features, in_features) weight."""
        # Same as torch's norm_except_dim(v, 2, 0): no eps (a zero row would be a 0/0).
        return self.weight_v * (self.weight_g / self.weight_v.norm(p=2, dim=1, keepdim=True))

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``scale * x @ W.T`` (see :func:`prototype_scores`); ``x @ W.T`` by default."""
        return prototype_scores(x, self.weight, scale)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"learn_gain={self.weight_g.requires_grad}"
        )


def prototype_scores(features: torch.Tensor, prototypes: torch.Tensor, scale: float = 1.0,
                     shift: torch.Tensor | None = None) -> torch.Tensor:
    """``scale * features @ prototypes.T + shift`` for ``features`` (..., D), ``prototypes`` (K, D) and
    an optional ``shift`` broadcast over the rows (``(K,)`` or ``(1, K)``).

    The losses read the logits divided by a temperature, and the teacher's also minus a center:
    scaling the (rows, D = 256) features instead of the (rows, K = 65,536) logits, and starting
    the matrix product from the shift (``addmm``), saves two passes over the largest tensors of
    the step (about 4% of a ViT-S/16 DINOv2 step on the CPU). Equal to dividing and centering the
    logits up to float rounding."""
    if scale != 1.0:
        features = features * scale
    if shift is None:
        return F.linear(features, prototypes)
    flat = features.reshape(-1, features.shape[-1])
    out = torch.addmm(shift.reshape(1, -1).to(flat.dtype), flat, prototypes.t().to(flat.dtype))
    return out.reshape(*features.shape[:-1], prototypes.shape[0])


def _build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool):
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=bias)]
    if use_bn:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers.append(nn.GELU())
    for _ in range(nlayers - 2):
        layers.append(nn.Linear(hidden_dim, hidden_dim, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes.

    Args:
        in_dim: input width (the backbone's embed_dim).
        out_dim: number of prototypes K (DINO 65536; DINOv2 65536, its iBOT head 65536 too).
        hidden_dim, bottleneck_dim, nlayers: MLP shape (2048, 256, 3 in both papers).
        norm_last_layer: True (DINO) freezes the weight-norm gain at 1; False (DINOv2) learns it.
        use_bn: BatchNorm after the hidden Linears (an option of the released code, off by default).
        mlp_bias: biases in the MLP Linears.

    Accepts inputs of shape (..., in_dim); returns (..., out_dim).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        use_bn: bool = False,
        mlp_bias: bool = True,
    ):
        super().__init__()
        nlayers = max(int(nlayers), 1)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.hidden_dim, self.bottleneck_dim, self.nlayers, self.mlp_bias = hidden_dim, bottleneck_dim, nlayers, mlp_bias
        self.norm_last_layer = bool(norm_last_layer)
        self.use_bn = bool(use_bn) and nlayers > 1
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn, mlp_bias)
        self.mlp.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, learn_gain=not self.norm_last_layer)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """The logits times ``scale`` (the methods pass 1 / student temperature: applied to the
        bottleneck features, see :func:`prototype_scores`)."""
        return self.last_layer(self.bottleneck(x), scale)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck features (..., bottleneck_dim)."""
        if self.use_bn and x.dim() > 2:  # BatchNorm1d wants (N, C): flatten token dimensions
            return self.bottleneck(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.bottleneck_dim)
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return F.normalize(x, dim=-1, p=2, eps=eps)

    def spec(self) -> dict:
        """The constructor arguments (stored in checkpoints, so a head can be rebuilt from one)."""
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "hidden_dim": self.hidden_dim,
                "bottleneck_dim": self.bottleneck_dim, "nlayers": self.nlayers,
                "norm_last_layer": self.norm_last_layer, "use_bn": self.use_bn, "mlp_bias": self.mlp_bias}

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters of the prototype layer (frozen for the first epoch by the methods)."""
        return list(self.last_layer.parameters())

    def last_layer_parameter_names(self) -> list[str]:
        """Names (relative to this head) of :meth:`last_layer_parameters`."""
        return [f"last_layer.{n}" for n, _ in self.last_layer.named_parameters()]


def _one_call_on_both(fn, cls_tokens: torch.Tensor, patch_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` (row by row) once on the [CLS] and patch tokens concatenated, split back;
    ``patch_tokens`` may carry leading dimensions (``(..., D)``), which are kept."""
    flat = patch_tokens.reshape(-1, patch_tokens.shape[-1])
    out = fn(torch.cat([cls_tokens, flat]))
    cls_out, patch_out = out.split([cls_tokens.shape[0], flat.shape[0]])
    return cls_out, patch_out.reshape(*patch_tokens.shape[:-1], out.shape[-1])


def cls_and_patch_logits(cls_head: nn.Module, cls_tokens: torch.Tensor, patch_head: nn.Module,
                         patch_tokens: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cls_head(cls_tokens, scale), patch_head(patch_tokens, scale))``; when the two are one head
    (DINOv2's default, no separate iBOT head), in one call on the concatenated tokens: the MLP runs
    on one larger matrix and the weight-normalised last layer is built once instead of twice. Every
    layer works row by row, so the split result equals two calls (up to float summation order)."""
    if cls_head is not patch_head:
        return cls_head(cls_tokens, scale), patch_head(patch_tokens, scale)
    return _one_call_on_both(lambda x: cls_head(x, scale), cls_tokens, patch_tokens)


def cls_and_patch_bottlenecks(cls_head: nn.Module, cls_tokens: torch.Tensor, patch_head: nn.Module,
                              patch_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bottleneck features of :func:`cls_and_patch_logits` (one MLP call for a shared head),
    for callers that apply the prototypes themselves (the teacher's centered targets)."""
    if cls_head is not patch_head:
        return cls_head.bottleneck(cls_tokens), patch_head.bottleneck(patch_tokens)
    return _one_call_on_both(cls_head.bottleneck, cls_tokens, patch_tokens)


__all__ = ["DINOHead", "WeightNormLinear", "cls_and_patch_bottlenecks", "cls_and_patch_logits",
           "prototype_scores"]
