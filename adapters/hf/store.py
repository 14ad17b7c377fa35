"""Where one layer's compressed K/V live in the HF cache.

:class:`SlotStore` keeps each KV head's tokens compact in slots ``0 .. count-1`` (heads may hold
different counts), encoded token by token, so a new token goes into any slot: appended, or
written over an evicted one. :class:`GroupStore` holds codecs that encode whole groups of tokens
(KIVI keys), appended a group at a time, the same number for every head.
"""

from __future__ import annotations

import torch

from kvplug.codecs.base import Codec, Encoded

GROWTH = 256  # slots added at once when a SlotStore is full (amortizes reallocation)


def _pad(t: torch.Tensor, extra: int, dim: int, value: float = 0) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_full(shape, value)], dim=dim)


def _nbytes(tensors: Encoded) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class SlotStore:
    """Per-head compact slots of a token-wise codec, with per-slot positions and scores."""

    def __init__(self, codec: Codec, dtype: torch.dtype):
        self.codec, self.dtype = codec, dtype
        self.keys: Encoded = {}
        self.values: Encoded = {}
        self.counts: torch.Tensor | None = None  # [B, H]
        self.positions: torch.Tensor | None = None  # [B, H, S] logical positions, -1 = empty
        self.scores: torch.Tensor | None = None  # [B, H, S] eviction scores (float32)

    @property
    def capacity(self) -> int:
        return 0 if self.positions is None else self.positions.shape[-1]

    def init(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
             scores: torch.Tensor | None = None) -> None:
        """Start from ``[B, H, S, D]`` tokens whose first ``valid.sum(-1)`` slots per head are real."""
        self.keys = self.codec.encode(keys, "key", valid)
        self.values = self.codec.encode(values, "value", valid)
        self.counts = valid.sum(-1)
        self.positions = positions.masked_fill(~valid, -1)
        self.scores = torch.zeros_like(positions, dtype=torch.float32) if scores is None else scores.float()

    def _grow(self, needed: int) -> None:
        extra = max(GROWTH, needed - self.capacity)
        self.keys = {k: _pad(v, extra, -2) for k, v in self.keys.items()}
        self.values = {k: _pad(v, extra, -2) for k, v in self.values.items()}
        self.positions = _pad(self.positions, extra, -1, -1)
        self.scores = _pad(self.scores, extra, -1)

    def write(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
              scores: torch.Tensor) -> None:
        """Write tokens ``[B, H, N, D]`` into ``slots`` ``[B, H, N]`` (each < capacity or == count)."""
        top = int(slots.max()) + 1 if slots.numel() else 0
        if top > self.capacity:
            self._grow(top)
        for store, x, role in ((self.keys, keys, "key"), (self.values, values, "value")):
            enc = self.codec.encode(x, role)
            for name, t in enc.items():
                idx = slots[..., None].expand(*slots.shape, t.shape[-1])
                store[name].scatter_(-2, idx, t)
        self.positions.scatter_(-1, slots, positions)
        self.scores.scatter_(-1, slots, scores)
        self.counts = (self.positions >= 0).sum(-1)

    def decode(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(keys, values, filled)``: ``[B, H, S, D]`` in the model dtype and ``[B, H, S]`` bool."""
        return (self.codec.decode(self.keys, "key", self.dtype), self.codec.decode(self.values, "value", self.dtype),
                self.positions >= 0)

    def take_front(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Remove and return the first ``n`` slots of every head (decoded), shifting the rest left."""
        k, v, _ = self.decode()
        front = (k[..., :n, :], v[..., :n, :], self.positions[..., :n])
        keep = slice(n, None)
        self.keys = {name: t[..., keep, :] for name, t in self.keys.items()}
        self.values = {name: t[..., keep, :] for name, t in self.values.items()}
        self.positions, self.scores = self.positions[..., keep], self.scores[..., keep]
        self.counts = (self.positions >= 0).sum(-1)
        return front

    def stored_bytes(self) -> int:
        """Bytes of the tokens held (filled slots only)."""
        if self.counts is None or self.capacity == 0:
            return 0
        per_slot = (_nbytes(self.keys) + _nbytes(self.values)) / (self.positions.numel())
        return round(per_slot * int(self.counts.sum()))

    def allocated_bytes(self) -> int:
        return _nbytes(self.keys) + _nbytes(self.values)


class GroupStore:
    """Whole token groups of a grouped codec (KIVI), appended in step for every head."""

    def __init__(self, codec: Codec, dtype: torch.dtype):
        self.codec, self.dtype = codec, dtype
        self.keys: list[Encoded] = []
        self.values: list[Encoded] = []
        self.tokens = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Encode ``[B, H, n * group, D]`` tokens (all real) as new groups."""
        if keys.shape[-2] == 0:
            return
        self.keys.append(self.codec.encode(keys, "key"))
        self.values.append(self.codec.encode(values, "value"))
        self.tokens += keys.shape[-2]

    def decode(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.keys:
            return None
        k = torch.cat([self.codec.decode(e, "key", self.dtype) for e in self.keys], dim=-2)
        v = torch.cat([self.codec.decode(e, "value", self.dtype) for e in self.values], dim=-2)
        return k, v

    def stored_bytes(self) -> int:
        return sum(_nbytes(e) for e in self.keys + self.values)
