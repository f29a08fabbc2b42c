"""python -m ssl_vit.train [overrides]: self-supervised pretraining (Hydra entry point)."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ssl_vit.config import build_backbone_from_config

IMPLEMENTED_METHODS: tuple[str, ...] = ()


def run(cfg: DictConfig) -> int:
    backbone = build_backbone_from_config(cfg.model)  # validates the model config first
    n_params = sum(p.numel() for p in backbone.parameters())
    method = cfg.method.name
    if method not in IMPLEMENTED_METHODS:
        print(
            f"ssl_vit: backbone {cfg.model.name} ready ({n_params / 1e6:.2f}M parameters), "
            f"but no training method is implemented yet: method={method} lands with the "
            f"DINO/DINOv2 issue. Nothing was trained.",
            file=sys.stderr,
        )
        return 0
    raise AssertionError("unreachable")


@hydra.main(version_base=None, config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    sys.exit(run(cfg))


if __name__ == "__main__":
    main()
