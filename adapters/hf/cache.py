"""``KVPlugCache``: a ``transformers.Cache`` whose layers hold K/V compressed by a kvplug strategy."""

from __future__ import annotations

from transformers.cache_utils import Cache

from kvplug.rope import Rope
from kvplug.strategy import Strategy

from .layer import KVPlugLayer
from .offload import OffloadLayer


class KVPlugCache(Cache):
    """One :class:`KVPlugLayer` per decoder layer, all following one strategy (an
    :class:`~.offload.OffloadLayer` per layer when the strategy has a placement part)."""

    def __init__(self, strategy: Strategy, num_layers: int, paged: bool | None = None, keep_prompt: bool = False,
                 rope: Rope | None = None, view=None):
        # cross-layer state: the model's RoPE and attention modules (view), a merger's parked
        # prompts, an offloading cache's fetch buffers and side stream
        shared: dict = {"rope": rope, "model": view}
        placement = strategy.placement
        layers = [OffloadLayer(strategy, i, num_layers, paged, keep_prompt, shared)
                  if placement is not None and placement.places(i, num_layers)
                  else KVPlugLayer(strategy, i, num_layers, paged, keep_prompt, shared) for i in range(num_layers)]
        super().__init__(layers=layers)
        self.strategy, self.paged, self.rope, self.view, self.shared = strategy, paged, rope, view, shared
        if placement is not None and placement.needs_hidden_states and view is not None:
            view.install()  # the decoder layers hand their input to before_layer

    def before_layer(self, layer_idx: int, residual, position_embeddings) -> None:
        """Called by the model's decoder layers (:meth:`~.offload.ModelView.install`) with layer
        ``layer_idx``'s input (the residual stream): a placement that speculates ahead predicts
        the next layer's queries from it (the next layer's own norm and query projection: the
        residual changes little from one layer to the next) and starts fetching its tokens. A
        no-op for every other strategy."""
        placement = self.strategy.placement
        target = layer_idx + 1
        if placement is None or not placement.needs_hidden_states or target >= len(self.layers):
            return
        layer = self.layers[target]
        if isinstance(layer, OffloadLayer) and layer.decoding() and residual is not None \
                and position_embeddings is not None:
            queries = self.view.query(target, residual, position_embeddings)
            layer.prefetch(queries, self.view.attention[target].scaling, layer.host.count)

    def fork(self, strategy: Strategy, paged: bool | None = None) -> KVPlugCache:
        """A cache for ``strategy`` holding this cache's prompt compressed its way, without running
        the model again: the prompt's attention does not depend on the strategy, only what is kept
        afterwards does. Needs a cache made with ``keep_prompt=True`` that has seen only a prompt.
        ``paged``: the new cache's layout choice (default: this cache's)."""
        other = KVPlugCache(strategy, len(self.layers), self.paged if paged is None else paged, rope=self.rope,
                            view=self.view)
        for mine, theirs in zip(self.layers, other.layers):
            if mine.prompt is None or mine.seen != mine.prompt[0].shape[-2]:
                raise RuntimeError("fork() needs a keep_prompt=True cache that has seen only its prompt")
            keys, values, queries, valid, scale = mine.prompt
            theirs.lazy_initialization(keys, values)
            theirs.pending, theirs.seen = (keys, values), mine.seen
            theirs.compress_prompt(queries, valid, scale)
        return other

    def to_bytes(self, model, encoder=None) -> bytes:
        """This cache as bytes (:mod:`.persist`: safetensors, no code), for ``kvplug.hf.load``;
        ``encoder``: a :class:`kvplug.cachegen.CacheGen` to code full-precision K/V compactly."""
        from .persist import to_bytes

        return to_bytes(self, model, encoder)

    def save(self, path, model, encoder=None) -> None:
        """:meth:`to_bytes` written to ``path``."""
        from pathlib import Path

        Path(path).write_bytes(self.to_bytes(model, encoder))

    def kept_tokens(self) -> int:
        """Tokens held, summed over layers, KV heads and sequences."""
        return sum(layer.kept_tokens() for layer in self.layers)

    def stored_bytes(self) -> int:
        """Bytes of K/V the cache's tensors hold, summed over layers: padding to the longest head
        and sequence included (and whole 16-token blocks in the paged layout); slots allocated
        ahead for tokens still to come are not counted. Positions and scores are apart
        (:meth:`bookkeeping_bytes`). With a placement: host and accelerator together, the fetch
        buffers included (:meth:`device_bytes`, :meth:`host_bytes` apart)."""
        return sum(layer.stored_bytes() for layer in self.layers) + self._fetch_bytes()

    def device_bytes(self) -> int:
        """Bytes of K/V on the accelerator: everything a cache without a placement holds; with one
        (InfiniGen), the layers it keeps whole, the partial keys and the fetch buffers."""
        return sum(layer.device_bytes() if isinstance(layer, OffloadLayer) else layer.stored_bytes()
                   for layer in self.layers) + self._fetch_bytes()

    def _fetch_bytes(self) -> int:
        """Bytes of an offloading cache's fetch buffers, shared by its layers (0 for any other)."""
        fetch = self.shared.get("fetch")
        return 0 if fetch is None else fetch.nbytes()

    def host_bytes(self) -> int:
        """Bytes of K/V in host memory (only a placement puts any there)."""
        return sum(layer.host_bytes() for layer in self.layers if isinstance(layer, OffloadLayer))

    def merged_pairs(self) -> tuple[int, int]:
        """``(merged, pairs)``: of the merger's layer pairs that hold a prompt, how many share
        directions (a pair whose merged form would not be smaller keeps each layer's own K/V)."""
        stores = [layer.merged[0] for layer in self.layers if layer.merged is not None and layer.merged[1] == 1]
        return sum(store.is_merged for store in stores), len(stores)

    def bookkeeping_bytes(self) -> int:
        """Bytes of the per-slot bookkeeping (logical positions, eviction scores), summed over layers."""
        return sum(layer.bookkeeping_bytes() for layer in self.layers)

    def __repr__(self) -> str:
        return f"KVPlugCache({self.strategy}, layers={len(self.layers)}, seen={self.get_seq_length()})"
