"""transformers' cache-layer contract as kvplug's layers keep it (one place for both kinds).

The first ``update`` of a layer (the prompt) is held raw in ``pending`` until the attention
function has seen the queries (``compress_prompt``); later updates go to ``_append``. Every
update marks the layer in :data:`just_updated`, which the ``kvplug`` attention function reads.
Positions stay logical: ``get_seq_length`` counts every token ever given (padding included), as
masks and RoPE expect.
"""

from __future__ import annotations

import contextvars

import torch
from transformers.cache_utils import CacheLayerMixin

just_updated: contextvars.ContextVar = contextvars.ContextVar("kvplug_just_updated", default=None)
"""(layer, key tensor) of the last ``update``: the attention call that follows reads it."""


class PromptFirstLayer(CacheLayerMixin):
    """A cache layer that stores its prompt once the prompt's queries are known. Subclasses set
    ``strategy``, ``seen = 0`` and ``pending = None`` and implement :meth:`prompt_stored`,
    ``_append`` (a step's K/V) and ``compress_prompt``."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def prompt_stored(self) -> bool:
        """Whether the prompt has been stored (later updates are appended)."""
        raise NotImplementedError

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.strategy.check_head_dim(key_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not self.prompt_stored():
            if self.pending is not None:
                raise RuntimeError("kvplug: the prompt of this layer was never attended; run the model with "
                                   "attn_implementation='kvplug' (kvplug.hf.cache sets it)")
            self.pending = (key_states, value_states)
        else:
            self._append(key_states, value_states)
        self.seen += key_states.shape[-2]
        just_updated.set((self, key_states))
        return key_states, value_states

    def take_prompt(self, queries: torch.Tensor, valid: torch.Tensor, scale: float):
        """The pending prompt ``(keys, values)``, no longer pending; kept with its queries in
        ``prompt`` when the layer keeps its prompt (``keep_prompt``, for ``KVPlugCache.fork``)."""
        keys, values = self.pending
        self.pending = None
        if self.keep_prompt:
            self.prompt = (keys, values, queries, valid, scale)
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("kvplug caches do not support beam search yet")
