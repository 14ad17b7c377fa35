"""A :class:`~.cache.KVPlugCache` to bytes and back (:mod:`kvplug.serialize`: safetensors, no code).

``cache.to_bytes()`` / ``cache.save(path)`` after a prompt (or later), ``kvplug.hf.load(model,
blob_or_path)`` for a cache that continues generating exactly as the saved one would have: every
layer's codes, scales, positions and eviction scores, and the few counters beside them. What is
saved is what the cache holds (the codec's codes, only the slots in use), not the raw prompt.
Strategies with a merger or a placement are refused in one line, and so is a cache that has not
stored a prompt yet.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from kvplug import serialize
from kvplug.cachegen import CacheGen
from kvplug.codecs.none import NoCodec
from kvplug.config import parse
from kvplug.errors import SpecError

from .store import GROWTH, GroupStore, PagedStore, SlotStore, _pad, read_dtype


def facts_of(model) -> dict:
    """What a blob must fit: the model's attention shape and dtype."""
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return {"num_layers": text.num_hidden_layers, "num_kv_heads": text.num_key_value_heads, "head_dim": head_dim,
            "dtype": str(next(model.parameters()).dtype)}


def _check(cache) -> None:
    strategy = cache.strategy
    for part in (strategy.merger, strategy.placement):
        if part is not None:
            raise SpecError(f"kvplug.hf: saving a cache with {part.name} is not supported yet; got {strategy}")
    if any(layer.slots is None for layer in cache.layers):
        raise SpecError("kvplug.hf: this cache has not stored a prompt yet; run the prompt through the model first")


def _put(tensors: dict, prefix: str, enc: dict) -> None:
    for name, t in enc.items():
        tensors[f"{prefix}.{name}"] = t


def _take(tensors: dict, prefix: str) -> dict:
    return {name[len(prefix) + 1:]: t for name, t in tensors.items() if name.startswith(prefix + ".")}


