"""kvplug's KV connector: a request's full blocks kept in host memory, loaded back on a later prefix hit.

Registered by the plugin under the name :data:`NAME` (vLLM's ``KVConnectorFactory``); selected as
any connector is::

    vllm serve MODEL --additional-config '{"kvplug": "int4"}' \\
        --kv-transfer-config '{"kv_connector": "KVPlugConnector", "kv_role": "kv_both",
                               "kv_connector_extra_config": {"host_bytes": 8e9}}'

What it does, in vLLM's connector terms (both 0.26 and 0.32; no patch):

* **Store (write-through).** Every block a step fills (prompt or generated tokens) is copied to
  host memory after the forward pass (``wait_for_save``), keyed by its tokens and all before them
  (:func:`.prefix_store.block_keys`), unless that key is stored already. A prefix therefore survives
  whatever later happens to its GPU blocks: a finished request's blocks evicted from vLLM's prefix
  cache, a preempted request's blocks freed.
* **Load.** When the scheduler asks (``get_num_new_matched_tokens``), the connector counts the
  request's blocks past vLLM's own prefix-cache hit that host memory holds, without a gap, leaving
  at least the last token to compute; the worker copies them into the blocks vLLM allocated
  before the forward pass (``start_load_kv``). Prefix caching composes: the connector only adds
  blocks past the local hit.
* **What is stored.** With a kvplug codec the pages are kvplug's compressed pages, copied byte for
  byte (no re-quantization: a loaded block is the block that was saved). With vLLM's own pages
  (no kvplug strategy, or ``none`` on CUDA), ``kv_connector_extra_config["codec"]`` (a kvplug
  codec spec of one token at a time: ``int8``, ``int4``, ``int4(rotate=true)``...) encodes each
  block on save and decodes it on load; without it the pages are kept as they are.
* **How much.** ``host_bytes`` (default 4 GiB) bounds the blocks kept; least recently used (stored
  or hit) go first. The scheduler decides and the worker follows (:class:`.prefix_store.Plan`), so
  both sides agree on what is stored without a message back.

Refused in one line at start-up: a kvplug strategy that evicts tokens (its blocks no longer hold
what their tokens name), a model with more than one KV-cache group (hybrid attention), a codec
for kvplug's own pages, a codec that encodes tokens in groups.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvplug.errors import SpecError

from . import _log, compat
from .prefix_store import HostBlocks, HostIndex, HostPool, Plan, block_keys, check_blocks_first

if TYPE_CHECKING:
    from vllm.v1.request import Request

from . import CONNECTOR as NAME
DEFAULT_HOST_BYTES = 4 << 30
REPORT_S = 2.0
"""At most one line of what host memory holds per this many seconds of storing (and one per load)."""


@dataclass
class KVPlugConnectorMetadata(KVConnectorMetadata):
    """One step's :class:`.prefix_store.Plan`, as block ids and keys."""

    plan: Plan = field(default_factory=Plan)


@dataclass
class _Request:
    """What the scheduler side tracks of a live request."""

    request: Any
    block_ids: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    handled: int = 0  # full blocks already stored or found stored
    local: int = 0  # tokens of vLLM's own prefix-cache hit, as last asked
    load: tuple[int, int] | None = None  # (first block, blocks) to load in the next step


def _settings(vllm_config) -> tuple[int, Any]:
    """``host_bytes`` and the codec (or None) of ``kv_connector_extra_config``, checked."""
    from kvplug.config import resolve

    from . import selected_strategy

    extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
    unknown = sorted(set(extra) - {"host_bytes", "codec"})
    if unknown:
        raise SpecError(f"{NAME}: unknown kv_connector_extra_config key(s) {unknown}; allowed: host_bytes, codec")
    try:
        host_bytes = int(float(extra.get("host_bytes", DEFAULT_HOST_BYTES)))
    except (TypeError, ValueError):
        raise SpecError(f"{NAME}: host_bytes={extra['host_bytes']!r} is not a number of bytes") from None
    strategy = selected_strategy(vllm_config)
    if strategy is not None and strategy.evicts:
        raise SpecError(f"{NAME}: strategy {str(strategy)!r} evicts tokens, so a block no longer holds what its "
                        f"tokens name; use the connector with a codec-only strategy")
    codec = None
    if extra.get("codec") is not None:
        if not stock_pages(vllm_config, strategy):
            raise SpecError(f"{NAME}: codec={extra['codec']!r} is for vLLM's own pages; kvplug's pages (strategy "
                            f"{str(strategy)!r}) are stored as they are, already compressed")
        codec_strategy = resolve(extra["codec"])
        if codec_strategy.evicts:
            raise SpecError(f"{NAME}: codec={extra['codec']!r} must be a codec, not an eviction strategy")
        codec = codec_strategy.codec
        HostBlocks(codec, compat.head_size(vllm_config))  # refuses a codec it cannot run
    return host_bytes, codec


