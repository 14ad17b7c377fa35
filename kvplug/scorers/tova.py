"""``tova``: keep the tokens the current query attends to most.

TOVA (Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104): at each step, drop the
token with the lowest attention from the newest query, averaged over all heads of the layer (one
decision per layer). At prefill the last prompt query ranks the prompt, the last prompt token
itself always kept (``keep_last``, as TOVA's and kvpress's code do: it is the token the next step
attends to most reliably, and dropping it loses the query's own context); while generating, each
new query ranks the cache and the lowest token is evicted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug.parts import param
from kvplug.scorers.base import ALWAYS, ScoreInputs, Scorer
from kvplug.tokens import TokenCount


@dataclass(frozen=True)
class Tova(Scorer):
    """TOVA: evict the token least attended by the newest query (mean over the layer's heads)."""

    name = "tova"
    paper = "TOVA, arXiv 2401.06104"
    evicts_on_decode = True
    decode_on_device = True
    needs_decode_attention = True
    budget: TokenCount = param(TokenCount(tokens=1024), doc="tokens kept per head (count or %)")
    keep_last: bool = param(True, doc="always keep the last prompt token at prefill (TOVA's and kvpress's code)")

    @property
    def observation_window(self) -> int:
        return 1

    def kept_tokens(self, present: int) -> int:
        return self.budget.resolve(present)

    def running_scores(self, inputs: ScoreInputs) -> torch.Tensor:
        """The last prompt query's attention (finite: ``keep_last`` holds at prefill only, so the
        first generated token may replace the last prompt token if it ranks lowest)."""
        return inputs.finish(inputs.window_probs[:, :, -1, :].mean(1, keepdim=True))  # [B, 1, T]

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        last = self.running_scores(inputs)
        if self.keep_last:  # prompts are left-padded: the last column is every row's last token
            last = last.clone()
            last[..., -1] = ALWAYS
        return last

    def decode_update(self, scores: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
        return probs.mean(1, keepdim=True).expand_as(scores).clone()
