"""Pictures during training: every ``every_n_steps`` optimizer steps and at the end, a few fixed
validation images go through the model; the PNGs land in ``DIR/pictures/`` and go to the loggers
that take images (wandb; TensorBoard), the CSV logger keeping only the files.

* :class:`FeaturePictures` (every method): the last block's [CLS] attention per head, and the
  first three PCA components of the patch features as RGB with the foreground they give;
* :class:`ssl_vit.callbacks.reconstruction.ReconstructionPictures` (MAE).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import save_image

from ssl_vit.callbacks.step_tracking import OptimizerStepCallback
from ssl_vit.data.datasets import TransformedDataset
from ssl_vit.visualization import attention_picture, pca_picture


def unnormalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised images -> pixels in [0, 1] (for display)."""
    mean = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


def publish_pictures(trainer, pictures: dict[str, tuple[Path, torch.Tensor, str]]) -> None:
    """Hand saved pictures ``{key: (path, picture, caption)}`` to every logger that takes images
    (wandb: all of them in one history row, at the step of the state they show)."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):  # wandb
            import wandb

            logger.log_metrics({key: [wandb.Image(str(path), caption=caption)]
                                for key, (path, _, caption) in pictures.items()}, step=trainer.global_step)
        elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
            for key, (_, picture, _) in pictures.items():
                logger.experiment.add_image(key, picture, global_step=trainer.global_step)


class PeriodicPictures(OptimizerStepCallback):
    """The schedule, the fixed images and the publishing; subclasses say what to draw."""

    def __init__(self, datamodule, out_dir: str | Path, every_n_steps: int = 100, num_images: int = 8,
                 split: str = "val", setting: str = "pictures"):
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"{setting}.num_images={num_images!r}; allowed: a positive integer")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(f"{setting}.every_n_steps={every_n_steps!r}; allowed: an integer >= 0 (0: never)")
        self.datamodule, self.out_dir = datamodule, Path(out_dir)
        self.every_n_steps, self.num_images, self.split = every_n_steps, num_images, split
        self._images: torch.Tensor | None = None

    def images(self) -> torch.Tensor:
        """The first ``num_images`` images of the split, through the evaluation transform."""
        if self._images is None:
            raw = self.datamodule.get_dataset(self.split)
            data = TransformedDataset(raw, self.datamodule.eval_transform, to_rgb=True, three_channels=True)
            self._images = torch.stack([data[i][0] for i in range(min(self.num_images, len(data)))])
        return self._images

    def draw(self, pl_module, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, str]]:
        """``{name: (picture (3, H, W) in [0, 1], caption)}``."""
        raise NotImplementedError

    @torch.no_grad()
    def render(self, pl_module, step: int) -> dict[str, tuple[Path, torch.Tensor, str]]:
        images = self.images().to(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        try:
            pictures = self.draw(pl_module, images)
        finally:
            pl_module.train(was_training)
        saved = {}
        for name, (picture, caption) in pictures.items():
            path = self.out_dir / "pictures" / f"{name}_step{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image(picture, path)
            saved[name] = (path, picture, caption)
        return saved

    def publish(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        rendered = self.render(pl_module, trainer.global_step)
        publish_pictures(trainer, {f"pictures/{name}": entry for name, entry in rendered.items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.optimizer_stepped(trainer) and self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.publish(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps:
            self.publish(trainer, pl_module)


class FeaturePictures(PeriodicPictures):
    """[CLS] attention maps and PCA of the patch features of the evaluated backbone."""

    def draw(self, pl_module, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, str]]:
        backbone = pl_module.evaluation_backbone()
        pixels = unnormalise(images, self.datamodule.mean, self.datamodule.std)
        return {
            "attention": (attention_picture(backbone, images, pixels),
                          "rows: image, then the last block's [CLS] attention of each head"),
            "pca": (pca_picture(backbone, images, pixels),
                    "rows: image, PCA of patch features (3 components as RGB), first component > 0"),
        }
