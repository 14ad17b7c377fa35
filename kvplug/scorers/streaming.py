"""``streaming``: attention sinks plus a recent window.

StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
arXiv 2309.17453): the first few tokens absorb attention mass and must stay; with them, a window
of the most recent tokens suffices for stable generation. The footprint stays at
``sinks + window`` tokens while generating.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug.parts import param
from kvplug.scorers.base import ALWAYS, ScoreInputs, Scorer
from kvplug.tokens import TokenCount


class RecentFirst:
    """The decode-time policy of sinks plus a recent window, for a scorer with ``sinks``: slots
    rank by position (the oldest goes first when a head is full), the first ``sinks`` never go."""

    def running_scores(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.positions.float()[:, None, :].expand(-1, inputs.num_kv_heads, -1)

    def new_token_score(self, step: torch.Tensor) -> torch.Tensor:
        return step.float()

    def protected(self, positions: torch.Tensor, step: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
        return positions < self.sinks


@dataclass(frozen=True)
class Streaming(RecentFirst, Scorer):
    """StreamingLLM: keep the first `sinks` tokens and the `window` most recent."""

    name = "streaming"
    paper = "StreamingLLM, arXiv 2309.17453"
    evicts_on_decode = True
    decode_on_device = True
    placement = "window"
    sinks: int = param(4, low=0, high=1 << 20, doc="first tokens always kept")
    window: TokenCount = param(TokenCount(tokens=1020), doc="most recent tokens kept (count or % of the prompt)")

    def kept_tokens(self, present: int) -> int:
        return self.sinks + self.window.resolve(present)

    def sinks_and_window(self, present: int) -> tuple[int, int]:
        capacity = self.kept_tokens(present)
        sinks = min(self.sinks, capacity)
        return sinks, capacity - sinks

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        pos = inputs.positions.float()
        scores = torch.where(inputs.positions < self.sinks, ALWAYS, pos)
        return inputs.finish(scores[:, None, :])
