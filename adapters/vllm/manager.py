"""The KV-cache spec and manager that let vLLM's scheduler free the blocks eviction empties (imports vLLM).

A layer whose strategy evicts reports :class:`KVPlugEvictingSpec` (a ``FullAttentionSpec`` that
carries the spec string and the layer count); vLLM's spec registry maps it to
:class:`KVPlugEvictingManager`, registered here the supported way (``KVCacheSpecRegistry``,
grouped with full attention). The manager frees, through the sliding-window path vLLM already
has (block-table entries become the null block), the blocks :func:`.eviction.freed_blocks`
names for the request's prompt length and processed tokens, the same arithmetic the worker
compacts and reads by. Everything else (allocation for the tokens still to come,
blocks of freshly admitted requests) is vLLM's full-attention manager unchanged: a running
request's block table keeps its null entries, so freed blocks are never counted again.

Importing this module registers the pair, in every process that unpickles the spec.
"""

from __future__ import annotations

import dataclasses
import functools

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from kvplug.config import resolve

from .eviction import freed_blocks


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVPlugEvictingSpec(FullAttentionSpec):
    """Full attention whose emptied blocks are freed once a request's prompt is compressed."""

    kvplug_spec: str = ""
    kvplug_layers: int = 1

    @classmethod
    def from_spec(cls, spec: FullAttentionSpec, strategy: str, num_layers: int) -> KVPlugEvictingSpec:
        values = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init}
        return cls(**values, kvplug_spec=strategy, kvplug_layers=num_layers)

    @classmethod
    def merge(cls, specs):
        kvplug = {(s.kvplug_spec, s.kvplug_layers) for s in specs}
        if len(kvplug) != 1:
            raise ValueError(f"kvplug: layers of one KV-cache group differ in strategy: {kvplug}")
        strategy, layers = kvplug.pop()
        return dataclasses.replace(super().merge(specs), kvplug_spec=strategy, kvplug_layers=layers)

    @property
    def prefix_cacheable(self) -> bool:
        return False  # compressed blocks no longer hold the tokens their hash names


class KVPlugEvictingManager(FullAttentionManager):
    """vLLM's full-attention manager that frees the blocks eviction has emptied."""

    def __init__(self, kv_cache_spec: KVPlugEvictingSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.strategy = _strategy(kv_cache_spec.kvplug_spec)
        self.num_layers = kv_cache_spec.kvplug_layers

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        if num_prompt_tokens is None:
            return
        for first, last in freed_blocks(self.strategy, num_prompt_tokens, processed_computed_tokens, self.block_size,
                                        self.num_layers):
            self._remove_blocks_in_range(request_id, first, last)


@functools.lru_cache(maxsize=16)
def _strategy(spec: str):
    return resolve(spec)


KVCacheSpecRegistry._ensure_registered()  # the built-ins first: registering ours alone would skip them
KVCacheSpecRegistry.register(KVPlugEvictingSpec, KVPlugEvictingManager, uniform_type_base_spec=FullAttentionSpec)
