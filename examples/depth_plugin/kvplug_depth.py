"""A third-party kvplug plugin: a per-layer method in a few lines.

``depth(full=N, sinks=4, window=25%)`` keeps the whole cache in the first ``full`` layers and only
attention sinks + a recent window in the deeper ones (where attention is often local). It is
declared once and runs wherever kvplug runs a scorer: ``kvplug.hf.cache(model, "depth(full=2)")``.

Install it as a distribution with this entry point (see ``pyproject.toml`` beside this file):

    [project.entry-points.kvplug]
    depth = "kvplug_depth"
"""

from __future__ import annotations

from dataclasses import dataclass

from kvplug.hookspecs import hookimpl
from kvplug.parts import param
from kvplug.scorers.base import ScoreInputs, Scorer
from kvplug.scorers.streaming import Streaming
from kvplug.tokens import TokenCount


@dataclass(frozen=True)
class Depth(Scorer):
    """Full cache in the first `full` layers, sinks + recent window in the others."""

    name = "depth"
    paper = "example plugin"
    evicts_on_decode = True  # its deeper layers do
    full: int = param(2, low=0, high=1024, doc="first layers that keep every token")
    sinks: int = param(4, low=0, doc="first tokens the deeper layers keep")
    window: TokenCount = param(TokenCount(fraction=0.25), doc="recent tokens the deeper layers keep")

    def kept_tokens(self, present: int) -> int:
        return present  # an upper bound: the first layers keep everything

    def for_layer(self, inputs: ScoreInputs) -> Scorer | None:
        if inputs.layer_idx < self.full:
            return None  # keep every token
        return Streaming(sinks=self.sinks, window=self.window)


@hookimpl
def kvplug_parts() -> list[type]:
    return [Depth]
