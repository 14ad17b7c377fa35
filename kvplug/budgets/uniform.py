"""``uniform``: every layer and head keeps the same number of tokens (the default)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug.budgets.base import Budget, top_per_head


@dataclass(frozen=True)
class Uniform(Budget):
    """Same budget for every layer and KV head."""

    name = "uniform"
    paper = "default"
    fixed_counts = True
    same_in_every_layer = True

    def allocate(self, scores: torch.Tensor, kept: torch.Tensor, layer_idx: int, num_layers: int) -> torch.Tensor:
        return top_per_head(scores, kept)
