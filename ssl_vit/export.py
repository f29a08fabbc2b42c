"""python -m ssl_vit.export checkpoint=PATH [hydra.run.dir=DIR]: the trained backbone as a file
other tools read.

Writes ``DIR/backbone.safetensors`` in timm's ``VisionTransformer`` key layout and
``DIR/backbone.json``: ``{"format": "timm", "timm": {"model_name", "kwargs"}, "arch",
"preprocessing", "source"}``. The backbone is the one ``ssl_vit.load_backbone`` returns for the
checkpoint (DINO / DINOv2: the EMA teacher; MAE: the encoder; distillation: the EMA student),
and it comes back from the export with ``load_backbone(DIR / "backbone.safetensors")``. In timm::

    meta = json.load(open("backbone.json"))
    model = timm.create_model(meta["timm"]["model_name"], pretrained=False, **meta["timm"]["kwargs"])
    model.load_state_dict(safetensors.torch.load_file("backbone.safetensors"))

``model(images)`` then equals the backbone's [CLS] embedding at the native input size
(``arch.img_size``). See ``ssl_vit.models.timm_export`` for what cannot be exported (2-D RoPE).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ssl_vit.cli import run_app


def export(checkpoint: str | Path, out_dir: Path) -> dict[str, Any]:
    """Write ``backbone.safetensors`` and ``backbone.json`` for ``checkpoint`` into ``out_dir``."""
    import torch
    from safetensors.torch import save_file

    from ssl_vit import load_backbone
    from ssl_vit.evaluate import read_preprocessing
    from ssl_vit.models.timm_export import timm_refusal, to_timm

    path = Path(str(checkpoint)).expanduser()
    if not path.is_file():
        raise ValueError(f"checkpoint={str(checkpoint)!r}: no such file ({path.resolve()})")
    backbone = load_backbone(path)
    refusal = timm_refusal(backbone.arch)
    if refusal:
        raise ValueError(f"checkpoint={str(checkpoint)!r} cannot be exported: {refusal}")
    state, model_name, kwargs = to_timm(backbone)
    source: dict[str, Any] = {"checkpoint": str(path.resolve())}
    if path.suffix == ".ckpt":
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        source.update(method=(ckpt.get("ssl_vit") or {}).get("method"), global_step=ckpt.get("global_step"))
    meta = {"format": "timm", "timm": {"model_name": model_name, "kwargs": kwargs}, "arch": dict(backbone.arch),
            "preprocessing": read_preprocessing(path), "source": source}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "backbone.safetensors"))
    (out_dir / "backbone.json").write_text(json.dumps(meta, indent=2))
    return meta


@hydra.main(version_base=None, config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if not cfg.get("checkpoint"):
        print("error: checkpoint=PATH is required: a training checkpoint (.ckpt) or any file "
              "ssl_vit.load_backbone reads", file=sys.stderr)
        sys.exit(2)
    try:
        meta = export(cfg.checkpoint, out_dir)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out_dir / 'backbone.safetensors'} and {out_dir / 'backbone.json'} "
          f"(timm: {meta['timm']['model_name']} with the kwargs in the JSON)")


if __name__ == "__main__":
    run_app(main)
