"""``h2o``: heavy hitters (most attended tokens) plus recent tokens.

H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023, arXiv 2306.14048): a small set of tokens receives most of the attention;
keeping those (by accumulated attention) and the most recent ones preserves quality. Scores keep
accumulating while generating and the least attended old token is evicted at each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug.attention import group_mean
from kvplug.parts import param
from kvplug.scorers.base import KeepsRecentShare, ScoreInputs, Scorer
from kvplug.tokens import TokenCount


@dataclass(frozen=True)
class H2O(KeepsRecentShare, Scorer):
    """H2O: keep the tokens with the most accumulated attention plus the most recent ones."""

    name = "h2o"
    paper = "H2O, arXiv 2306.14048"
    needs_all_queries = True
    evicts_on_decode = True
    decode_on_device = True
    needs_decode_attention = True
    budget: TokenCount = param(TokenCount(tokens=1024), doc="tokens kept per head (count or %)")
    recent_ratio: float = param(0.5, low=0.0, high=1.0, doc="share of the budget kept as recent tokens")

    def kept_tokens(self, present: int) -> int:
        return self.budget.resolve(present)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return self.keep_recent(inputs, group_mean(inputs.accumulated, inputs.num_kv_heads))

    def running_scores(self, inputs: ScoreInputs) -> torch.Tensor:
        return group_mean(inputs.accumulated, inputs.num_kv_heads)

    def decode_update(self, scores: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
        return scores + probs
