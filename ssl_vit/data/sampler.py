"""The training sampler: data order and augmentation randomness as pure functions of
``(seed, epoch, image index)``, sharded over processes, resumable mid-epoch.

Why: a run resumed from a checkpoint, or the same global batch split over several processes,
must see exactly the images and the random crops of an uninterrupted one-process run. Nothing
here depends on how many batches a DataLoader worker has produced before or on a random
generator's history:

- epoch ``e`` visits the training images in ``randperm(n)`` drawn from a generator seeded by
  ``(seed, e)``; global batch ``k`` is ``order[k * B * W : (k + 1) * B * W]`` (``B`` the batch per
  process, ``W`` the number of processes) and process ``r`` takes its ``r``-th slice of ``B``
  images, so the union over the processes is the one-process batch of size ``B * W``;
- every sample index comes as a :class:`SampleKey` carrying the seed of that image's
  augmentation in that epoch (:func:`sample_seed`), which :class:`TransformedDataset` uses to
  seed the transform, in whichever process or worker it runs;
- :meth:`TrainSampler.resume_at` starts at a batch inside an epoch (the rest of that epoch, then
  whole epochs), for a run resumed mid-epoch.

The last ``n mod (B * W)`` images of each epoch's order are left out (``drop_last``), as the
official code's ``drop_last=True`` loaders do.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import torch
from torch.utils.data import Sampler

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part and its position (splitmix64 chained): close
    parts (epoch 3 vs 4, image 17 vs 18) give unrelated seeds."""
    state = 0
    for part in parts:
        state = _splitmix64(state ^ (int(part) & _MASK64))
    return state >> 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of image ``index``'s augmentation (its crops, flips, colours) in ``epoch``."""
    return mix_seed(seed, epoch, index)


class SampleKey(NamedTuple):
    """A data set index with the seed of that sample's randomness."""

    index: int
    seed: int


class TrainSampler(Sampler[SampleKey]):
    """Shuffled, sharded, resumable training order of ``num_samples`` images (see the module
    docstring).

    Args:
        num_samples: images in the training split.
        batch_size: batch per process.
        seed: the run's seed (order and augmentation).
        rank, world_size: this process and the number of processes.

    ``set_epoch(e)`` (Lightning calls it before every epoch) picks the epoch; without it each new
    iteration moves on to the next epoch. ``len()`` is the number of samples of a whole epoch for
    this process, also when the iteration resumes mid-epoch (Lightning counts an epoch's batches
    from ``len()`` and the batches it already ran).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if num_samples < 1 or batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"TrainSampler(num_samples={num_samples}, batch_size={batch_size}, rank={rank}, "
                             f"world_size={world_size}): need num_samples, batch_size, world_size >= 1 and "
                             "0 <= rank < world_size")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.batches_per_epoch = self.num_samples // (self.batch_size * self.world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{self.num_samples} training images are fewer than one global batch of {self.batch_size} x "
                f"{self.world_size} processes = {self.batch_size * self.world_size}: lower data.batch_size "
                "(or add images)")
        self.epoch = 0
        self._epoch_set = False
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._epoch_set = True

    def resume_at(self, batches_done: int) -> None:
        """Continue after ``batches_done`` batches per process counted from the start of epoch 0
        (a checkpoint's optimizer steps times the accumulated batches per step): the epoch and
        the batch within it follow from the epoch length."""
        epoch, skip = divmod(int(batches_done), self.batches_per_epoch)
        self.epoch, self._epoch_set = epoch, True
        self._resume = (epoch, skip)

    def epoch_order(self, epoch: int) -> list[int]:
        """All image indices of ``epoch`` in visiting order (every process's share)."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def indices(self, epoch: int, start_batch: int = 0) -> list[int]:
        """This process's image indices of ``epoch`` from batch ``start_batch`` on."""
        order = self.epoch_order(epoch)
        per_process, per_step = self.batch_size, self.batch_size * self.world_size
        mine: list[int] = []
        for batch in range(start_batch, self.batches_per_epoch):
            first = batch * per_step + self.rank * per_process
            mine.extend(order[first:first + per_process])
        return mine

    def __iter__(self) -> Iterator[SampleKey]:
        epoch = self.epoch
        skip = 0
        if self._resume is not None and self._resume[0] == epoch:
            skip = self._resume[1]
        self._resume = None
        if not self._epoch_set:  # used outside Lightning: the next iteration is the next epoch
            self.epoch += 1
        self._epoch_set = False
        keys = [SampleKey(index, sample_seed(self.seed, epoch, index)) for index in self.indices(epoch, skip)]
        return iter(keys)
