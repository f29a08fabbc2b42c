from ssl_vit.models.presets import PRESETS, preset
from ssl_vit.models.vision_transformer import VisionTransformer, build_backbone

__all__ = ["PRESETS", "VisionTransformer", "build_backbone", "preset"]
