"""What the transform tests share: small test images and one torch thread per test."""
import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Imported by a test module, it applies to each of its tests. Per-image ops on tiny tensors:
    intra-op threads only add overhead (DataLoader workers run with one thread too); under a loaded
    2-core machine, 2 threads made a crop ~30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_rng = np.random.default_rng(0)
GRAY = _rng.integers(0, 256, (28, 28), dtype=np.uint8)
COLOR = _rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
