"""The training sampler: order and seeds as functions of (seed, epoch, image), sharded so that
the processes' batches make up the one-process batch, resumable mid-epoch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_vit.data.collate import MultiCropCollator
from ssl_vit.data.masking import BlockMaskGenerator
from ssl_vit.data.sampler import SampleKey, TrainSampler, mix_seed, sample_seed


def batches(sampler: TrainSampler) -> list[list[SampleKey]]:
    keys = list(sampler)
    return [keys[i:i + sampler.batch_size] for i in range(0, len(keys), sampler.batch_size)]


def test_two_processes_split_each_one_process_batch_in_order():
    one = batches(TrainSampler(50, batch_size=8, seed=3))
    ranks = [batches(TrainSampler(50, batch_size=4, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 50 // 8
    for k, batch in enumerate(one):
        assert ranks[0][k] + ranks[1][k] == batch  # same images, same seeds, rank 0 first
    assert len({key.index for batch in one for key in batch}) == 48  # no image twice in an epoch


def test_epochs_differ_and_repeat_exactly():
    sampler = TrainSampler(40, batch_size=8, seed=1)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == epoch0
    assert [k.index for k in epoch0] != [k.index for k in epoch1]
    # An image's seed depends on the epoch: cropped anew each epoch.
    seeds = {k.index: k.seed for k in epoch0}
    assert all(seeds[k.index] != k.seed for k in epoch1)
    assert all(k.seed == sample_seed(1, 0, k.index) for k in epoch0)


def test_without_set_epoch_each_iteration_is_the_next_epoch():
    sampler = TrainSampler(40, batch_size=8, seed=1)
    first, second = list(sampler), list(sampler)
    reference = TrainSampler(40, batch_size=8, seed=1)
    reference.set_epoch(1)
    assert second == list(reference) and first != second


@pytest.mark.parametrize("done", [0, 3, 5, 7, 12])
def test_resume_continues_where_the_batches_stopped(done):
    whole = TrainSampler(43, batch_size=4, seed=7, rank=1, world_size=2)  # 5 batches per epoch
    stream = []
    for epoch in range(3):
        whole.set_epoch(epoch)
        stream += batches(whole)
    resumed = TrainSampler(43, batch_size=4, seed=7, rank=1, world_size=2)
    resumed.resume_at(done)
    epoch = resumed.epoch
    continued = batches(resumed)  # the rest of the epoch ...
    while len(continued) + done < len(stream):
        epoch += 1
        resumed.set_epoch(epoch)
        continued += batches(resumed)  # ... then whole epochs
    assert continued == stream[done:]
    assert len(resumed) == 5 * 4  # an epoch's length, also when resumed mid-epoch


def test_too_few_images_for_one_global_batch_is_refused():
    with pytest.raises(ValueError, match="fewer than one global batch of 8 x 2 processes = 16"):
        TrainSampler(15, batch_size=8, world_size=2)


def test_mixed_seeds_are_distinct_and_positional():
    seeds = {mix_seed(0, e, i) for e in range(20) for i in range(200)}
    assert len(seeds) == 20 * 200 and all(0 <= s < 2**63 for s in seeds)
    assert mix_seed(1, 2) != mix_seed(2, 1)


def test_masks_are_a_function_of_the_batch_seeds():
    collator = MultiCropCollator(BlockMaskGenerator((4, 4)), mask_probability=0.5, seed=0)
    crops = [torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)]
    batch = [(crops, 0, s) for s in (11, 12, 13, 14)]
    first, again = collator(batch)["masks"], collator(batch)["masks"]
    assert torch.equal(first, again)  # no generator history
    other = collator([(crops, 0, s) for s in (21, 22, 23, 24)])["masks"]
    assert not torch.equal(first, other)
    assert int(first.any(dim=1).sum()) == 4  # half of the 8 global crops masked, as before
    with pytest.raises(ValueError, match="3 of the 4 samples carry a seed"):
        collator(batch[:3] + [(crops, 0)])
    assert np.array_equal(collator.batch_rng([1, 2]).random(3), collator.batch_rng([1, 2]).random(3))
