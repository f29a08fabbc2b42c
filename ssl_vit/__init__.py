"""ssl_vit: self-supervised pretraining of Vision Transformers."""
import os

# Large CPU tensors on transparent huge pages (ssl_vit/cpu_memory.py): torch reads this once, at its
# first CPU allocation, which importing Lightning already makes, so it is set before any import.
# It changes only the alignment of blocks of 2 MB and more; THP_MEM_ALLOC_ENABLE=0 keeps torch's default.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from ssl_vit.models import VisionTransformer, build_backbone  # noqa: E402


def load_backbone(path, **arch):
    """Load a backbone from this framework's files or from outside weights (see ssl_vit.models.load)."""
    from ssl_vit.models.load import load_backbone as _load

    return _load(path, **arch)


__all__ = ["VisionTransformer", "build_backbone", "load_backbone"]
__version__ = "0.1.0"

from ssl_vit.schema import register as _register_schemas  # noqa: E402  (conf/ extends the schemas)

_register_schemas()
