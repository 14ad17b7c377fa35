"""``simlayerkv``: lazy layers keep only sinks and a recent window, the others keep everything.

SimLayerKV (Zhang et al., "SimLayerKV: A Simple Framework for Layer-Level KV Cache Reduction",
arXiv 2410.13846): in some layers the last prompt tokens put nearly all their attention on the
first few tokens and the most recent ones. Such a "lazy" layer loses little when it keeps only
those (as StreamingLLM does, also while generating); the other layers keep their full cache.
The decision is taken per layer at prefill, from the attention of the last ``obs`` prompt
queries: lazy when its mean share on the ``sinks`` first and ``window`` last tokens exceeds
``threshold`` (averaged over query heads, observation queries and the sequences of a batch).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvplug.parts import param
from kvplug.scorers.base import ScoreInputs, Scorer
from kvplug.scorers.streaming import Streaming
from kvplug.tokens import TokenCount


@dataclass(frozen=True)
class SimLayerKV(Scorer):
    """SimLayerKV: per layer, sinks + recent window if the layer is lazy, else every token."""

    name = "simlayerkv"
    per_layer = True
    paper = "SimLayerKV, arXiv 2410.13846"
    evicts_on_decode = True  # its lazy layers do (as streaming)
    decode_on_device = True
    threshold: float = param(0.9, low=0.0, high=1.0, doc="attention share on sinks + window that makes a layer lazy")
    sinks: int = param(4, low=0, high=1 << 20, doc="first tokens a lazy layer keeps")
    window: TokenCount = param(TokenCount(tokens=1020), doc="recent tokens a lazy layer keeps (count or %)")
    obs: int = param(32, low=1, high=4096, doc="last prompt queries whose attention decides")

    @property
    def observation_window(self) -> int:
        return self.obs

    def kept_tokens(self, present: int) -> int:
        return present  # an upper bound: layers that are not lazy keep everything

    def lazy_share(self, inputs: ScoreInputs) -> float:
        """Mean attention share of the observation queries on the first ``sinks`` and the last
        ``window`` tokens of each sequence."""
        present = inputs.valid.sum(-1, keepdim=True)
        window = [self.window.resolve(int(n)) for n in present.flatten().tolist()]
        recent = inputs.positions >= present - present.new_tensor(window).view_as(present)
        kept = inputs.valid & ((inputs.positions < self.sinks) | recent)  # [B, T]
        return float((inputs.window_probs * kept[:, None, None, :]).sum(-1).mean().detach())

    def for_layer(self, inputs: ScoreInputs) -> Scorer | None:
        if self.lazy_share(inputs) > self.threshold:
            return Streaming(sinks=self.sinks, window=self.window)
        return None
