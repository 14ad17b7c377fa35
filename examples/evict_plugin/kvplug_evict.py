"""A third-party kvplug plugin: two eviction methods declared once, run by both engines.

``recent(window=N)`` keeps only the newest ``N`` tokens, the prompt's and then the generated ones
(window attention, the baseline StreamingLLM compares its sinks with): it evicts by position.
``ema(budget=N, decay=0.9, window=8)`` keeps the ``N`` tokens with the highest exponential moving
average of the attention they receive: at prefill the mean attention of the last ``window`` prompt
queries, then every generated token's attention, ``score = decay * score + attention``; the token
with the lowest average is replaced by the new one. It evicts by score.

Neither names an engine. What the engines need they read from what the classes declare:
``placement`` ("window": sinks plus a recent window, known from the prompt length; "select": a
prompt-time selection whose lowest-ranked slot a generated token replaces), ``evicts_on_decode``
and ``needs_decode_attention``, ``sinks_and_window`` for the first, ``decode_update`` and
``new_token_score`` for the second, and ``decode_on_device`` (those methods are tensor operations
alone, so HF's CUDA-graph decode may replay them). So ``kvplug.hf.cache(model, "ema(budget=256)+int4")`` and
``vllm serve MODEL --additional-config '{"kvplug": "recent(window=512)"}'`` work as they do for
kvplug's own parts, and vLLM frees the blocks the evicted tokens leave.

Install it as a distribution with this entry point (``pyproject.toml`` beside this file):

    [project.entry-points.kvplug]
    evict = "kvplug_evict"
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug.attention import group_mean
from kvplug.hookspecs import hookimpl
from kvplug.parts import param
from kvplug.scorers.base import ScoreInputs, Scorer
from kvplug.tokens import TokenCount


@dataclass(frozen=True)
class Recent(Scorer):
    """Only the newest tokens (window attention, no sinks)."""

    name = "recent"
    paper = "example plugin (window attention)"
    evicts_on_decode = True
    decode_on_device = True  # its decode-time methods are tensor ops alone: a CUDA graph may replay them
    placement = "window"
    window: TokenCount = param(TokenCount(tokens=256), doc="newest tokens kept (count or % of the prompt)")

    def kept_tokens(self, present: int) -> int:
        return self.window.resolve(present)

    def sinks_and_window(self, present: int) -> tuple[int, int]:
        return 0, self.kept_tokens(present)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.finish(inputs.positions.float()[:, None, :])  # newer ranks higher

    def new_token_score(self, step: torch.Tensor) -> torch.Tensor:
        return step.float()  # the oldest slot is the lowest: it goes first


@dataclass(frozen=True)
class Ema(Scorer):
    """Tokens ranked by a moving average of the attention they receive."""

    name = "ema"
    paper = "example plugin"
    evicts_on_decode = True
    decode_on_device = True
    needs_decode_attention = True
    budget: TokenCount = param(TokenCount(tokens=256), doc="tokens kept per head (count or %)")
    decay: float = param(0.9, low=0.0, high=1.0, doc="weight of the past in the moving average")
    window: int = param(8, low=1, high=4096, doc="last prompt queries whose attention starts the average")

    @property
    def observation_window(self) -> int:
        return self.window

    def kept_tokens(self, present: int) -> int:
        return self.budget.resolve(present)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.finish(group_mean(inputs.window_probs.mean(2), inputs.num_kv_heads))

    def decode_update(self, scores: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
        return self.decay * scores + probs


@hookimpl
def kvplug_parts() -> list[type]:
    return [Recent, Ema]