def to_bytes(cache, model, encoder: CacheGen | None = None) -> bytes:
    """The blob of ``cache`` (a prompt stored, no merger or placement) for ``model``: the bytes
    its stores hold, or with ``encoder`` (:class:`kvplug.cachegen.CacheGen`, for a cache of codec
    ``none``) its K/V as CacheGen streams, decoded again on load (lossy, within the encoder's
    stated bound)."""
    _check(cache)
    if encoder is not None and not isinstance(cache.strategy.codec, NoCodec):
        raise SpecError(f"kvplug.hf: cachegen encodes full-precision K/V; this cache stores {cache.strategy.codec.name} "
                        f"codes (save a cache of codec none)")
    tensors, layers = {}, []
    for i, layer in enumerate(cache.layers):
        slots = layer.slots
        used = slots.used_slots()
        state = {"seen": layer.seen, "high": layer.high, "cap_max": layer.cap_max, "low": layer.low,
                 "scorer": None if layer.scorer is None else str(layer.scorer), "used": used,
                 "slots": slots.capacity,
                 "store": "paged" if isinstance(slots, PagedStore) else "slots",
                 "groups": 0 if layer.groups is None else len(layer.groups.keys),
                 "group_tokens": 0 if layer.groups is None else layer.groups.tokens}
        p = f"layer{i}"
        tensors[f"{p}.next_pos"] = layer.next_pos
        if layer.capacity is not None:
            tensors[f"{p}.capacity"] = layer.capacity
        tensors[f"{p}.counts"] = slots.counts
        positions, scores = slots.positions[..., :used], slots.scores[..., :used]
        # positions fit int32 (kept as int64 by the stores); scores only where a scorer wrote any
        state["positions_dtype"] = str(positions.dtype).removeprefix("torch.")
        tensors[f"{p}.positions"] = positions.to(torch.int32)
        if bool(scores.any()):
            tensors[f"{p}.scores"] = scores
        if encoder is not None:
            k, v, _ = slots.decode()
            for role, x in (("key", k), ("value", v)):
                _put(tensors, f"{p}.cachegen.{role}", encoder.encode(x[..., :used, :], i, len(cache.layers)))
        elif isinstance(slots, PagedStore):
            b = slots.counts.shape[0]
            blocks = slots.cache.shape[0] // b
            tensors[f"{p}.pages"] = slots.cache.view(b, blocks, *slots.cache.shape[1:])[:, :used // slots.BLOCK]
            if slots.tail is not None:  # a residual window's full-precision tokens
                tensors[f"{p}.tail.key"], tensors[f"{p}.tail.value"] = slots.tail.keys, slots.tail.values
        else:
            _put(tensors, f"{p}.key", {n: t[..., :used, :] for n, t in slots.keys.items()})
            _put(tensors, f"{p}.value", {n: t[..., :used, :] for n, t in slots.values.items()})
        for j in range(state["groups"]):
            _put(tensors, f"{p}.group{j}.key", layer.groups.keys[j])
            _put(tensors, f"{p}.group{j}.value", layer.groups.values[j])
        layers.append(state)
    facts = {**facts_of(model), "strategy": str(cache.strategy)}
    coding = None if encoder is None else dataclasses.asdict(encoder)
    return serialize.dumps(tensors, facts, {"layers": layers, "paged": cache.paged, "cachegen": coding})


def load(model, blob, paged: bool | None = None, verify: bool = True):
    """A cache for ``model`` holding what ``blob`` (bytes, or a path to a file of them) holds,
    ready to continue generating; ``paged`` as the saved cache's unless given. ``verify=False``
    skips the checksum (:func:`kvplug.serialize.loads`), for blobs this process made."""
    from .api import cache as make_cache

    if isinstance(blob, (str, Path)):
        blob = Path(blob).read_bytes()
    tensors, facts, state = serialize.loads(blob, expect=facts_of(model), verify=verify)
    strategy = parse(facts["strategy"])
    cache = make_cache(model, strategy, paged=state["paged"] if paged is None else paged)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tensors = {name: t.to(device) for name, t in tensors.items()}
    codec = strategy.codec
    read = read_dtype(codec, dtype)
    for i, (layer, s) in enumerate(zip(cache.layers, state["layers"])):
        p = f"layer{i}"
        layer.dtype, layer.device, layer.is_initialized = dtype, device, True
        layer.seen, layer.high, layer.cap_max, layer.low = s["seen"], s["high"], s["cap_max"], s["low"]
        layer.scorer = None if s["scorer"] is None else parse(s["scorer"]).scorer
        layer.next_pos = tensors[f"{p}.next_pos"]
        layer.capacity = tensors.get(f"{p}.capacity")
        counts = tensors[f"{p}.counts"]
        positions = tensors[f"{p}.positions"].to(getattr(torch, s["positions_dtype"]))
        scores = tensors.get(f"{p}.scores")
        if scores is None:
            scores = torch.zeros(positions.shape, dtype=torch.float32, device=device)
        b = counts.shape[0]
        if s["store"] == "paged":
            store = PagedStore(codec, dtype, facts["num_kv_heads"], facts["head_dim"], device, read)
        else:  # a grouped codec (kivi) or a residual window keeps its newest tokens uncompressed in the slots
            store = SlotStore(codec if codec.per_token else NoCodec(), read)
        layer.slots = store
        if state.get("cachegen") is not None:  # decode the streams and store them as the cache would
            coder = CacheGen(**state["cachegen"])
            k, v = (coder.decode({n: t.cpu() for n, t in _take(tensors, f"{p}.cachegen.{role}").items()}, i,
                                 len(cache.layers)).to(device=device, dtype=dtype) for role in ("key", "value"))
            store.init(k, v, positions >= 0, positions, scores)
            continue
        if s["store"] == "paged":
            pages = tensors[f"{p}.pages"]
            store._allocate(b, s["used"] + GROWTH)
            blocks = store.cache.shape[0] // b
            store.cache.view(b, blocks, *store.cache.shape[1:])[:, :pages.shape[1]] = pages
            cap = blocks * store.BLOCK
            if store.tail is not None:
                store.tail.keys, store.tail.values = tensors[f"{p}.tail.key"], tensors[f"{p}.tail.value"]
        else:
            # the live store's capacity, so that the loaded one grows when it would and its tensors
            # have its strides: the same attention arithmetic, bit for bit (older blobs: the used slots)
            cap = max(s.get("slots", s["used"]), s["used"])
            store.keys, store.values = ({n: _pad(t, cap - t.shape[-2], -2) for n, t in _take(tensors, f"{p}.{role}").items()}
                                        for role in ("key", "value"))
        store.counts = counts
        store.positions = _pad(positions, cap - positions.shape[-1], -1, -1)
        store.scores = _pad(scores, cap - scores.shape[-1], -1)
        if s["groups"] or (not codec.per_token and s["store"] != "paged"):
            groups = GroupStore(codec, read)
            for j in range(s["groups"]):
                groups.keys.append(_take(tensors, f"{p}.group{j}.key"))
                groups.values.append(_take(tensors, f"{p}.group{j}.value"))
            groups.tokens = s["group_tokens"]
            layer.groups = groups
    return cache
