"""Suite-wide test settings: the default suite runs on the CPU; GPU tests are opt-in.

Without ``SSL_VIT_GPU_TESTS=1`` the GPU is hidden from the test process, so the suite gives the
same results (and the same determinism) on a GPU workstation as on a laptop or CI, and tests
marked ``gpu`` are skipped. With ``SSL_VIT_GPU_TESTS=1`` (run them as
``SSL_VIT_GPU_TESTS=1 python -m pytest -m gpu``) the ``gpu`` tests run, and fail, rather than
skip, where no CUDA device is visible: a GPU check that silently did nothing would read as a pass.
"""
from __future__ import annotations

import os

import pytest

GPU_TESTS = os.environ.get("SSL_VIT_GPU_TESTS", "") == "1"

if not GPU_TESTS:
    # Set before anything initialises CUDA (torch reads it at its first CUDA call).
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_collection_modifyitems(config, items):
    if GPU_TESTS:
        return
    skip = pytest.mark.skip(reason="GPU test: set SSL_VIT_GPU_TESTS=1 to run it on a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cuda_device():
    """The CUDA device for a ``gpu`` test; a failure (not a skip) where there is none."""
    import torch

    if not torch.cuda.is_available():
        pytest.fail("SSL_VIT_GPU_TESTS=1 but torch sees no CUDA device "
                    f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def seeded_random_state():
    """Every test starts from the same random state (torch, numpy, random), so a test's inputs do
    not depend on which tests ran before it (a ``-k`` selection, a new test file, another order)."""
    import random

    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
