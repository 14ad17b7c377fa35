"""``scissorhands``: drop the tokens that have most often been unimportant.

Scissorhands (Liu et al., "Scissorhands: Exploiting the Persistence of Importance Hypothesis for
LLM KV Cache Compression at Test Time", NeurIPS 2023, arXiv 2305.17118): a token that received
little attention in the past keeps receiving little, so the cache counts, per token, how many of
the recent queries gave it less than the uniform share of attention (``threshold / n`` for a query
that sees ``n`` tokens) and evicts the tokens with the highest count; the most recent tokens are
never evicted (``recent_ratio`` of the budget). At prefill the count runs over the last ``window``
prompt queries; while generating, each step's query adds to it and the token with the highest
count is replaced by the new one (a new token starts at zero).

Attention is the mean over a KV head's query heads (kvplug keeps one set per KV head). The
paper's count runs over a sliding history window; here it accumulates over the whole
generation (a per-slot window would need every slot's last ``window`` attentions), which
favours newer tokens a little more: they have had fewer chances to be counted. The paper
compresses in bursts when the cache fills; kvplug replaces one token per step. While generating,
a slot counts as seen by the step where its attention is above zero (a float32 softmax underflows
only for logits about 100 below the step's largest).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug.attention import group_mean
from kvplug.parts import param
from kvplug.scorers.base import KeepsRecentShare, ScoreInputs, Scorer
from kvplug.tokens import TokenCount


def unimportant(probs: torch.Tensor, visible: torch.Tensor, threshold: float) -> torch.Tensor:
    """Where a query gave a visible token less than ``threshold`` times the uniform share:
    ``probs`` and ``visible`` ``[..., Q, T]`` -> bool ``[..., Q, T]``."""
    n = visible.sum(-1, keepdim=True).clamp(min=1)
    return visible & (probs < threshold / n)


@dataclass(frozen=True)
class Scissorhands(KeepsRecentShare, Scorer):
    """Scissorhands: evict the tokens most often below the uniform attention share; keep the newest."""

    name = "scissorhands"
    paper = "Scissorhands, arXiv 2305.17118"
    evicts_on_decode = True
    decode_on_device = True
    needs_decode_attention = True
    budget: TokenCount = param(TokenCount(tokens=1024), doc="tokens kept per head (count or %)")
    window: int = param(32, low=1, high=4096, doc="prompt queries whose attention is counted at prefill")
    recent_ratio: float = param(0.1, low=0.0, high=1.0, doc="share of the budget kept as the newest tokens")
    threshold: float = param(1.0, low=0.0, high=1e6, doc="a token is unimportant below this times 1/n (n visible)")

    @property
    def observation_window(self) -> int:
        return self.window

    def kept_tokens(self, present: int) -> int:
        return self.budget.resolve(present)

    def running_scores(self, inputs: ScoreInputs) -> torch.Tensor:
        probs = group_mean(inputs.window_probs, inputs.num_kv_heads)  # [B, Hkv, W, T]
        w, t = probs.shape[-2:]
        causal = torch.arange(t, device=probs.device)[None, :] <= torch.arange(t - w, t, device=probs.device)[:, None]
        visible = causal[None, None] & inputs.valid[:, None, None, :]
        return -unimportant(probs, visible, self.threshold).sum(-2).float()

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return self.keep_recent(inputs, self.running_scores(inputs))

    def decode_update(self, scores: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
        return scores - unimportant(probs, probs > 0, self.threshold).float()
