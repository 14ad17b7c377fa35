"""``KVPlugCache``: a ``transformers.Cache`` whose layers hold K/V compressed by a kvplug strategy."""

from __future__ import annotations

from transformers.cache_utils import Cache

from kvplug.strategy import Strategy

from .layer import KVPlugLayer


class KVPlugCache(Cache):
    """One :class:`KVPlugLayer` per decoder layer, all following one strategy."""

    def __init__(self, strategy: Strategy, num_layers: int, paged: bool | None = None):
        super().__init__(layers=[KVPlugLayer(strategy, i, num_layers, paged) for i in range(num_layers)])
        self.strategy = strategy

    def kept_tokens(self) -> int:
        """Tokens held, summed over layers, KV heads and sequences."""
        return sum(layer.kept_tokens() for layer in self.layers)

    def stored_bytes(self) -> int:
        """Bytes of K/V held, summed over layers (what the cache really keeps)."""
        return sum(layer.stored_bytes() for layer in self.layers)

    def __repr__(self) -> str:
        return f"KVPlugCache({self.strategy}, layers={len(self.layers)}, seen={self.get_seq_length()})"
