"""One decoder layer's compressed KV cache (transformers' cache-layer contract: :mod:`.contract`).

The first ``update`` (the prompt) is held raw until the attention function has seen the queries:
then the strategy's scorer picks the tokens to keep and the codec stores them. Later tokens are
stored as they come; a scorer that evicts while generating (streaming, h2o, tova) writes each
new token over its lowest-ranked slot once a head is at its budget. With a merger (MiniCache),
the first layer of a pair parks its prompt in the cache's shared dict until the second layer has
its own; the second builds one :class:`~.merged.MergedStore` that both read. Positions stay logical:
``get_seq_length`` counts every token ever given (padding included), as masks and RoPE expect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvplug.attention import step_attention
from kvplug.codecs.none import NoCodec
from kvplug.errors import SpecError
from kvplug.scorers.base import ScoreInputs
from kvplug.strategy import Strategy

from .contract import PromptFirstLayer
from .merged import MergedStore
from .store import GroupStore, PagedStore, SlotStore, read_dtype

class KVPlugLayer(PromptFirstLayer):
    """Compressed K/V of one attention layer."""

    def __init__(self, strategy: Strategy, layer_idx: int, num_layers: int, paged: bool | None = None,
                 keep_prompt: bool = False, shared: dict | None = None):
        super().__init__()
        codec, scorer = strategy.codec, strategy.scorer
        if scorer is not None and scorer.evicts_on_decode and not codec.per_token:
            raise SpecError(f"{scorer.name} evicts while generating, which {codec.name} cannot do (it quantizes "
                            f"groups of {codec.token_group} tokens, the newest {codec.residual} kept in full "
                            f"precision); use a per-token codec (int8/int4/int2/fp8, no residual) "
                            f"or a prefill-only scorer (snapkv, knorm, random)")
        self.strategy, self.layer_idx, self.num_layers = strategy, layer_idx, num_layers
        self.scorer = scorer  # this layer's own, once the prompt is seen (Scorer.for_layer)
        self.paged = paged  # the paged layout read by kvplug.triton_ops where the codec allows it (None: on CUDA)
        self.keep_prompt = keep_prompt
        self.shared = {} if shared is None else shared  # state between the layers of one cache
        pairs = [] if strategy.merger is None else strategy.merger.pairs(num_layers)
        self.pair = next(((p, p.index(layer_idx)) for p in pairs if layer_idx in p), None)  # (pair, 0 | 1)
        self.merged: tuple[MergedStore, int] | None = None
        self.prompt: tuple | None = None  # (keys, values, queries, valid, scale) when keep_prompt
        self.seen = 0
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.slots: SlotStore | None = None
        self.groups: GroupStore | None = None
        self.next_pos: torch.Tensor | None = None  # [B] logical position of the next real token
        self.capacity: torch.Tensor | None = None  # [B, H] tokens a head may hold while evicting
        self.high = 0  # host-side bound on the slots' counts (no device sync to size the store)
        self.cap_max = 0  # host-side max of capacity (evicting scorers)
        self.low = 0  # host-side min of the residual slots' counts (grouped codecs)

    def prompt_stored(self) -> bool:
        return self.slots is not None

    def reset(self) -> None:
        self.shared.clear()
        self.__init__(self.strategy, self.layer_idx, self.num_layers, self.paged, self.keep_prompt, self.shared)

    # prefill ----------------------------------------------------------------------------------
    @torch.no_grad()
    def compress_prompt(self, queries: torch.Tensor, valid: torch.Tensor, scale: float) -> None:
        """Pick and store the prompt tokens to keep, now that the prompt's ``queries`` are known."""
        keys, values = self.take_prompt(queries, valid, scale)
        b, h, t, d = keys.shape
        strategy, scorer = self.strategy, self.strategy.scorer
        window = 0 if scorer is None else (t if scorer.needs_all_queries else min(scorer.observation_window, t))
        inputs = ScoreInputs(keys=keys, values=values, queries=queries[:, :, t - window:], valid=valid,
                             scale=scale, layer_idx=self.layer_idx, num_layers=self.num_layers,
                             rope=self.shared.get("rope"), out_proj=self._out_proj(scorer))
        if scorer is not None and scorer.across_layers:
            self._select_across_layers(inputs)
        else:
            self._store_prompt(inputs, strategy.select(inputs))

    def _select_across_layers(self, inputs: ScoreInputs) -> None:
        """A scorer that shares its budget across layers (CAKE): park this layer's prompt until
        the last layer has seen its own, then split the budget and store every layer's share."""
        if self.pair is not None:
            raise SpecError(f"{self.strategy.scorer.name} shares its budget across layers, which a merger's "
                            f"layer pairs cannot follow; drop {self.strategy.merger.name}")
        parked = self.shared.setdefault("across_layers", {})
        if self.layer_idx in parked:
            raise RuntimeError(f"kvplug: {self.strategy.scorer.name} needs the whole prompt in one forward pass "
                               f"(layer {self.layer_idx} saw a second prompt chunk before the last layer saw one)")
        parked[self.layer_idx] = (self, inputs)
        if len(parked) < self.num_layers:
            return
        del self.shared["across_layers"]
        layers = [parked[i] for i in range(self.num_layers)]
        counts = self.strategy.layer_counts([inputs for _, inputs in layers])
        for (layer, layer_inputs), kept in zip(layers, counts):
            layer._store_prompt(layer_inputs, self.strategy.select(layer_inputs, kept=kept))

    def _store_prompt(self, inputs: ScoreInputs, sel) -> None:
        """Store the prompt tokens ``sel`` keeps of ``inputs`` (the layer's prompt)."""
        keys, values, valid = inputs.keys, inputs.values, inputs.valid
        b, h, t, d = keys.shape
        strategy = self.strategy
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
            own = scorer.head_capacity(present, self.layer_idx, self.num_layers, h)
            if own is not None:  # heads that differ (DuoAttention's streaming and retrieval heads)
                self.capacity = own.to(self.capacity.device)
            self.cap_max = int(self.capacity.max())  # once per prompt
        self.next_pos = valid.sum(-1)
        codec = strategy.codec
        read = read_dtype(codec, self.dtype)
        if self.pair is not None:
            m = self._prefix_length(sel.counts)
            self._merge(kept_k[..., :m, :], kept_v[..., :m, :], kept_valid[..., :m], read)
            kept_k, kept_v, kept_valid, positions = (kept_k[..., m:, :], kept_v[..., m:, :], kept_valid[..., m:],
                                                     positions[..., m:])
        paged = self.paged if self.paged is not None else self.device.type == "cuda"
        in_pages = paged and PagedStore.supports(codec, self.dtype, d)
        # a per-token codec with a residual window: in the pages with a full-precision tail, or
        # (reference path, or a merger's pair) grouped one token at a time below
        if codec.per_token or (in_pages and self.pair is None):
            self.slots = PagedStore(codec, self.dtype, h, d, self.device, read) if in_pages else SlotStore(codec, read)
            self.slots.init(kept_k, kept_v, kept_valid, positions, scores)
            self.high = kept_k.shape[-2]
            return
        n_quant = self._prefix_length(kept_valid.sum(-1))
        self.groups = GroupStore(codec, read)
        self.groups.append(kept_k[..., :n_quant, :], kept_v[..., :n_quant, :])
        self.slots = SlotStore(NoCodec(), read)
        self.slots.init(kept_k[..., n_quant:, :], kept_v[..., n_quant:, :], kept_valid[..., n_quant:],
                        positions[..., n_quant:])
        self.high = kept_k.shape[-2] - n_quant
        self.low = int(self.slots.counts.min())  # once per prompt

    def _out_proj(self, scorer) -> torch.Tensor | None:
        """This layer's attention output projection weight, for a scorer that reads it."""
        if scorer is None or not scorer.needs_out_proj:
            return None
        return self.shared["model"].attention[self.layer_idx].o_proj.weight

    def _prefix_length(self, counts: torch.Tensor) -> int:
        """Leading kept slots a grouped codec quantizes now (whole groups, not the residual
        window); every slot for a per-token codec."""
        codec = self.strategy.codec
        if codec.per_token:
            return int(counts.max())
        return max(0, (int(counts.min()) - codec.residual) // codec.token_group * codec.token_group)

    def _merge(self, keys: torch.Tensor, values: torch.Tensor, filled: torch.Tensor, read: torch.dtype) -> None:
        """First layer of a pair: park the prompt; second: merge both into one shared store."""
        pair, which = self.pair
        if which == 0:
            self.shared[pair] = (self, keys, values)
            return
        first, first_keys, first_values = self.shared.pop(pair)
        store = MergedStore(self.strategy.merger, self.strategy.codec, read)
        store.build((first_keys, first_values), (keys, values), filled)
        first.merged, self.merged = (store, 0), (store, 1)

    # decode -----------------------------------------------------------------------------------
    def _bound_after(self, n: int) -> int:
        """The host-side bound on the slots' counts after ``n`` more tokens (a head that evicts
        while generating stops at its budget)."""
        evicting = self.scorer is not None and self.scorer.evicts_on_decode
        return min(self.high + n, self.cap_max) if evicting else self.high + n

    def replayed(self, n: int = 1) -> None:
        """The host-side counters after a replayed CUDA graph of a step of ``n`` tokens
        (:class:`~.graphs.DecodeGraph`): what :meth:`update` moves on the host as it runs."""
        self.seen += n
        self.high = self._bound_after(n)

    @torch.no_grad()
    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        scorer = self.scorer
        evicting = scorer is not None and scorer.evicts_on_decode
        if not evicting:  # every head appends the step's tokens at its count, all in one write
            n = keys.shape[-2]
            ahead = torch.arange(n, device=keys.device)
            slot = self.slots.counts[..., None] + ahead
            pos = (self.next_pos.view(-1, 1, 1) + ahead).expand_as(slot)
            self.high = self._bound_after(n)
            self.slots.write(keys, values, slot, pos, None, top=self.high, added=n)
            self.next_pos += n  # in place, as the counts: a CUDA graph of the step reads the same tensors
        for i in range(keys.shape[-2] if evicting else 0):  # token by token: each may replace a slot
            step = self.next_pos.view(-1, 1, 1)
            counts = self.slots.counts
            slot, added = counts, 1  # a head below its budget appends at its count
            self.high = self._bound_after(1)  # a head at its budget overwrites
            if self.slots.capacity:
                room = counts < self.capacity
                victim = scorer.replaced(self.slots.scores, self.slots.positions, step, self.capacity)
                slot, added = torch.where(room, counts, victim), room
            pos = step.squeeze(-1).expand_as(slot)
            new_score = scorer.new_token_score(pos)[..., None]
            self.slots.write(keys[..., i:i + 1, :], values[..., i:i + 1, :], slot[..., None], pos[..., None],
                             new_score, top=self.high, added=added)
            self.next_pos += 1  # in place (pos, a view of it, has been written)
        if self.groups is not None:
            codec = self.strategy.codec
            self.low += keys.shape[-2]
            while self.low >= codec.residual + codec.token_group:
                k, v, _ = self.slots.take_front(codec.token_group)
                self.groups.append(k, v)
                self.low -= codec.token_group
                self.high -= codec.token_group

    def attend(self, queries: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of this step's queries ``[B, Hq, Tq, D]`` over the compressed cache (reference
        path: decode to the model dtype, mask empty and future slots). Returns ``[B, Tq, Hq, D]``."""
        b, hq, tq, d = queries.shape
        scorer = self.scorer
        needs_probs = scorer is not None and scorer.needs_decode_attention
        if self.pair is not None and self.merged is None:
            raise RuntimeError(f"kvplug: layer {self.layer_idx} shares its prompt with layer {self.pair[0][1]}, "
                               f"which has not seen it")
        if tq == 1 and isinstance(self.slots, PagedStore) and self.merged is None:
            if not needs_probs:
                return self.slots.attend_one(queries[:, :, 0], scale)[:, None]
            if self.slots.tail is None:  # the logits the kernel (or its reference) writes give the scores
                out, probs = self.slots.attend_scored(queries[:, :, 0], scale)
                self.slots.scores.copy_(scorer.decode_update(self.slots.scores, probs))
                return out[:, None]
        keys, values, filled = self.slots.decode()
        qpos = self.next_pos.view(b, 1, 1, 1) - tq + torch.arange(tq, device=queries.device).view(1, 1, tq, 1)
        visible = filled[:, :, None, :] & (self.slots.positions[:, :, None, :] <= qpos)
        for prefix in self._prefixes():  # prompt tokens stored elsewhere: before every query
            keys, values = torch.cat([prefix[0], keys], -2), torch.cat([prefix[1], values], -2)
            visible = torch.cat([prefix[2][:, :, None, :].expand(-1, -1, tq, -1), visible], -1)
        h = keys.shape[1]
        mask = visible.repeat_interleave(hq // h, dim=1)
        out = F.scaled_dot_product_attention(queries.to(keys.dtype), keys, values, attn_mask=mask, scale=scale,
                                             enable_gqa=hq != h).to(queries.dtype)
        if needs_probs:
            probs = step_attention(queries[:, :, -1], keys, scale, visible[:, :, -1, :])
            self.slots.scores.copy_(scorer.decode_update(self.slots.scores, probs))
        return out.transpose(1, 2)

    def _prefixes(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(keys, values, filled)`` of the prompt tokens held outside the slots (merged, grouped)."""
        out = []
        if self.groups is not None and self.groups.tokens:
            k, v = self.groups.decode()
            out.append((k, v, torch.ones(k.shape[:-1], dtype=torch.bool, device=k.device)))
        if self.merged is not None:
            store, which = self.merged
            out.append(store.decode(which))
        return out

    # memory -----------------------------------------------------------------------------------
    def kept_tokens(self) -> int:
        """Tokens held over all heads of all sequences."""
        if self.slots is None:
            return 0
        grouped = self.groups.tokens * self.slots.counts.numel() if self.groups is not None else 0
        merged = int(self.merged[0].filled.sum()) if self.merged is not None else 0
        return grouped + merged + int(self.slots.counts.sum())

    def bookkeeping_bytes(self) -> int:
        """Bytes of the per-slot positions and eviction scores beside the K/V."""
        return 0 if self.slots is None else self.slots.bookkeeping_bytes()

    def stored_bytes(self) -> int:
        """Bytes of the K/V this layer's tensors hold (codes, scales, full-precision residual),
        padding to the longest head and row included."""
        if self.slots is None:
            return 0
        total = self.slots.stored_bytes() + (self.groups.stored_bytes() if self.groups is not None else 0)
        if self.merged is not None and self.merged[1] == 1:  # a pair's store counts once, in its second layer
            total += self.merged[0].stored_bytes()
        return total
