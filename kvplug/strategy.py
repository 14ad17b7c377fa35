"""A strategy: one codec, at most one scorer, one budget, one merger and one placement, composed with
``+`` in a spec.

Tensor in, tensor out: adapters hand :meth:`Strategy.select` a layer's K/V and queries and get
back which tokens to keep; they store them with :attr:`Strategy.codec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvplug.budgets.base import Budget, split_across_layers
from kvplug.budgets.uniform import Uniform
from kvplug.codecs.base import Codec
from kvplug.codecs.none import NoCodec
from kvplug.mergers.base import Merger
from kvplug.placements.base import Placement
from kvplug.scorers.base import ScoreInputs, Scorer


@dataclass(frozen=True)
class Selection:
    """Kept tokens of one layer: ``indices`` ``[B, Hkv, K]`` in prompt order, the first
    ``counts[b, h]`` of each row being real (the rest repeat index 0 as padding), and the
    ``scorer`` this layer uses from now on (see :meth:`Scorer.for_layer`)."""

    indices: torch.Tensor
    counts: torch.Tensor
    scorer: Scorer | None = None

    @classmethod
    def from_mask(cls, keep: torch.Tensor, scorer: Scorer | None = None) -> Selection:
        t = keep.shape[-1]
        order = torch.arange(t, device=keep.device)
        key = torch.where(keep, order, order + t)
        counts = keep.sum(-1)
        width = int(counts.max()) if counts.numel() else 0
        indices = key.sort(-1).values[..., :width]
        indices = torch.where(indices >= t, torch.zeros_like(indices), indices)
        return cls(indices=indices, counts=counts, scorer=scorer)

    def valid(self) -> torch.Tensor:
        """``[B, Hkv, K]``: True where an index is real."""
        width = self.indices.shape[-1]
        return torch.arange(width, device=self.indices.device) < self.counts[..., None]


@dataclass(frozen=True)
class Strategy:
    """codec + optional scorer + budget + optional merger + optional placement (where K/V live)."""

    codec: Codec = field(default_factory=NoCodec)
    scorer: Scorer | None = None
    budget: Budget = field(default_factory=Uniform)
    merger: Merger | None = None
    placement: Placement | None = None

    @property
    def parts(self) -> list:
        return [p for p in (self.scorer, None if isinstance(self.budget, Uniform) else self.budget, self.merger,
                            self.placement, self.codec) if p is not None]

    def __str__(self) -> str:
        shown = self.scorer is not None or self.merger is not None or self.placement is not None
        parts = [p for p in self.parts if not (isinstance(p, NoCodec) and shown)]
        return "+".join(str(p) for p in parts)

    @property
    def evicts(self) -> bool:
        return self.scorer is not None

    def check_head_dim(self, head_dim: int) -> None:
        """Raise a one-line :class:`SpecError` if the codec cannot store heads of ``head_dim``."""
        self.codec.check_head_dim(head_dim)

    def bytes_per_token(self, head_dim: int, dtype_bytes: int = 2) -> float:
        """K+V bytes per stored token per KV head (eviction not counted)."""
        return self.codec.bytes_per_token(head_dim, dtype_bytes)

    def held_bytes(self, kept: int, head_dim: int, dtype_bytes: int = 2) -> float:
        """K+V bytes per KV head of ``kept`` tokens: the codec's bytes per token, except the newest
        ``codec.residual`` held at ``dtype_bytes`` per element (a grouped codec holds up to a
        group more of them before it quantizes a group; counted here at the least)."""
        full = min(self.codec.residual, kept)
        return (kept - full) * self.bytes_per_token(head_dim, dtype_bytes) + full * 2 * head_dim * dtype_bytes

    def memory_ratio(self, head_dim: int, kept_share: float = 1.0, dtype_bytes: int = 2,
                     context: int | None = None) -> float:
        """How many times smaller than fp16 K/V the cache is when ``kept_share`` of tokens stay:
        per token, or at ``context`` prompt tokens, where a residual window counts at full
        precision (:meth:`held_bytes`)."""
        if context is None:
            return 2 * head_dim * dtype_bytes / (self.bytes_per_token(head_dim, dtype_bytes) * kept_share)
        kept = round(kept_share * context)
        return 2 * head_dim * dtype_bytes * context / self.held_bytes(kept, head_dim, dtype_bytes)

    def budget_per_row(self, valid: torch.Tensor, scorer: Scorer | None = None) -> torch.Tensor:
        """Tokens per KV head ``scorer`` (default: the strategy's) aims to keep in each row ``[B]``,
        which may exceed the tokens present (a short prompt grows up to it while generating)."""
        scorer = scorer or self.scorer
        present = valid.sum(-1)
        if scorer is None:
            return present
        return torch.tensor([scorer.kept_tokens(int(n)) for n in present.tolist()], dtype=torch.long,
                            device=valid.device)

    def kept_per_row(self, valid: torch.Tensor, scorer: Scorer | None = None) -> torch.Tensor:
        """Mean tokens per KV head each row keeps after prefill ``[B]``: the budget, at most the
        tokens present (all of them without a scorer)."""
        return torch.minimum(self.budget_per_row(valid, scorer), valid.sum(-1))

    def layer_counts(self, layers: list[ScoreInputs]) -> torch.Tensor:
        """For a scorer with ``across_layers``: each layer's mean tokens per head ``[L, B]``, the
        budget shared by the layers' preferences (:func:`~kvplug.budgets.base.split_across_layers`),
        from every layer's prompt inputs."""
        scorer = self.scorer
        preference = torch.stack([scorer.layer_preference(inputs) for inputs in layers])
        valid = layers[0].valid
        return split_across_layers(preference, self.kept_per_row(valid), valid.sum(-1),
                                   scorer.observation_window)

    def select(self, inputs: ScoreInputs, kept: torch.Tensor | None = None) -> Selection:
        """Which tokens each KV head of this layer keeps after prefill, and the scorer it uses.
        ``kept`` ``[B]``: this layer's mean tokens per head, where the scorer shares its budget
        across layers (:meth:`layer_counts`); default: the budget's."""
        scorer = None if self.scorer is None else self.scorer.for_layer(inputs)
        if scorer is None:
            keep = inputs.valid[:, None, :].expand(-1, inputs.num_kv_heads, -1)
        else:
            scores = scorer.score(inputs)
            keep = self.budget.allocate(scores, self.kept_per_row(inputs.valid, scorer) if kept is None else kept,
                                        inputs.layer_idx, inputs.num_layers)
        return Selection.from_mask(keep, scorer)
