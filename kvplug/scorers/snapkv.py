"""``snapkv``: keep what the last prompt tokens attend to, pooled to keep neighbours.

SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024,
arXiv 2404.14469): the attention of an observation window at the end of the prompt predicts which
tokens generation will need. As the authors' code scores (``SnapKVCluster.update_kv``; kvpress's
``SnapKVPress`` the same): the window's attention over the tokens before it, summed over the
window's queries, average-pooled along the sequence (zero padding, kernel 5) so kept tokens bring
their neighbours, then averaged over a KV head's query heads (the authors' code selects per query
head on MHA models; with GQA a KV head has one kept set, kvpress averages the same way); the
window itself is always kept.

``pool=max`` and ``span=all`` select the variant kvplug ran before it matched the reference
(max-pooling over the whole sequence, window columns included, which lifts the tokens just before
the window; ``snapkv(kernel=7, pool=max, span=all)`` reproduces those numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvplug.attention import group_mean
from kvplug.errors import SpecError
from kvplug.parts import param
from kvplug.scorers.base import ALWAYS, ScoreInputs, Scorer
from kvplug.tokens import TokenCount


@dataclass(frozen=True)
class SnapKV(Scorer):
    """SnapKV: observation-window attention over the prefix, pooled; the window is always kept."""

    name = "snapkv"
    paper = "SnapKV, arXiv 2404.14469"
    budget: TokenCount = param(TokenCount(tokens=1024), doc="tokens kept per head (count or %), the window included")
    window: int = param(32, low=1, high=4096, doc="observation window: last prompt tokens whose attention is used")
    kernel: int = param(5, low=1, high=63, doc="pool width along the sequence (odd)")
    pool: str = param("avg", choices=("avg", "max"), doc="pooling: avg (the authors' default, kvpress) or max")
    span: str = param("prefix", choices=("prefix", "all"),
                      doc="what is pooled: the tokens before the window (reference) or all, window included")

    def __post_init__(self):
        super().__post_init__()
        if self.kernel % 2 == 0:
            raise SpecError(f"snapkv: kernel={self.kernel} must be odd")

    @property
    def observation_window(self) -> int:
        return self.window

    def kept_tokens(self, present: int) -> int:
        return self.budget.resolve(present)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        w = inputs.queries.shape[2]
        attn = group_mean(inputs.window_probs.sum(2), inputs.num_kv_heads)  # [B, Hkv, T]
        b, h, t = attn.shape
        n = max(t - w, 0) if self.span == "prefix" else t
        pool = F.avg_pool1d if self.pool == "avg" else F.max_pool1d
        scores = torch.zeros_like(attn)
        if n:  # pooling is linear for avg, so the group mean may come first
            scores[..., :n] = pool(attn[..., :n].reshape(b * h, 1, n), self.kernel, stride=1,
                                   padding=self.kernel // 2).reshape(b, h, n)
        in_window = torch.arange(t, device=attn.device) >= t - w
        return inputs.finish(torch.where(in_window, ALWAYS, scores))
