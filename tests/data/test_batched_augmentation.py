"""data.batched_augmentation: the workers cut the crops, the training process finishes the
augmentation per batch. The batches must be the ones the workers make with the option off:
bit-identical on the CPU (same parameter draws, same per-crop arithmetic)."""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
from PIL import Image

from ssl_vit.build import build_datamodule
from ssl_vit.data.collate import MultiCropCollator
from ssl_vit.data.transforms import MultiCropTransform
from ssl_vit.data.transforms.deferred import CropParamsBatch, PendingCrops, finish_batch
from tests.methods.training_helpers import compose_train, fit

BASE = ["data=synthetic", "data.options.num_samples=96", "data.val_size=16", "data.batch_size=12",
        "data.num_workers=0", "method.crops.n_local=3"]


def _first_batches(batched: bool, n: int = 2) -> list[dict]:
    cfg = compose_train(BASE + [f"data.batched_augmentation={str(batched).lower()}"])
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = iter(datamodule.train_dataloader())
    return [datamodule.on_after_batch_transfer(next(loader), 0) for _ in range(n)]


def test_batches_equal_the_workers_batches_bit_for_bit():
    workers, in_process = _first_batches(False), _first_batches(True)
    for a, b in zip(workers, in_process):
        assert a.keys() == b.keys()  # the parameters and channel count are consumed
        for key in a:
            assert a[key].dtype == b[key].dtype, key
            assert torch.equal(a[key], b[key]), key
    assert workers[0]["global_crops"].shape == (24, 3, 24, 24)
    assert workers[0]["local_crops"].shape == (36, 3, 12, 12)
    assert not torch.equal(workers[0]["global_crops"], workers[1]["global_crops"])


def test_workers_hand_over_uint8_crops_and_their_parameters():
    cfg = compose_train(BASE + ["data.batched_augmentation=true"])
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["global_crops"].dtype == torch.uint8 and batch["local_crops"].dtype == torch.uint8
    assert isinstance(batch["global_params"], CropParamsBatch) and len(batch["global_params"]) == 24
    assert len(batch["local_params"]) == 36
    # crop-major: the first 12 global entries are the images' global crop 0, which always blurs
    assert all(p.blur_sigma is not None for p in batch["global_params"].params[:12])


def _image(gray: bool, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if gray:
        return Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).convert("RGB")
    return Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))


def _augment_both_ways(images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    per_image = MultiCropTransform(16, 8, 2)
    deferred = MultiCropTransform(16, 8, 2, defer_augmentation=True)
    collate = MultiCropCollator(None, mask_probability=0.0, seed=0)
    torch.manual_seed(5)
    a = collate([(per_image(img), 0) for img in images])
    torch.manual_seed(5)
    pending = [deferred(img) for img in images]
    assert all(isinstance(p, PendingCrops) for p in pending)
    b = finish_batch(deferred, collate([(p, 0) for p in pending]))
    return a["global_crops"], b["global_crops"]


def test_gray_only_batches_stay_on_one_channel_and_match():
    a, b = _augment_both_ways([_image(True, i) for i in range(4)])
    assert b.shape == (8, 3, 16, 16)
    assert torch.equal(a, b)


def test_mixed_gray_and_colour_batches_match():
    """Gray images' crops travel replicated to three channels in a mixed batch but are augmented
    on one channel, as in the workers (on three, v2's luma weights summing to 0.9999 would lower
    them by a level per colour step)."""
    a, b = _augment_both_ways([_image(i % 2 == 0, i) for i in range(6)])
    assert torch.equal(a, b)


class _CropDtypes(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append(batch["global_crops"].dtype)


def test_a_training_run_feeds_the_model_finished_float_crops():
    spy = _CropDtypes()
    _, _, _, trainer = fit(["data.batched_augmentation=true"], max_steps=2, callbacks=[spy])
    assert trainer.global_step == 2 and spy.seen == [torch.float32, torch.float32]
