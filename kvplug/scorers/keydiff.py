"""``keydiff``: keep the keys least like the layer's average key.

KeyDiff ("KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM
Inference in Resource-Constrained Environments", arXiv 2504.15364): tokens whose keys point in
the same direction as most keys carry little that the others do not, so each KV head ranks its
tokens by the negative cosine similarity between the key and the anchor (the mean of the
unit-normalised keys of the prompt) and keeps the most distinctive. Needs neither queries nor
attention weights. As kvpress's ``KeyDiffPress`` it scores the whole prompt at once (the paper
also runs it block by block while prefilling in chunks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvplug.parts import param
from kvplug.scorers.base import ScoreInputs, Scorer
from kvplug.tokens import TokenCount


@dataclass(frozen=True)
class KeyDiff(Scorer):
    """KeyDiff: the keys least similar to the mean key direction are kept."""

    name = "keydiff"
    paper = "KeyDiff, arXiv 2504.15364"
    budget: TokenCount = param(TokenCount(tokens=1024), doc="tokens kept per head (count or %)")

    def kept_tokens(self, present: int) -> int:
        return self.budget.resolve(present)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        keys = inputs.keys.float()
        valid = inputs.valid[:, None, :, None]  # [B, 1, T, 1]
        unit = F.normalize(keys, p=2, dim=-1) * valid
        anchor = unit.sum(2, keepdim=True) / valid.sum(2, keepdim=True).clamp(min=1)  # [B, H, 1, D]
        return inputs.finish(-F.cosine_similarity(keys, anchor, dim=-1))
