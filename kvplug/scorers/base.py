"""The scorer contract: rank a layer's tokens at prefill, and optionally keep ranking at decode.

Scores are ``[B, Hkv, T]``; ``+inf`` marks tokens that must be kept (sinks, recent window),
``-inf`` tokens that never are (padding). The budget part turns scores into a kept set.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvplug.attention import accumulated_attention, window_attention
from kvplug.parts import Part
from kvplug.rope import Rope

NEVER = float("-inf")
ALWAYS = float("inf")


@dataclass(eq=False)
class ScoreInputs:
    """What a scorer may look at for one layer at prefill (tensors only, no engine objects).

    ``queries`` holds the last ``observation_window`` prompt queries ``[B, Hq, W, D]`` (all of
    them when the scorer needs accumulated attention); ``valid`` ``[B, T]`` is False on padding.
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    valid: torch.Tensor
    scale: float
    layer_idx: int = 0
    num_layers: int = 1
    rope: Rope | None = None  # the model's rotary embedding, where the adapter knows it (needs_rope)
    out_proj: torch.Tensor | None = None
    """The layer's attention output projection weight ``[hidden, Hq * D]`` (``o_proj``), where the
    adapter knows it (``needs_out_proj``): query head ``h`` writes ``out_proj[:, h * D:(h + 1) * D] @ o_h``."""

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @functools.cached_property
    def positions(self) -> torch.Tensor:
        """Index of each token among its row's valid tokens ``[B, T]`` (-1 on padding)."""
        return torch.where(self.valid, self.valid.long().cumsum(-1) - 1, -1)

    @functools.cached_property
    def window_probs(self) -> torch.Tensor:
        """Causal attention of the observation-window queries over all tokens ``[B, Hq, W, T]``."""
        return window_attention(self.queries, self.keys, self.valid, self.scale)

    @functools.cached_property
    def accumulated(self) -> torch.Tensor:
        """Attention received by each token, summed over all prompt queries ``[B, Hq, T]``."""
        return accumulated_attention(self.queries, self.keys, self.valid, self.scale)

    def by_row(self, score_row) -> torch.Tensor:
        """Scores ``[B, Hkv, T]`` from ``score_row(row, first, n)`` -> ``[Hkv, n]``, the scores of
        one prompt's ``n`` real tokens (prompts are left-padded: columns ``first = T - n ..``);
        padding never kept, finished as :meth:`finish`."""
        b, h, t, _ = self.keys.shape
        out = torch.full((b, h, t), NEVER, dtype=torch.float32, device=self.keys.device)
        for row in range(b):
            n = int(self.valid[row].sum())
            if n:
                out[row, :, t - n:] = score_row(row, t - n, n)
        return self.finish(out)

    def finish(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores with padding set to never-keep, broadcast to ``[B, Hkv, T]``, float32."""
        b, t = self.valid.shape
        scores = scores.float().expand(b, self.num_kv_heads, t)
        return scores.masked_fill(~self.valid[:, None, :], NEVER)


@dataclass(frozen=True)
class Scorer(Part):
    """Ranks tokens. Subclasses implement :meth:`score` and say what they need."""

    kind: ClassVar[str] = "scorer"
    needs_all_queries: ClassVar[bool] = False
    evicts_on_decode: ClassVar[bool] = False
    needs_decode_attention: ClassVar[bool] = False
    decode_on_device: ClassVar[bool] = False
    """``evicts_on_decode``: whether the decode-time methods (:meth:`new_token_score`,
    :meth:`decode_update`, :meth:`replaced`, :meth:`protected`) are tensor operations on their
    arguments alone (no host reads, no Python state that changes), so a CUDA graph of the decode
    step may replay them (:class:`kvplug.hf.DecodeGraph`); a scorer that does not say so runs eagerly."""
    needs_rope: ClassVar[bool] = False  # reads ScoreInputs.rope (queries before rotation)
    needs_out_proj: ClassVar[bool] = False  # reads ScoreInputs.out_proj (what a value adds to the layer's output)
    placement: ClassVar[str] = "select"
    """Where the kept tokens live, for adapters that place them (vLLM's blocks): ``select`` keeps
    a prompt-time selection (and, with ``evicts_on_decode``, replaces its lowest-ranked slot by
    each generated token: h2o, tova); ``window`` keeps sinks plus a sliding window by position
    (:meth:`sinks_and_window`), also while generating (streaming); ``per_head`` holds a different
    count in each head (:meth:`head_capacity`: DuoAttention), which only per-head stores place."""
    across_layers: ClassVar[bool] = False
    """Whether the budget is shared across layers by a per-layer preference read from the prompt
    (:meth:`layer_preference`: CAKE), so a layer's count is known only once every layer has seen
    the prompt (adapters select after the last layer: :meth:`~kvplug.strategy.Strategy.layer_counts`)."""
    per_layer: ClassVar[bool] = False
    """Whether :meth:`for_layer` decides per layer and prompt whether to evict at all (SimLayerKV),
    so the tokens a layer keeps are not known from the prompt length alone."""

    @property
    def observation_window(self) -> int:
        """How many of the last prompt queries :meth:`score` needs (0: none)."""
        return 0

    def kept_tokens(self, present: int) -> int:
        """Tokens per KV head this scorer keeps when ``present`` tokens are there."""
        raise NotImplementedError

    def head_capacity(self, present: torch.Tensor, layer_idx: int, num_layers: int,
                      num_kv_heads: int) -> torch.Tensor | None:
        """``evicts_on_decode``: tokens each KV head may hold while generating ``[B, Hkv]`` (int64),
        for a scorer whose heads differ (DuoAttention); None: the budget's, the same for every head."""
        return None

    def sinks_and_window(self, present: int) -> tuple[int, int]:
        """``placement = "window"``: the first tokens and the most recent ones held after a
        prompt of ``present`` tokens (and from then on while generating)."""
        raise NotImplementedError(f"{self.name} keeps a selection, not sinks and a window")

    def for_layer(self, inputs: ScoreInputs) -> Scorer | None:
        """The scorer this layer uses, decided at prefill from its inputs (None: keep every token).

        Most scorers act the same in every layer; a per-layer method (SimLayerKV) picks a policy
        for each layer here, and adapters then use what it returns, while generating too."""
        return self

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """Scores ``[B, Hkv, T]`` (see module docstring)."""
        raise NotImplementedError

    def layer_preference(self, inputs: ScoreInputs) -> torch.Tensor:
        """``across_layers``: how much of the budget this layer asks for ``[B]`` (non-negative)."""
        raise NotImplementedError(f"{self.name} does not share its budget across layers")

    # Decode-time eviction (only for scorers with ``evicts_on_decode``).
    def running_scores(self, inputs: ScoreInputs) -> torch.Tensor:
        """Finite per-token scores ``[B, Hkv, T]`` that decode-time eviction starts from (the
        protection of sinks/recent tokens is :meth:`protected`'s job, not an infinite score)."""
        return self.score(inputs)

    def new_token_score(self, step: torch.Tensor) -> torch.Tensor:
        """Score (float32) a token starts with when written at logical positions ``step``."""
        return torch.zeros_like(step, dtype=torch.float32)

    def decode_update(self, scores: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
        """New scores ``[B, Hkv, S]`` after one decode step; ``probs`` ``[B, Hkv, S]`` is that step's
        attention (mean over the group's query heads) when ``needs_decode_attention``."""
        return scores

    def replaced(self, scores: torch.Tensor, positions: torch.Tensor, step: torch.Tensor,
                 capacity: torch.Tensor) -> torch.Tensor:
        """``evicts_on_decode``, at a head's capacity: the slot (index along the last axis) that
        the token at ``step`` takes: the lowest running score ``[B, Hkv, S]`` among the slots that
        hold a token (``positions`` >= 0) and are not :meth:`protected`; ties go to the lowest
        slot. The one replace rule of every adapter: ``[B, Hkv]``."""
        ranked = scores.masked_fill(positions < 0, float("inf"))
        ranked = ranked.masked_fill(self.protected(positions, step, capacity), float("inf"))
        return ranked.argmin(-1)

    def protected(self, positions: torch.Tensor, step: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
        """Slots (by logical ``positions`` ``[B, Hkv, S]``) that must not be evicted when the token
        at logical position ``step`` (``[B, 1, 1]``) arrives at heads holding at most ``capacity``
        ``[B, Hkv]`` tokens (their budget; the store's width may be larger)."""
        return torch.zeros_like(positions, dtype=torch.bool)


class KeepsRecentShare:
    """For a :class:`Scorer` with a ``recent_ratio`` field and :meth:`~Scorer.kept_tokens`: the
    newest ``floor(kept * recent_ratio)`` tokens are always kept at prefill
    (:meth:`keep_recent`) and never replaced while generating (:meth:`protected`); h2o and
    scissorhands."""

    def recent(self, kept: int) -> int:
        """How many of ``kept`` tokens are the newest ones."""
        return math.floor(kept * self.recent_ratio)

    def keep_recent(self, inputs: ScoreInputs, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` ``[B, Hkv, T]`` with each prompt's newest :meth:`recent` tokens always kept
        (padding never), as :meth:`ScoreInputs.finish` gives them."""
        present = inputs.valid.sum(-1, keepdim=True)
        recent = torch.tensor([self.recent(self.kept_tokens(int(n))) for n in present.flatten()],
                              device=present.device).view_as(present)
        is_recent = inputs.positions >= present - recent
        return inputs.finish(torch.where(is_recent[:, None, :], ALWAYS, scores))

    def protected(self, positions: torch.Tensor, step: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
        recent = torch.floor(capacity.double() * self.recent_ratio).long()  # as recent(), per head
        return positions > step - recent[..., None]
