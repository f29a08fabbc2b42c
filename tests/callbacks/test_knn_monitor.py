"""When the k-NN monitor evaluates: every n optimizer steps, on rank zero, and not at the last
step when the run's own final k-NN follows."""
from types import SimpleNamespace

import pytest

from ssl_vit.callbacks.knn import KNNMonitor


class RecordingMonitor(KNNMonitor):
    def __init__(self, **kwargs):
        super().__init__(datamodule=None, **kwargs)
        self.evaluated_at = []

    def evaluate(self, trainer, pl_module):
        self.evaluated_at.append(trainer.global_step)


def steps_evaluated(monitor, max_steps, rank_zero=True):
    for step in range(1, max_steps + 1):  # global_step after each optimizer step
        trainer = SimpleNamespace(global_step=step, max_steps=max_steps, is_global_zero=rank_zero)
        monitor.on_train_batch_end(trainer, None, None, None, step - 1)
    return monitor.evaluated_at


@pytest.mark.parametrize("skip_last_step, expected", [(False, [40, 80, 120]), (True, [40, 80])])
def test_every_n_steps_and_the_last_step(skip_last_step, expected):
    assert steps_evaluated(RecordingMonitor(every_n_steps=40, skip_last_step=skip_last_step), 120) == expected


def test_a_last_step_off_the_grid_is_not_evaluated_and_other_ranks_never_are():
    assert steps_evaluated(RecordingMonitor(every_n_steps=40, skip_last_step=True), 100) == [40, 80]
    assert steps_evaluated(RecordingMonitor(every_n_steps=40), 120, rank_zero=False) == []
    assert steps_evaluated(RecordingMonitor(every_n_steps=0), 120) == []
