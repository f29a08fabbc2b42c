"""Pretraining methods (DINO, DINOv2, MAE, distillation) and their shared optimisation pieces:
schedules, parameter groups, EMA teacher and gradient clipping."""
