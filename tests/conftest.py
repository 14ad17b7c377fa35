"""Shared test setup: fresh random inputs per test, Triton in interpreter mode without a GPU."""

import os

import pytest
import torch

# The Triton kernels run on the CPU through Triton's interpreter when no GPU is present; the
# variable must be set before triton is imported (kvplug.triton_ops imports it lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded freshly for each test (the seed is printed, shown on failure;
    ``KVPLUG_TEST_SEED=N`` replays it)."""
    seed = int(os.environ.get("KVPLUG_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)
