"""Does the PCA picture separate objects from background? A measured proxy, trained vs random init.

    python benchmarks/pca_foreground.py RUN_DIR [--num-images 16]

On the first ``--num-images`` validation images of the run's data set (Fashion-MNIST by
default), at the run's resolution: PCA fitted jointly over all their patch features (DINOv2's
way), the first component thresholded at 0 with one global sign (border patches mostly
negative; ``ssl_vit.visualization.pca_foreground``), against the foreground of the pixels
(above 10% of each image's maximum, a patch counting as foreground when most of its pixels are).
Prints the pooled IoU of the run's final backbone, of the same backbone at random init (the
run's seed and initialisation) and of calling every patch foreground.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--num-images", type=int, default=16)
    args = parser.parse_args()

    from omegaconf import OmegaConf

    import ssl_vit
    from ssl_vit.build import random_init_backbone
    from ssl_vit.callbacks.pictures import PeriodicPictures, unnormalise
    from ssl_vit.data.datamodule import SSLDataModule
    from ssl_vit.evaluate import read_preprocessing
    from ssl_vit.visualization.pca import foreground_iou, patch_features, pca_foreground, pixel_foreground

    ckpt = args.run_dir / "checkpoints" / "last.ckpt"
    cfg = OmegaConf.load(args.run_dir / ".hydra" / "config.yaml")
    pre = read_preprocessing(ckpt)
    datamodule = SSLDataModule(dataset=pre["dataset"], root=pre.get("root"), val_size=pre.get("val_size"),
                               split_seed=pre.get("split_seed", 0), image_size=pre["resolution"], mean=pre["mean"],
                               std=pre["std"])
    images = PeriodicPictures(datamodule, ".", num_images=args.num_images).images()
    backbones = {"trained": ssl_vit.load_backbone(ckpt), "random_init": random_init_backbone(cfg).eval()}
    grid = backbones["trained"].patch_embed.grid_size(*images.shape[-2:])
    truth = pixel_foreground(unnormalise(images, pre["mean"], pre["std"]), backbones["trained"].patch_size)
    result = {"num_images": int(images.shape[0]), "grid": list(grid),
              "all_foreground": foreground_iou(torch.ones_like(truth), truth)}
    for name, backbone in backbones.items():
        result[name] = foreground_iou(pca_foreground(patch_features(backbone, images), grid), truth)
    print(json.dumps(result, indent=2))
    print(f"pca_foreground_iou trained={result['trained']:.3f} random_init={result['random_init']:.3f} "
          f"all_foreground={result['all_foreground']:.3f} (gain {result['trained'] - result['random_init']:+.3f})")


if __name__ == "__main__":
    main()
