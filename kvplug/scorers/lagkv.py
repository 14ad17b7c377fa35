"""``lagkv``: rank a partition's tokens against the partition after it.

LagKV ("LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are
Important", arXiv 2504.04704): after ``n_sink`` sinks the prompt is cut into partitions of
``lag`` tokens; each partition's keys and values are min-max normalised per channel by the
range of the *next* partition (its lag reference), and a token whose normalised channels spread
more (standard deviation over channels) carries more. The score is the mean of the key and value
spreads, softmaxed within the partition; by default (``cross=false``) only a token's rank within
its partition counts, so every partition keeps the same share. The sinks and the last partition
with the remainder (no reference yet) are always kept, and a prompt shorter than ``n_sink + 2 *
lag`` keeps the sinks and its newest tokens. Query-free and attention-free; as kvpress's
``LagKVPress``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug.parts import param
from kvplug.scorers.base import ScoreInputs, Scorer
from kvplug.tokens import TokenCount


def _spread(x: torch.Tensor, lag: int) -> torch.Tensor:
    """``x`` ``[H, P, lag, D]`` partitions -> ``[H, P - 1, lag]``: each partition but the last,
    normalised by the next one's per-channel range, spread over channels, softmaxed per partition."""
    ref, own = x[:, 1:], x[:, :-1]
    low, high = ref.min(dim=-2, keepdim=True).values, ref.max(dim=-2, keepdim=True).values
    return ((own - low) / (high - low)).std(dim=-1).softmax(dim=-1)


@dataclass(frozen=True)
class LagKV(Scorer):
    """LagKV: tokens ranked by their spread against the next partition's range."""

    name = "lagkv"
    paper = "LagKV, arXiv 2504.04704"
    budget: TokenCount = param(TokenCount(tokens=1024), doc="tokens kept per head (count or %), sinks included")
    n_sink: int = param(4, low=0, high=1 << 20, doc="first tokens always kept")
    lag: int = param(128, low=2, high=1 << 16, doc="partition length (the lag between a partition and its reference)")
    cross: bool = param(False, doc="rank by the softmaxed spread across partitions, not by rank within each")

    def kept_tokens(self, present: int) -> int:
        return self.budget.resolve(present)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.by_row(lambda row, first, n: self._score_row(inputs.keys[row, :, first:].float(),
                                                                   inputs.values[row, :, first:].float()))

    def _score_row(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``[H, n, D]`` K/V of one prompt -> scores ``[H, n]`` in ``[0, 1]``."""
        h, n, d = keys.shape
        score = torch.ones(h, n, device=keys.device)
        sink, lag = self.n_sink, self.lag
        if n < sink + 2 * lag:  # too short to partition: the sinks, then newer is better
            if n > sink:
                score[:, sink:] = torch.arange(n - sink, device=keys.device) / (n - sink)
            return score
        parts = (n - sink) // lag
        end = sink + parts * lag
        spread = (_spread(keys[:, sink:end].reshape(h, parts, lag, d), lag)
                  + _spread(values[:, sink:end].reshape(h, parts, lag, d), lag)) / 2  # [H, parts - 1, lag]
        if not self.cross:
            spread = spread.argsort(dim=-1).argsort(dim=-1).float() / lag
        score[:, sink:end - lag] = spread.reshape(h, -1)  # the last partition and the rest stay at 1
        return score
