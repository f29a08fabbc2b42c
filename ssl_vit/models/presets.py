"""Architecture presets as in the papers (ViT, DeiT, DINOv2), plus a small one for CPU runs.

The Hydra group ``conf/model/`` holds the same values (a test keeps the two in step); these
dicts serve code that builds a backbone without Hydra (tests, converters, benchmarks).
"""
from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "vit_tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    # DINOv2's ViT-g/14: SwiGLU feed-forward with the parameter count of a 6144-wide MLP.
    "vit_giant": dict(patch_size=14, embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglu"),
    # The default of `python -m ssl_vit.train`: learns on a 2-core CPU in minutes.
    "vit_cpu": dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3),
}


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """The architecture dict of a preset, with overrides (e.g. ``patch_size=8``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    return {**PRESETS[name], **overrides}
