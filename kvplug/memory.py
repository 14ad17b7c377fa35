"""Bytes of K/V a transformers cache really holds (torch only; no engine imports).

kvplug's caches report their own (``stored_bytes``); any other cache (DynamicCache, HF's
QuantizedCache with quanto or HQQ) is measured by looking inside its tensors, packed tensor
subclasses included.
"""

from __future__ import annotations

import torch


def tensor_bytes(t) -> int:
    """Bytes of a tensor, looking inside tensor subclasses (quanto's packed QTensors)."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _kv_tensors(cache):
    """Every tensor of K/V a transformers cache's layers hold: full-precision keys/values
    (QuantizedCache's residual), quanto's packed states, HQQ's (packed, meta) pairs unpacked."""
    for layer in cache.layers:
        for attr in ("keys", "values", "_quantized_keys", "_quantized_values"):
            t = getattr(layer, attr, None)
            if isinstance(t, tuple):  # HQQ: (packed tensor, meta dict)
                packed, meta = t
                yield packed
                yield from (v for v in meta.values() if isinstance(v, torch.Tensor))
            elif isinstance(t, torch.Tensor):
                yield t


def held_bytes(cache) -> int:
    """K/V bytes ``cache`` holds, every layer: full-precision keys/values (QuantizedCache's
    residual) plus quantized states (quanto tensors, or HQQ's (packed, meta) pairs)."""
    if hasattr(cache, "stored_bytes"):
        return cache.stored_bytes()
    return sum(tensor_bytes(t) for t in _kv_tensors(cache))


def device_bytes(cache, device: str = "cuda") -> int:
    """Of :func:`held_bytes`, those on the model's ``device`` (type): kvplug's caches report their
    own; for any other cache, the bytes of its tensors there (an offloaded cache's resident layers)."""
    if hasattr(cache, "device_bytes"):
        return cache.device_bytes()
    kind = torch.device(device).type
    return sum(tensor_bytes(t) for t in _kv_tensors(cache) if t.device.type == kind)


def dynamic_cache_bytes(model, tokens: int) -> int:
    """Bytes a ``DynamicCache`` holds for ``tokens`` tokens of one sequence (all layers, K and V)."""
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    dtype_bytes = next(model.parameters()).element_size()
    return tokens * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2 * dtype_bytes
