"""``random``: keep a uniformly random subset, the floor any scorer must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug.parts import param
from kvplug.scorers.base import ScoreInputs, Scorer
from kvplug.tokens import TokenCount


@dataclass(frozen=True)
class RandomScorer(Scorer):
    """Random eviction (a baseline): every token equally likely to be kept."""

    name = "random"
    paper = "baseline"
    budget: TokenCount = param(TokenCount(tokens=1024), doc="tokens kept per head (count or %)")
    seed: int = param(0, low=0, doc="seed of the generator (reproducible choices)")

    def kept_tokens(self, present: int) -> int:
        return self.budget.resolve(present)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + inputs.layer_idx)
        b, t = inputs.valid.shape
        scores = torch.rand(b, inputs.num_kv_heads, t, generator=gen).to(inputs.keys.device)
        return inputs.finish(scores)
