"""Losses of DINO and DINOv2: DINO cls loss with centering or Sinkhorn-Knopp, iBOT patch loss,
KoLeo regulariser, plus small distributed helpers and a finiteness guard."""
from ssl_vit.losses.checks import NonFiniteLossError, check_finite
from ssl_vit.losses.center import CENTER_REDUCTIONS, ema_center_update, local_center_statistics
from ssl_vit.losses.dino import DINOLoss
from ssl_vit.losses.distributed import all_reduce_mean, all_reduce_sum, is_dist_enabled, rank, world_size
from ssl_vit.losses.ibot import IBOTPatchLoss, masked_token_weights
from ssl_vit.losses.koleo import koleo_loss, koleo_loss_per_crop
from ssl_vit.losses.sinkhorn import sinkhorn_knopp

__all__ = [
    "CENTER_REDUCTIONS",
    "DINOLoss",
    "IBOTPatchLoss",
    "NonFiniteLossError",
    "all_reduce_mean",
    "all_reduce_sum",
    "check_finite",
    "ema_center_update",
    "is_dist_enabled",
    "koleo_loss",
    "koleo_loss_per_crop",
    "local_center_statistics",
    "masked_token_weights",
    "rank",
    "sinkhorn_knopp",
    "world_size",
]
