import os

import pytest
import torch

# Tests must not depend on how many cores the machine has, and must not fight over them.
torch.set_num_threads(int(os.environ.get("DALLE_TEST_THREADS", min(2, os.cpu_count() or 1))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
