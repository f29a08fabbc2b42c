"""ssl_vit: self-supervised pretraining of Vision Transformers."""
from ssl_vit.models import VisionTransformer, build_backbone


def load_backbone(path, **arch):
    """Load a backbone from this framework's files or from outside weights (see ssl_vit.models.load)."""
    from ssl_vit.models.load import load_backbone as _load

    return _load(path, **arch)


__all__ = ["VisionTransformer", "build_backbone", "load_backbone"]
__version__ = "0.1.0"

from ssl_vit.schema import register as _register_schemas  # noqa: E402  (conf/ extends the schemas)

_register_schemas()
