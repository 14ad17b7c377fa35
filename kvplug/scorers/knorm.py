"""``knorm``: keep the keys with the smallest L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
EMNLP 2024, arXiv 2406.11430: low-norm keys draw high attention, so the norm alone ranks tokens,
with no attention statistics at all (works with any attention kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug.parts import param
from kvplug.scorers.base import ScoreInputs, Scorer
from kvplug.tokens import TokenCount


@dataclass(frozen=True)
class KNorm(Scorer):
    """K-norm: keep the tokens whose keys have the lowest L2 norm."""

    name = "knorm"
    paper = "K-norm, arXiv 2406.11430"
    budget: TokenCount = param(TokenCount(tokens=1024), doc="tokens kept per head (count or %)")

    def kept_tokens(self, present: int) -> int:
        return self.budget.resolve(present)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.finish(-inputs.keys.float().norm(dim=-1))
