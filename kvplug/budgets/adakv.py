"""``adakv``: one budget per layer, shared among its heads by score.

Ada-KV (Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
Efficient LLM Inference", arXiv 2407.11550): heads differ in how concentrated their attention is,
so the layer's budget (``budget x heads``) goes to the highest scores across all heads, with a
safeguard of ``floor(alpha x budget)`` tokens, at least one when ``alpha > 0`` (as the authors'
code and kvpress's ``AdaKVPress``), guaranteed to every head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug.budgets.base import Budget, ranks, top_per_head
from kvplug.parts import param


@dataclass(frozen=True)
class AdaKV(Budget):
    """Ada-KV: head-adaptive budgets within each layer, with a per-head floor."""

    name = "adakv"
    paper = "Ada-KV, arXiv 2407.11550"
    alpha: float = param(0.2, low=0.0, high=1.0, doc="share of the budget guaranteed to each head")

    def allocate(self, scores: torch.Tensor, kept: torch.Tensor, layer_idx: int, num_layers: int) -> torch.Tensor:
        b, h, t = scores.shape
        floor = torch.floor(kept.float() * self.alpha).long()
        if self.alpha > 0:
            floor = torch.minimum(floor.clamp(min=1), kept)
        guaranteed = top_per_head(scores, floor)
        rest = scores.masked_fill(guaranteed, float("-inf")).reshape(b, 1, h * t)
        extra = (kept * h - floor * h).clamp(min=0)
        shared = (ranks(rest) < extra.view(b, 1, 1)) & (rest > float("-inf"))
        return guaranteed | shared.reshape(b, h, t)
