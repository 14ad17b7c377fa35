"""The ``kvplug`` attention function registered with ``transformers.AttentionInterface``.

HF attention modules call ``past_key_values.update(k, v)`` and then the attention function with
the same key tensor. A :class:`KVPlugLayer` marks itself as the layer being updated; this
function then runs the prompt's attention (transformers' own SDPA, so outputs are unchanged) and
hands the queries to the layer to compress its prompt, or attends over the compressed cache while
generating. Any other cache (or none) gets plain SDPA, so the implementation is safe to leave on.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from .contract import just_updated

NAME = "kvplug"


def _prompt_valid(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """``[B, T]`` True for real (non-padding) prompt tokens, read off the last query row of the mask."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    last = attention_mask[:, 0, -1, -length:]
    return last if last.dtype == torch.bool else last == 0


def kvplug_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    marked = just_updated.get()
    if marked is None or marked[1] is not key:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    just_updated.set(None)
    layer = marked[0]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if layer.pending is not None:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                        dropout=dropout, **kwargs)
        valid = _prompt_valid(attention_mask, key.shape[0], key.shape[-2], key.device)
        layer.compress_prompt(query, valid, scale)
        return out, None
    return layer.attend(query, scale), None


def register() -> None:
    """Make ``attn_implementation="kvplug"`` available (idempotent)."""
    AttentionInterface.register(NAME, kvplug_attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
