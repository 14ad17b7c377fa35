"""The budget contract: turn scores into a kept set for one layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvplug.parts import Part


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last axis, 0 for the highest score (ties: earlier first)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    arange = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, arange)


def top_per_head(scores: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Keep the ``kept`` (``[B]`` or ``[B, H]``) highest-scoring tokens of each head."""
    kept = kept.view(kept.shape[0], -1, 1)
    return (ranks(scores) < kept) & (scores > float("-inf"))


@dataclass(frozen=True)
class Budget(Part):
    """Splits a per-head token budget over layers and heads."""

    kind: ClassVar[str] = "budget"
    fixed_counts: ClassVar[bool] = False
    """Whether every head of a layer keeps a count fixed by the prompt length and the layer alone
    (not by the scores), so an adapter can place the kept tokens before seeing them (vLLM)."""
    same_in_every_layer: ClassVar[bool] = False
    """Whether that count is the same in every layer."""

    def allocate(self, scores: torch.Tensor, kept: torch.Tensor, layer_idx: int, num_layers: int) -> torch.Tensor:
        """Kept mask ``[B, Hkv, T]`` given scores and the mean tokens per head ``kept`` ``[B]``."""
        raise NotImplementedError
