"""Pretraining methods (one LightningModule each) and their shared optimisation pieces:
schedules, parameter groups, EMA teacher and gradient clipping."""
from ssl_vit.methods.dino import DINO
from ssl_vit.methods.dinov2 import DINOv2
from ssl_vit.methods.distill import Distillation
from ssl_vit.methods.mae import MAE

METHODS = {"dino": DINO, "dinov2": DINOv2, "mae": MAE, "distill": Distillation}

__all__ = ["DINO", "DINOv2", "Distillation", "MAE", "METHODS"]
