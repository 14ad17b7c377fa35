"""Orthonormal Hadamard rotation of the head dimension.

Rotating K (and Q by the same matrix) leaves q.k unchanged while spreading outlier channels over
all channels, so per-token low-bit quantization loses less (QuaRot, Ashkboos et al. 2024,
arXiv 2404.00456; SpinQuant, arXiv 2405.16406).
"""

from __future__ import annotations

import functools

import torch

from kvplug.errors import SpecError


@functools.lru_cache(maxsize=16)
def _hadamard(n: int, device: str) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(device=device, dtype=torch.float32)


def hadamard(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The symmetric orthonormal ``n x n`` Sylvester-Hadamard matrix (``n`` a power of two)."""
    if n < 1 or n & (n - 1):
        raise SpecError(f"rotate=true needs a power-of-two head_dim, got {n}")
    return _hadamard(n, str(device))


def rotate(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` in float32 along the last axis (``H`` is its own inverse)."""
    return x.float() @ hadamard(x.shape[-1], x.device)
