"""``snapkv``: keep what the last prompt tokens attend to, pooled to keep neighbours.

SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024,
arXiv 2404.14469): the attention of an observation window at the end of the prompt predicts which
tokens generation will need. Scores are that attention summed over the window, averaged over a
KV head's query heads, then max-pooled along the sequence so kept tokens bring their context; the
window itself is always kept.
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
    """SnapKV: observation-window attention, max-pooled; the window is always kept."""

    name = "snapkv"
    paper = "SnapKV, arXiv 2404.14469"
    budget: TokenCount = param(TokenCount(tokens=1024), doc="tokens kept per head (count or %)")
    window: int = param(32, low=1, high=4096, doc="observation window: last prompt tokens whose attention is used")
    kernel: int = param(7, low=1, high=63, doc="max-pool width along the sequence (odd)")

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
        pooled = F.max_pool1d(attn.reshape(b * h, 1, t), self.kernel, stride=1, padding=self.kernel // 2)
        scores = pooled.reshape(b, h, t)
        in_window = torch.arange(t, device=attn.device) >= t - w
        return inputs.finish(torch.where(in_window, ALWAYS, scores))