def check(vllm_config) -> None:
    """Start-up check (the plugin's config check): the connector's settings and the strategy it
    serves, refused in one line (:func:`_settings`)."""
    _settings(vllm_config)


def stock_pages(vllm_config, strategy) -> bool:
    """Whether the layers' pages are vLLM's own (no kvplug backend runs)."""
    from . import _backend_class

    return strategy is None or _backend_class(vllm_config, strategy) is None


class KVPlugConnector(KVConnectorBase_V1):
    """See the module docstring."""

    _cache_hit_source = compat.host_hit_source()

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        host_bytes, self._codec = _settings(vllm_config)
        groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
        if len(groups) != 1:
            raise SpecError(f"{NAME}: the model has {len(groups)} KV-cache groups; the connector serves models "
                            f"with one (full attention in every layer)")
        self._block_size = vllm_config.cache_config.block_size
        self._namespace = _namespace(vllm_config, self._codec)
        if role == KVConnectorRole.SCHEDULER:
            self._index = HostIndex(self._block_bytes(groups[0]), host_bytes)
            self._requests: dict[str, _Request] = {}
        else:
            self._slots = host_bytes // self._block_bytes(groups[0])  # as the index counts them
            self._head_size = groups[0].kv_cache_spec.head_size
            self._store: HostPool | HostBlocks | None = None  # made when the caches are registered
            self._caches: dict[str, torch.Tensor] = {}
            self.loaded_blocks = 0
            self._reported = -float("inf")

    def _block_bytes(self, group) -> int:
        """Host bytes of one block over all layers (the index's unit)."""
        spec = group.kv_cache_spec
        if self._codec is None:
            return spec.page_size_bytes * len(group.layer_names)
        per_token_head = self._codec.bytes_per_token(spec.head_size, 4)
        return int(per_token_head * spec.num_kv_heads * self._block_size * len(group.layer_names))

    # scheduler side ------------------------------------------------------------------------------------
    def _state(self, request: Request) -> _Request:
        st = self._requests.get(request.request_id)
        if st is None:
            st = self._requests[request.request_id] = _Request(request)
        return st

    def _keys(self, st: _Request, upto: int) -> list[bytes]:
        """Keys of the request's first ``upto`` tokens' full blocks (extended as tokens come)."""
        tokens = st.request.all_token_ids
        upto = min(upto, len(tokens))
        if len(st.keys) < upto // self._block_size:
            st.keys = block_keys(tokens[:upto], self._block_size, self._namespace, st.keys)
        return st.keys[:upto // self._block_size]

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int):
        st = self._state(request)
        st.local = num_computed_tokens
        keys = self._keys(st, request.num_tokens - 1)  # the last token is always computed
        first = num_computed_tokens // self._block_size
        return self._index.hit(keys, first) * self._block_size, False

    def update_state_after_alloc(self, request: Request, blocks, num_external_tokens: int):
        st = self._state(request)
        if num_external_tokens > 0:
            first = st.local // self._block_size
            st.load = (first, num_external_tokens // self._block_size)
            st.block_ids = list(blocks.get_block_ids()[0])

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        plan = Plan()
        scheduled = scheduler_output.num_scheduled_tokens
        done: dict[str, int] = {}  # request -> tokens computed once this step has run
        for new in scheduler_output.scheduled_new_reqs:
            st = self._requests.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            done[new.req_id] = new.num_computed_tokens + scheduled.get(new.req_id, 0)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._requests.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                st.block_ids.extend(new_ids[0])
            done[req_id] = cached.num_computed_tokens[i] + scheduled.get(req_id, 0)
        pinned: set[bytes] = set()
        for req_id in done:
            st = self._requests[req_id]
            if st.load is not None:
                first, n = st.load
                keys = st.keys[first:first + n]
                plan.loads.extend((b, key, self._index.slot(key)) for b, key in zip(st.block_ids[first:first + n], keys))
                pinned.update(keys)
                self._index.touch(keys)
                self._index.hits += n
                st.load = None
        for req_id, upto in done.items():
            st = self._requests[req_id]
            keys = self._keys(st, upto)
            for j in range(st.handled, min(len(keys), len(st.block_ids))):
                pinned.add(keys[j])
                self._index.add(keys[j], plan, st.block_ids[j], pinned)
            st.handled = max(st.handled, min(len(keys), len(st.block_ids)))
        return KVPlugConnectorMetadata(plan)

    def request_finished(self, request: Request, block_ids: list[int]):
        self._requests.pop(request.request_id, None)
        return False, None

    # worker side ---------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        num_blocks = self._kv_cache_config.num_blocks
        for name, cache in kv_caches.items():
            check_blocks_first(tuple(cache.shape), num_blocks)
            self._caches[name] = cache
        shapes = {(tuple(c.shape), c.dtype) for c in self._caches.values()}
        if len(shapes) > 1:
            raise SpecError(f"{NAME}: the layers' KV caches differ in shape or dtype ({sorted(map(str, shapes))}); "
                            f"the connector stores a block of every layer together")
        if not self._caches:
            return
        cache = next(iter(self._caches.values()))
        if self._codec is not None:
            self._store = HostBlocks(self._codec, self._head_size)
        else:
            self._store = HostPool(self._slots, len(self._caches), tuple(cache.shape[1:]), cache.dtype, cache.device)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        plan = self._plan()
        if plan is None or not plan.loads or self._store is None:
            return
        ids, keys, slots = zip(*plan.loads)
        caches = list(self._caches.values())
        at = torch.tensor(ids, device=caches[0].device)
        if isinstance(self._store, HostPool):
            blocks = self._store.get(list(slots))
        else:
            blocks = self._store.get(list(keys), caches[0][:1].unsqueeze(1).expand(1, len(caches), *caches[0].shape[1:]))
        for layer, cache in enumerate(caches):
            cache.index_copy_(0, at, blocks[:, layer])
        self.loaded_blocks += len(plan.loads)
        _log(f"kvplug connector: {len(plan.loads)} block(s) ({len(plan.loads) * self._block_size} tokens) "
             f"loaded from host memory; {self._kept()}")

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return  # the whole step's blocks are copied once the forward pass has run (wait_for_save)

    def wait_for_save(self):
        plan = self._plan()
        if plan is None or self._store is None:
            return
        pool = isinstance(self._store, HostPool)
        for key, slot in plan.drops:  # before the stores: a dropped key's slot may be stored into now
            self._store.drop(slot if pool else key)
        if plan.stores:
            ids, keys, slots = zip(*plan.stores)
            caches = list(self._caches.values())
            at = torch.tensor(ids, device=caches[0].device)
            blocks = torch.stack([cache.index_select(0, at) for cache in caches], dim=1)  # [n, layers, *block]
            self._store.put(list(slots) if pool else list(keys), blocks)
        if plan.stores and time.monotonic() - self._reported > REPORT_S:
            self._reported = time.monotonic()
            _log(f"kvplug connector: stored; {self._kept()}")

    def _kept(self) -> str:
        return (f"{len(self._store)} blocks of {self._block_size} tokens, {self._store.bytes:,} bytes kept "
                f"({self._store.bytes / max(1, len(self._store) * self._block_size):,.0f} per token)")

    def _plan(self) -> Plan | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta.plan if isinstance(meta, KVPlugConnectorMetadata) else None


def _namespace(vllm_config, codec) -> bytes:
    """The first key's seed: what makes two engines' blocks of the same tokens differ."""
    from . import selected_spec

    model = getattr(vllm_config.model_config, "model", "")
    facts = f"kvplug-connector v1|{model}|{selected_spec(vllm_config)}|{codec}|{vllm_config.cache_config.block_size}"
    return facts.encode()
