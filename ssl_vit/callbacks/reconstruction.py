"""MAE pictures: original / masked / reconstruction of a few fixed validation images.

Every ``every_n_steps`` optimizer steps and at the end of training, the same images with the same
masks (noise from a fixed seed) go through the model. The PNG (one column per image; rows:
original, the visible patches on grey, the prediction of every patch, and the prediction with the
visible patches pasted back, as in the paper's figures) is written to ``DIR/pictures/`` and
handed to the logger (wandb: an image; the CSV logger keeps only the file).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import save_image

from ssl_vit.callbacks.step_tracking import OptimizerStepCallback
from ssl_vit.data.datasets import TransformedDataset
from ssl_vit.losses.mae import normalized_patch_target, patchify, unpatchify

GREY = 0.5  # what a removed patch shows in the "masked" row


def reconstruction_rows(method, images: torch.Tensor, noise: torch.Tensor, mean, std) -> torch.Tensor:
    """(4 * B, 3, H, W) pixels in [0, 1]: originals, masked, reconstructions, reconstructions with
    the visible patches pasted. With ``norm_pix_loss`` the prediction of each patch is in units of
    that patch's own mean and deviation, so it is shown with the true patch statistics."""
    p = method.encoder.patch_size
    grid = method.encoder.patch_embed.grid_size(*images.shape[-2:])
    pred, mask = method.reconstruct(images, noise)
    pred = pred.float()
    target = patchify(images, p)
    if method.norm_pix_loss:
        patch_mean = target.mean(-1, keepdim=True)
        patch_std = (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        pred = pred * patch_std + patch_mean
    removed = mask.unsqueeze(-1).bool()
    masked = unpatchify(torch.where(removed, torch.full_like(target, float("nan")), target), p, grid)
    pasted = unpatchify(torch.where(removed, pred, target), p, grid)
    full = unpatchify(pred, p, grid)
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    rows = [(x.float() * std + mean) for x in (images, masked, full, pasted)]
    rows[1] = torch.nan_to_num(rows[1], nan=GREY)
    return torch.cat(rows).clamp(0, 1)


class ReconstructionPictures(OptimizerStepCallback):
    def __init__(self, datamodule, out_dir: str | Path, every_n_steps: int = 100, num_images: int = 8,
                 seed: int = 0, split: str = "val"):
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"method.pictures.num_images={num_images!r}; allowed: a positive integer")
        self.datamodule, self.out_dir = datamodule, Path(out_dir)
        self.every_n_steps, self.num_images, self.seed, self.split = every_n_steps, num_images, seed, split
        self._images: torch.Tensor | None = None

    def images(self) -> torch.Tensor:
        """The first ``num_images`` images of the split, through the evaluation transform."""
        if self._images is None:
            raw = self.datamodule.get_dataset(self.split)
            data = TransformedDataset(raw, self.datamodule.eval_transform, to_rgb=True, three_channels=True)
            self._images = torch.stack([data[i][0] for i in range(min(self.num_images, len(data)))])
        return self._images

    @torch.no_grad()
    def render(self, pl_module, step: int) -> Path:
        images = self.images().to(pl_module.device)
        grid = pl_module.encoder.patch_embed.grid_size(*images.shape[-2:])
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.rand(images.shape[0], grid[0] * grid[1], generator=generator).to(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        try:
            rows = reconstruction_rows(pl_module, images, noise, self.datamodule.mean, self.datamodule.std)
        finally:
            pl_module.train(was_training)
        path = self.out_dir / "pictures" / f"reconstruction_step{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(rows.cpu(), path, nrow=images.shape[0], padding=1, pad_value=1.0)
        return path

    def publish(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        path = self.render(pl_module, trainer.global_step)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # wandb
                logger.log_image(key="pictures/reconstruction", images=[str(path)], step=trainer.global_step,
                                 caption=["rows: original, masked, reconstruction, reconstruction + visible"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.optimizer_stepped(trainer) and self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.publish(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.every_n_steps or trainer.global_step % self.every_n_steps:
            self.publish(trainer, pl_module)
