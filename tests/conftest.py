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


def write_random_weights(path, part, num_layers: int, num_kv_heads: int, head_dim: int,
                         generator: torch.Generator, **meta) -> str:
    """A weights file of random tensors (scaled by 1/sqrt(fan-in)) for the learned ``part`` class
    (:class:`kvplug.learned.LearnedPart`) on a model of this shape; returns its path."""
    from kvplug import learned

    shapes = part.weight_shapes(num_layers, num_kv_heads, head_dim)
    tensors = {k: torch.randn(shape, generator=generator) / shape[-2] ** 0.5 if len(shape) > 2 else
               torch.randn(shape, generator=generator) * 0.1 for k, shape in shapes.items()}
    learned.save(str(path), part.name, tensors, num_layers=num_layers, num_kv_heads=num_kv_heads,
                 head_dim=head_dim, **{"trained_for": "a random test model", **meta})
    return str(path)


def naive_affine(x, bits):
    """Float64 loop-free reference: per group min/max, fp16 rounding of scale and zero."""
    x = x.double()
    lo, hi = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
    scale = ((hi - lo).float() / (2**bits - 1)).half().double()
    scale[scale == 0] = 1.0
    zero = lo.half().double()
    code = torch.clamp(torch.floor((x.float() - zero.float()).double() / scale + 0.5), 0, 2**bits - 1)
    return code, scale, zero
