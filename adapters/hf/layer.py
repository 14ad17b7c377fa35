"""One decoder layer's compressed KV cache, following transformers 5.x's cache-layer contract.

The first ``update`` (the prompt) is held raw until the attention function has seen the queries:
then the strategy's scorer picks the tokens to keep and the codec stores them. Later tokens are
stored as they come; a scorer that evicts while generating (streaming, h2o, tova) writes each
new token over its lowest-ranked slot once a head is at its budget. Positions stay logical:
``get_seq_length`` counts every token ever given (padding included), as masks and RoPE expect.
"""

from __future__ import annotations

import contextvars

import torch
import torch.nn.functional as F
from transformers.cache_utils import CacheLayerMixin

from kvplug.attention import group_mean
from kvplug.codecs.none import NoCodec
from kvplug.errors import SpecError
from kvplug.scorers.base import ScoreInputs
from kvplug.strategy import Strategy

from .store import GroupStore, PagedStore, SlotStore

just_updated: contextvars.ContextVar = contextvars.ContextVar("kvplug_just_updated", default=None)
"""(layer, key tensor) of the last ``update``: the attention call that follows reads it."""


class KVPlugLayer(CacheLayerMixin):
    """Compressed K/V of one attention layer."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, strategy: Strategy, layer_idx: int, num_layers: int, paged: bool = False,
                 keep_prompt: bool = False):
        super().__init__()
        codec, scorer = strategy.codec, strategy.scorer
        if scorer is not None and scorer.evicts_on_decode and codec.token_group > 1:
            raise SpecError(f"{scorer.name} evicts while generating, which {codec.name} cannot do (it quantizes "
                            f"groups of {codec.token_group} tokens); use a per-token codec (int8/int4/int2/fp8) "
                            f"or a prefill-only scorer (snapkv, knorm, random)")
        self.strategy, self.layer_idx, self.num_layers = strategy, layer_idx, num_layers
        self.scorer = scorer  # this layer's own, once the prompt is seen (Scorer.for_layer)
        self.paged = bool(paged)  # the paged layout read by kvplug.triton_ops, where the codec allows it
        self.keep_prompt = keep_prompt
        self.prompt: tuple | None = None  # (keys, values, queries, valid, scale) when keep_prompt
        self.seen = 0
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.slots: SlotStore | None = None
        self.groups: GroupStore | None = None
        self.next_pos: torch.Tensor | None = None  # [B] logical position of the next real token
        self.capacity: torch.Tensor | None = None  # [B, H] tokens a head may hold while evicting

    # transformers' contract -------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.strategy.check_head_dim(key_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.slots is None:
            if self.pending is not None:
                raise RuntimeError("kvplug: the prompt of this layer was never attended; run the model with "
                                   "attn_implementation='kvplug' (kvplug.hf.cache sets it)")
            self.pending = (key_states, value_states)
        else:
            self._append(key_states, value_states)
        self.seen += key_states.shape[-2]
        just_updated.set((self, key_states))
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.strategy, self.layer_idx, self.num_layers, self.paged, self.keep_prompt)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("kvplug caches do not support beam search yet")

    # prefill ----------------------------------------------------------------------------------
    @torch.no_grad()
    def compress_prompt(self, queries: torch.Tensor, valid: torch.Tensor, scale: float) -> None:
        """Pick and store the prompt tokens to keep, now that the prompt's ``queries`` are known."""
        keys, values = self.pending
        self.pending = None
        if self.keep_prompt:
            self.prompt = (keys, values, queries, valid, scale)
        b, h, t, d = keys.shape
        strategy, scorer = self.strategy, self.strategy.scorer
        window = 0 if scorer is None else (t if scorer.needs_all_queries else min(scorer.observation_window, t))
        inputs = ScoreInputs(keys=keys, values=values, queries=queries[:, :, t - window:], valid=valid,
                             scale=scale, layer_idx=self.layer_idx, num_layers=self.num_layers)
        sel = strategy.select(inputs)
        self.scorer = scorer = sel.scorer
        idx = sel.indices
        gather = idx[..., None].expand(-1, -1, -1, d)
        kept_k, kept_v = keys.gather(2, gather), values.gather(2, gather)
        kept_valid = sel.valid()
        positions = inputs.positions[:, None, :].expand(-1, h, -1).gather(-1, idx)
        scores = None
        if scorer is not None and scorer.evicts_on_decode:
            scores = scorer.running_scores(inputs).gather(-1, idx)
            present = valid.sum(-1)
            budget = strategy.budget_per_row(valid, scorer)
            # a head at its budget keeps its count; a short prompt may grow up to the budget
            self.capacity = torch.where((present > budget)[:, None], sel.counts, budget[:, None])
        self.next_pos = valid.sum(-1)
        codec = strategy.codec
        # quantized K/V are read back in float32: rounding them to a 16-bit dtype before the
        # attention would add error on top of the codec's (large logits amplify it)
        read = self.dtype if isinstance(codec, NoCodec) else torch.float32
        if codec.token_group == 1:
            if self.paged and PagedStore.supports(codec, self.dtype, d):
                self.slots = PagedStore(codec, self.dtype, h, d, self.device, read)
            else:
                self.slots = SlotStore(codec, read)
            self.slots.init(kept_k, kept_v, kept_valid, positions, scores)
            return
        g = codec.token_group
        n_quant = max(0, (int(sel.counts.min()) - codec.residual) // g * g)
        self.groups = GroupStore(codec, read)
        self.groups.append(kept_k[..., :n_quant, :], kept_v[..., :n_quant, :])
        self.slots = SlotStore(NoCodec(), read)
        self.slots.init(kept_k[..., n_quant:, :], kept_v[..., n_quant:, :], kept_valid[..., n_quant:],
                        positions[..., n_quant:])

    # decode -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        scorer = self.scorer
        evicting = scorer is not None and scorer.evicts_on_decode
        for i in range(keys.shape[-2]):
            step = self.next_pos.view(-1, 1, 1)
            counts = self.slots.counts
            slot = counts
            if evicting and self.slots.capacity:
                ranked = self.slots.scores.masked_fill(self.slots.positions < 0, float("inf"))
                ranked = ranked.masked_fill(scorer.protected(self.slots.positions, step), float("inf"))
                slot = torch.where(counts >= self.capacity, ranked.argmin(-1), counts)
            pos = step.squeeze(-1).expand_as(slot)
            new_score = scorer.new_token_score(pos) if evicting else torch.zeros_like(pos, dtype=torch.float32)
            self.slots.write(keys[..., i:i + 1, :], values[..., i:i + 1, :], slot[..., None], pos[..., None],
                             new_score[..., None])
            self.next_pos = self.next_pos + 1
        if self.groups is not None:
            codec = self.strategy.codec
            while int(self.slots.counts.min()) >= codec.residual + codec.token_group:
                k, v, _ = self.slots.take_front(codec.token_group)
                self.groups.append(k, v)

    def attend(self, queries: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of this step's queries ``[B, Hq, Tq, D]`` over the compressed cache (reference
        path: decode to the model dtype, mask empty and future slots). Returns ``[B, Tq, Hq, D]``."""
        b, hq, tq, d = queries.shape
        scorer = self.scorer
        needs_probs = scorer is not None and scorer.needs_decode_attention
        if tq == 1 and isinstance(self.slots, PagedStore) and not needs_probs:
            return self.slots.attend_one(queries[:, :, 0], scale)[:, None]
        keys, values, filled = self.slots.decode()
        qpos = self.next_pos.view(b, 1, 1, 1) - tq + torch.arange(tq, device=queries.device).view(1, 1, tq, 1)
        visible = filled[:, :, None, :] & (self.slots.positions[:, :, None, :] <= qpos)
        grouped = self.groups.decode() if self.groups is not None else None
        if grouped is not None:
            keys, values = torch.cat([grouped[0], keys], -2), torch.cat([grouped[1], values], -2)
            always = torch.ones(*visible.shape[:-1], grouped[0].shape[-2], dtype=torch.bool, device=visible.device)
            visible = torch.cat([always, visible], -1)
        h = keys.shape[1]
        mask = visible.repeat_interleave(hq // h, dim=1)
        out = F.scaled_dot_product_attention(queries.to(keys.dtype), keys, values, attn_mask=mask, scale=scale,
                                             enable_gqa=hq != h).to(queries.dtype)
        if needs_probs:
            last = queries[:, :, -1:].float()
            logits = (last.reshape(b, h, hq // h, d) @ keys.float().transpose(-1, -2)) * scale
            logits = logits.masked_fill(~visible[:, :, -1:, :], float("-inf"))
            probs = group_mean(torch.softmax(logits, -1).reshape(b, hq, -1), h)
            self.slots.scores = scorer.decode_update(self.slots.scores, probs)
        return out.transpose(1, 2)

    # memory -----------------------------------------------------------------------------------
    def kept_tokens(self) -> int:
        """Tokens held over all heads of all sequences."""
        if self.slots is None:
            return 0
        grouped = self.groups.tokens * self.slots.counts.numel() if self.groups is not None else 0
        return grouped + int(self.slots.counts.sum())

    def stored_bytes(self) -> int:
        """Bytes of the K/V this layer holds (codes, scales, full-precision residual)."""
        if self.slots is None:
            return 0
        return self.slots.stored_bytes() + (self.groups.stored_bytes() if self.groups is not None else 0)
