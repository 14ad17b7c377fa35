"""``curdkv``: keep the tokens whose keys and values carry the most energy within their neighbourhood.

CurDKV ("Value-Guided KV Compression for LLMs via Approximated CUR Decomposition", arXiv
2509.15038): the tokens a CUR decomposition of the key and value matrices would pick as rows are
the high-leverage ones, and a row's squared norm is a cheap stand-in for its leverage. Each token's
squared key norm ``|k|^2`` and squared value norm ``|v|^2`` are normalised within windows of
``local_window`` consecutive tokens (the share of its window's energy: the local approximation, so
a long prompt's loud stretches do not take the whole budget), combined by ``leverage``
(``kv_product`` by default: ``|k|^2 |v|^2``; ``key``, ``value`` or their mean ``kv_avg``),
normalised to sum to one per head, and the first ``sinks`` tokens are always kept. Query-free and
attention-free, so it runs on prompts of any length at the cost of two norms.

As kvpress's ``CURPress`` with its defaults (4 sinks, ``kv_product``, windows of 16). Differences:
windows start at each prompt's first real token (kvpress has no padding), and the paper's random
Gaussian projection of K and V before the norms (kvpress ``use_random_leverage``, off by default)
is not offered: its draw would make the kept set depend on a random state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvplug.parts import param
from kvplug.scorers.base import ALWAYS, ScoreInputs, Scorer
from kvplug.tokens import TokenCount


def _window_share(x: torch.Tensor, window: int) -> torch.Tensor:
    """``x`` ``[H, n]`` -> each entry's share of the sum over its window of ``window`` entries."""
    h, n = x.shape
    pad = (window - n % window) % window
    blocks = F.pad(x, (0, pad)).reshape(h, -1, window)
    return (blocks / blocks.sum(-1, keepdim=True).clamp(min=1e-30)).reshape(h, -1)[:, :n]  # an all-zero window: 0


@dataclass(frozen=True)
class CurDKV(Scorer):
    """CurDKV: tokens ranked by their keys' and values' squared norms within local windows."""

    name = "curdkv"
    paper = "CurDKV, arXiv 2509.15038"
    budget: TokenCount = param(TokenCount(tokens=1024), doc="tokens kept per head (count or %), sinks included")
    sinks: int = param(4, low=0, high=1 << 20, doc="first tokens always kept")
    leverage: str = param("kv_product", choices=("kv_product", "kv_avg", "key", "value"),
                          doc="how key and value energy combine: product, mean, keys only or values only")
    local_window: int = param(16, low=0, high=1 << 16,
                              doc="tokens a norm is normalised over (0: the whole prompt, no local approximation)")

    def kept_tokens(self, present: int) -> int:
        return self.budget.resolve(present)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.by_row(lambda row, first, n: self._score_row(inputs.keys[row, :, first:].float(),
                                                                   inputs.values[row, :, first:].float()))

    def _score_row(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``[H, n, D]`` K/V of one prompt -> scores ``[H, n]``."""
        k2, v2 = keys.square().sum(-1), values.square().sum(-1)
        if self.local_window:
            k2, v2 = _window_share(k2, self.local_window), _window_share(v2, self.local_window)
        score = {"kv_product": lambda: k2 * v2, "kv_avg": lambda: (k2 + v2) / 2,
                 "key": lambda: k2, "value": lambda: v2}[self.leverage]()
        score = score / score.sum(-1, keepdim=True).clamp(min=1e-30)
        score[:, :self.sinks] = ALWAYS
        return score
