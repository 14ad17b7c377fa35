"""``pyramid``: lower layers keep more tokens, upper layers fewer, same total.

PyramidKV (Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling", arXiv 2406.02069): attention spreads widely in lower layers and concentrates in upper
ones, so budgets decrease linearly with depth. The top layer keeps ``budget / beta`` tokens, the
bottom one ``2 * budget - budget / beta``, so the mean over layers stays ``budget``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug.budgets.base import Budget, top_per_head
from kvplug.parts import param


@dataclass(frozen=True)
class Pyramid(Budget):
    """PyramidKV: budgets decreasing linearly from the first layer to the last."""

    name = "pyramid"
    paper = "PyramidKV, arXiv 2406.02069"
    fixed_counts = True
    beta: float = param(20.0, low=1.0, high=1000.0, doc="top layer keeps budget/beta tokens")

    def layer_budget(self, kept: torch.Tensor, layer_idx: int, num_layers: int) -> torch.Tensor:
        """Tokens per head at ``layer_idx`` for a mean budget ``kept`` (``[B]``)."""
        if num_layers == 1:
            return kept
        low = kept.float() / self.beta
        high = 2 * kept.float() - low
        frac = layer_idx / (num_layers - 1)
        return torch.round(high - (high - low) * frac).long().clamp(min=1)

    def allocate(self, scores: torch.Tensor, kept: torch.Tensor, layer_idx: int, num_layers: int) -> torch.Tensor:
        return top_per_head(scores, self.layer_budget(kept, layer_idx, num_layers))
