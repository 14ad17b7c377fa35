"""Attention statistics scorers need at prefill, without a full seq x seq matrix.

All functions take queries ``[B, Hq, Tq, D]`` (the last ``Tq`` positions of the prompt), keys
``[B, Hkv, T, D]`` (RoPE applied), ``valid`` ``[B, T]`` (False for padding) and the softmax
``scale``; query heads ``h`` belong to KV head ``h // (Hq // Hkv)`` (grouped-query attention).
"""

from __future__ import annotations

import torch


def _grouped(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Queries viewed as ``[B, Hkv, G * Tq, D]`` so one matmul serves a whole group."""
    b, hq, tq, d = queries.shape
    hkv = keys.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads cannot be grouped over {hkv} KV heads")
    return queries.reshape(b, hkv, (hq // hkv) * tq, d)


def attention_probs(
    queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scale: float, first_pos: int
) -> torch.Tensor:
    """Causal softmax of queries at prompt positions ``first_pos ..`` over all keys: ``[B, Hq, Tq, T]``.

    Float32. A key is visible to a query if it is valid and not after it.
    """
    b, hq, tq, _ = queries.shape
    t = keys.shape[2]
    logits = _grouped(queries, keys).float() @ keys.float().transpose(-1, -2) * scale
    logits = logits.reshape(b, hq, tq, t)
    qpos = torch.arange(first_pos, first_pos + tq, device=keys.device)
    visible = (torch.arange(t, device=keys.device) <= qpos[:, None])[None, None] & valid[:, None, None, :]
    logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def window_attention(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the last ``Tq`` prompt positions over the prompt: ``[B, Hq, Tq, T]`` (float32)."""
    return attention_probs(queries, keys, valid, scale, keys.shape[2] - queries.shape[2])


def accumulated_attention(
    queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scale: float, chunk: int = 512
) -> torch.Tensor:
    """Attention each key receives, summed over all valid queries: ``[B, Hq, T]`` (float32).

    ``queries`` are all ``T`` prompt positions; rows are processed ``chunk`` at a time, so memory
    is ``O(chunk * T)``, never ``O(T^2)``. This is the statistic H2O ranks tokens by.
    """
    b, hq, t, _ = queries.shape
    total = torch.zeros(b, hq, t, dtype=torch.float32, device=keys.device)
    for start in range(0, t, chunk):
        probs = attention_probs(queries[:, :, start:start + chunk], keys, valid, scale, start)
        rows = valid[:, start:start + chunk].float()
        total += torch.einsum("bhqt,bq->bht", probs, rows)
    return total


def group_mean(per_query_head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[B, Hq, ...]`` averaged over the query heads of each KV head: ``[B, Hkv, ...]``."""
    b, hq = per_query_head.shape[:2]
    return per_query_head.reshape(b, num_kv_heads, hq // num_kv_heads, *per_query_head.shape[2:]).mean(2)


def step_attention(query: torch.Tensor, keys: torch.Tensor, scale: float,
                   visible: torch.Tensor | None = None) -> torch.Tensor:
    """One generated token's attention over the held slots, as decode-time eviction reads it:
    ``query`` ``[B, Hq, D]``, ``keys`` ``[B, Hkv, S, D]``, ``visible`` ``[B, Hkv, S]`` (default:
    all) -> the softmax over the visible slots averaged over each KV head's query heads ``[B, Hkv,
    S]`` (float32; hidden slots 0): :func:`step_probs` of the logits."""
    b, hq, d = query.shape
    h = keys.shape[1]
    logits = (query.float().reshape(b, h, hq // h, d) @ keys.float().transpose(-1, -2)) * scale  # [B, H, G, S]
    return step_probs(logits.reshape(b, hq, -1), h, visible)


def step_probs(logits: torch.Tensor, num_kv_heads: int, visible: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`step_attention` from the step's logits ``[B, Hq, S]`` (``q . k * scale`` per query
    head and slot, e.g. as the decode kernel wrote them): softmax over the ``visible`` ``[B, Hkv,
    S]`` slots (float32; hidden ones 0, whatever their logit), mean over each KV head's query heads."""
    b, hq, s = logits.shape
    logits = logits.float().reshape(b, num_kv_heads, hq // num_kv_heads, s)
    if visible is not None:
        logits = logits.masked_fill(~visible[:, :, None, :], float("-inf"))
    return torch.softmax(logits, -1).mean(2)
