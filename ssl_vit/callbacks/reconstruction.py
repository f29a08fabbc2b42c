"""MAE pictures: original / masked / reconstruction of a few fixed validation images.

Every ``every_n_steps`` optimizer steps and at the end of training, the same images with the same
masks (noise from a fixed seed) go through the model. The PNG (one column per image; rows:
original, the visible patches on grey, the prediction of every patch, and the prediction with the
visible patches pasted back, as in the paper's figures) is written to ``DIR/pictures/`` and
handed to the loggers (:mod:`ssl_vit.callbacks.pictures`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid

from ssl_vit.callbacks.pictures import PeriodicPictures
from ssl_vit.losses.mae import patchify, unpatchify

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


class ReconstructionPictures(PeriodicPictures):
    def __init__(self, datamodule, out_dir: str | Path, every_n_steps: int = 100, num_images: int = 8,
                 seed: int = 0, split: str = "val"):
        super().__init__(datamodule, out_dir, every_n_steps, num_images, split, setting="method.pictures")
        self.seed = seed

    def draw(self, pl_module, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, str]]:
        grid = pl_module.encoder.patch_embed.grid_size(*images.shape[-2:])
        generator = torch.Generator().manual_seed(self.seed)  # the same masks at every step
        noise = torch.rand(images.shape[0], grid[0] * grid[1], generator=generator).to(images.device)
        rows = reconstruction_rows(pl_module, images, noise, self.datamodule.mean, self.datamodule.std)
        return {"reconstruction": (make_grid(rows.cpu(), nrow=images.shape[0], padding=1, pad_value=1.0),
                                   "rows: original, masked, reconstruction, reconstruction + visible")}
