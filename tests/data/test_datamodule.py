"""SSLDataModule: training batches, k-NN loaders, reproducible order, describe(), config errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vit.data.datamodule import SSLDataModule
from ssl_vit.data.fashion_mnist import DEBIAN_DIR, FASHION_MNIST_MEAN, FASHION_MNIST_STD, RAW_FILES

HAS_FASHION_MNIST = all((Path(DEBIAN_DIR) / f"{name}.gz").is_file() for name in RAW_FILES)


# Simple stand-ins for the multi-crop transform and its collator (module-level: picklable for
# worker processes).
def two_views(image: Image.Image) -> list[torch.Tensor]:
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return [x, x.flip(-1)]


def stack_views(samples):
    views = [torch.stack([s[0][v] for s in samples]) for v in range(len(samples[0][0]))]
    return {"views": views, "labels": torch.tensor([s[1] for s in samples])}


def _labels_of_epoch(loader) -> list[int]:
    return [y for batch in loader for y in batch["labels"].tolist()]


@pytest.fixture(scope="module")
def fm_root(tmp_path_factory) -> Path:
    if not HAS_FASHION_MNIST:
        pytest.skip("apt-get install dataset-fashion-mnist to run this test")
    return tmp_path_factory.mktemp("fm")


def test_train_batch_through_collate():
    dm = SSLDataModule("synthetic", batch_size=16, train_transform=two_views, collate_fn=stack_views,
                       num_samples=100)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 100 // 16  # drop_last
    batch = next(iter(loader))
    assert [v.shape for v in batch["views"]] == [(16, 3, 32, 32)] * 2
    assert batch["labels"].shape == (16,) and batch["labels"].dtype == torch.long
    assert torch.equal(batch["views"][1], batch["views"][0].flip(-1))


def test_train_order_is_reproducible():
    def make(seed):
        return SSLDataModule("synthetic", batch_size=10, seed=seed, train_transform=two_views,
                             collate_fn=stack_views, num_samples=60).train_dataloader()

    a, b, c = make(0), make(0), make(1)
    epoch0, epoch1 = _labels_of_epoch(a), _labels_of_epoch(a)
    assert epoch0 == _labels_of_epoch(b)  # same seed, same order
    assert epoch1 == _labels_of_epoch(b)  # ... in every epoch
    assert epoch0 != epoch1  # a new order each epoch
    assert epoch0 != _labels_of_epoch(c)  # another seed, another order
    # Lightning's set_epoch picks an epoch's order (e.g. after a resume)
    a.sampler.set_epoch(1)
    assert _labels_of_epoch(a) == epoch1


def test_train_loader_with_worker_processes():
    dm = SSLDataModule("synthetic", batch_size=8, num_workers=1, train_transform=two_views,
                       collate_fn=stack_views, num_samples=32)
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    first = [b["views"][0] for b in loader]
    again = SSLDataModule("synthetic", batch_size=8, num_workers=0, train_transform=two_views,
                          collate_fn=stack_views, num_samples=32).train_dataloader()
    assert len(first) == 4 and all(torch.equal(x, b["views"][0]) for x, b in zip(first, again))


@pytest.mark.skipif(not HAS_FASHION_MNIST, reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_knn_loaders_and_describe(fm_root):
    dm = SSLDataModule("fashion_mnist", root=str(fm_root), batch_size=32, train_transform=two_views,
                       collate_fn=stack_views)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataset) == 55000
    # grayscale reaches the train transform as RGB
    batch = next(iter(dm.train_dataloader()))
    assert batch["views"][0].shape == (32, 3, 28, 28)

    bank, queries = dm.knn_dataloaders(max_train=300, max_eval=100)
    assert len(bank.dataset) == 300 and len(queries.dataset) == 100
    for loader in (bank, queries):
        images, labels = next(iter(loader))
        assert images.shape == (32, 3, 32, 32) and images.dtype == torch.float32
        assert labels.dtype == torch.long and 0 <= labels.min() and labels.max() <= 9
        assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
        assert -1.0 < images.min() < -0.75  # black pixels: (0 - 0.286) / 0.353 = -0.81
    # fixed order, nothing dropped
    assert torch.equal(next(iter(queries))[1], next(iter(dm.knn_dataloaders(max_train=300, max_eval=100)[1]))[1])
    assert sum(len(y) for _, y in queries) == 100

    bank, test = dm.knn_dataloaders("test", max_train=50, max_eval=40)
    assert len(bank.dataset) == 50 and len(test.dataset) == 40

    info = dm.describe()
    assert info["channels"] == 3 and info["resolution"] == 32 and info["dataset"] == "fashion_mnist"
    assert info["mean"] == [FASHION_MNIST_MEAN] * 3 and info["std"] == [FASHION_MNIST_STD] * 3
    assert info["num_classes"] == 10


def test_imagefolder_datamodule(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            rgb = np.full((40, 30, 3), 20 * i + (120 if cls == "b" else 0), dtype=np.uint8)
            Image.fromarray(rgb).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"garbage")
    dm = SSLDataModule("imagefolder", root=str(tmp_path), batch_size=4, image_size=16, val_size=2)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16)
    bank, val = dm.knn_dataloaders()
    assert len(bank.dataset) == 8 and sorted(y for _, ys in val for y in ys.tolist()) == [0, 1]
    assert dm.describe()["mean"] == [0.485, 0.456, 0.406] and dm.num_classes == 2
    assert dm.get_dataset("trainval").num_skipped == 1

    flat = tmp_path / "a"
    dm = SSLDataModule("imagefolder", root=str(flat), batch_size=2, val_size=1)
    assert next(iter(dm.train_dataloader()))[1].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="needs labels"):
        dm.knn_dataloaders()


def test_config_errors_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="fashion_mnist, imagefolder, synthetic"):
        SSLDataModule("cifar")
    with pytest.raises(ValueError, match="data.root"):
        SSLDataModule("imagefolder")
    with pytest.raises(ValueError, match="data.root"):
        SSLDataModule("imagefolder", root=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="data.root"):
        SSLDataModule("imagefolder", root=str(tmp_path / "empty")).setup("fit")
    with pytest.raises(ValueError, match="data.batch_size"):
        SSLDataModule("synthetic", batch_size=0)
    with pytest.raises(ValueError, match="data.num_workers"):
        SSLDataModule("synthetic", num_workers=-1)
    with pytest.raises(ValueError, match="data.colour"):
        SSLDataModule("synthetic", colour=1)
    dm = SSLDataModule("synthetic", batch_size=64, num_samples=50)
    with pytest.raises(ValueError, match="data.batch_size=64 is larger than the 50 training images"):
        dm.train_dataloader()


def test_lightning_fit_resumes_with_the_same_data_order(tmp_path):
    """Lightning calls set_epoch on the sampler: a run resumed at an epoch boundary sees the same
    order as an uninterrupted one, and the checkpoint holds describe()."""
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3 * 32 * 32, 10)
            self.seen = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.seen.append((self.current_epoch, y.tolist()))
            return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(epochs, ckpt_path=None):
        dm = SSLDataModule("synthetic", batch_size=10, num_samples=30, seed=3)
        model = Recorder()
        trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False,
                            default_root_dir=tmp_path, accelerator="cpu")
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model.seen, trainer

    full, _ = fit(3)
    _, trainer = fit(2)
    trainer.save_checkpoint(tmp_path / "e2.ckpt")
    state = torch.load(tmp_path / "e2.ckpt", weights_only=False)["SSLDataModule"]
    assert state["describe"]["channels"] == 3 and state["describe"]["seed"] == 3
    resumed, _ = fit(3, ckpt_path=tmp_path / "e2.ckpt")
    assert resumed == [s for s in full if s[0] == 2]

    def order(epoch):
        return [y for e, y in full if e == epoch]

    assert order(0) != order(1) != order(2)
