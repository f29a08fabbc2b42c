"""python -m ssl_vit.visualize checkpoint=PATH [images=FILE_OR_FOLDER] [hydra.run.dir=DIR]: pictures
of what a backbone sees, as PNGs in DIR.

* ``attention.png``: each image (a column) and, below it, the last block's [CLS] attention of
  every head;
* ``pca.png``: each image, the first three principal components of its patch features as RGB
  (PCA fitted on all the images together, as in the DINOv2 paper) and the foreground given by the
  first component (one sign for all images: border patches mostly background).

``checkpoint``: anything ``ssl_vit.load_backbone`` reads (this framework's checkpoints of every
method and its exports; outside weights). Without ``images=`` the first ``num_images``
validation images of the checkpoint's own data set are used, with its preprocessing; outside
weights carry no data set, so they need ``images=`` (a file or a folder of images, resized to
``resolution`` or the model's size and normalised with ImageNet's mean / std unless the
checkpoint stores its own). Unreadable files are skipped and counted.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ssl_vit.cli import exit_2_on, run_app

log = logging.getLogger("ssl_vit.visualize")


def image_files(location: str | Path, limit: int) -> list[Path]:
    from ssl_vit.data.imagefolder import IMG_EXTENSIONS

    path = Path(str(location)).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"images={str(location)!r}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"images={str(location)!r} holds no image files ({', '.join(IMG_EXTENSIONS)})")
    return files[:limit]


def load_images(files: list[Path], transform) -> tuple[list[Any], int]:
    """Transformed images of the readable files, and how many were skipped."""
    from PIL import Image, UnidentifiedImageError

    images, skipped = [], 0
    for file in files:
        try:
            with Image.open(file) as img:
                images.append(transform(img.convert("RGB")))
        except (OSError, UnidentifiedImageError, ValueError) as err:
            log.warning("skipped unreadable image %s (%s)", file, err)
            skipped += 1
    return images, skipped


def selected_images(cfg: DictConfig, backbone, preprocessing: dict | None):
    """(normalised images (B, 3, H, W), mean, std, skipped files)."""
    import torch

    from ssl_vit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform

    pre = preprocessing or {}
    size = cfg.resolution or pre.get("resolution") or backbone.arch["img_size"]
    mean, std = pre.get("mean") or list(IMAGENET_MEAN), pre.get("std") or list(IMAGENET_STD)
    if cfg.images:
        images, skipped = load_images(image_files(cfg.images, cfg.num_images), EvalTransform(size, mean, std))
        if not images:
            raise ValueError(f"images={cfg.images!r}: none of the {skipped} files could be read")
        return torch.stack(images), mean, std, skipped
    if not pre.get("dataset"):
        raise ValueError("images=FILE_OR_FOLDER is required for this checkpoint: outside weights carry no data set")
    from ssl_vit.callbacks.pictures import PeriodicPictures
    from ssl_vit.data.datamodule import SSLDataModule

    datamodule = SSLDataModule(dataset=pre["dataset"], root=pre.get("root"), val_size=pre.get("val_size"),
                               split_seed=pre.get("split_seed", 0), image_size=size, mean=mean, std=std)
    images = PeriodicPictures(datamodule, ".", num_images=cfg.num_images).images()
    return images, mean, std, 0


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    from torchvision.utils import save_image

    from ssl_vit import load_backbone
    from ssl_vit.callbacks.pictures import unnormalise
    from ssl_vit.evaluate import read_preprocessing
    from ssl_vit.visualization import attention_picture, pca_picture

    if not cfg.get("checkpoint"):
        raise ValueError("checkpoint=PATH is required: a training checkpoint (.ckpt), an export or outside weights")
    path = Path(str(cfg.checkpoint)).expanduser()
    if not path.is_file():
        raise ValueError(f"checkpoint={str(cfg.checkpoint)!r}: no such file ({path.resolve()})")
    if isinstance(cfg.num_images, bool) or not isinstance(cfg.num_images, int) or cfg.num_images < 1:
        raise ValueError(f"num_images={cfg.num_images!r}; allowed: a positive integer")
    backbone = load_backbone(path)
    images, mean, std, skipped = selected_images(cfg, backbone, read_preprocessing(path))
    pixels = unnormalise(images, mean, std)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, draw in (("attention", attention_picture), ("pca", pca_picture)):
        written[name] = out_dir / f"{name}.png"
        save_image(draw(backbone, images, pixels), written[name])
    print(f"wrote {written['attention']} and {written['pca']} ({images.shape[0]} images"
          + (f", {skipped} unreadable files skipped)" if skipped else ")"))
    return {"files": written, "num_images": int(images.shape[0]), "skipped_files": skipped}


@hydra.main(version_base=None, config_path="../conf", config_name="visualize")
@exit_2_on(ValueError)
def main(cfg: DictConfig) -> None:
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    run_app(main)
