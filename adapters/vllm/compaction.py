"""The worker side of eviction for one layer: pick the kept tokens, move them, read what is left.

Pure PyTorch on a layer's paged cache (:class:`~.layout.PagedKV`), no vLLM import, so the CPU
backend and a GPU one can share it. Where tokens go is :func:`.eviction.plan`, the function the
scheduler frees blocks by; the tokens kept after the prompt are the core's
:meth:`Strategy.select` on the same inputs the HF adapter gives it (the prompt's keys, values and
its last queries), so both engines keep the same positions per layer and head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvplug.attention import group_mean
from kvplug.scorers.base import ScoreInputs
from kvplug.strategy import Strategy

from .eviction import Plan, plan, replaces
from .layout import PagedKV, slots_of


class LayerEviction:
    """Eviction of one attention layer; a request is named by its block-table row and prompt length."""

    def __init__(self, strategy: Strategy, paged: PagedKV, layer_idx: int, num_layers: int):
        self.strategy, self.paged = strategy, paged
        self.layer_idx, self.num_layers = layer_idx, num_layers
        self.replaces = replaces(strategy)
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None
        """With :attr:`replaces`: per cache slot and head, the position (int32) and running score
        (float32) of the token there, beside the cache (8 bytes per token-head, outside vLLM's KV
        accounting), made at the first use."""

    def plan(self, prompt_len: int, num_tokens: int) -> Plan:
        return plan(self.strategy, prompt_len, num_tokens, self.layer_idx, self.num_layers)

    def held(self, prompt_len: int, num_tokens: int, device=None) -> torch.Tensor:
        """The slots (positions in the request's blocks) the plan reads at ``num_tokens``, ascending."""
        runs = self.plan(prompt_len, num_tokens).slots(num_tokens)
        return torch.cat([torch.arange(r.start, r.stop, device=device) for r in runs] or
                         [torch.zeros(0, dtype=torch.long, device=device)])

    @torch.no_grad()
    def select(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions ``[H, K]`` (ascending) each KV head keeps of a prompt whose queries ``[P, Hq, D]``
        and keys/values ``[H, P, D]`` are given (every head keeps the count the plan expects), and,
        with :attr:`replaces`, their running scores ``[H, K]`` (else None)."""
        scorer = self.strategy.scorer
        length = keys.shape[1]
        window = length if scorer.needs_all_queries else min(scorer.observation_window, length)
        observed = queries[length - window:].transpose(0, 1)[None]
        inputs = ScoreInputs(keys=keys[None], values=values[None], queries=observed,
                             valid=torch.ones(1, length, dtype=torch.bool, device=keys.device), scale=scale,
                             layer_idx=self.layer_idx, num_layers=self.num_layers)
        sel = self.strategy.select(inputs)
        expected = sum(map(len, self.plan(length, length).slots(length)))
        if not bool((sel.counts == expected).all()):
            raise RuntimeError(f"kvplug: layer {self.layer_idx} kept {sel.counts.tolist()} tokens per head, the "
                               f"block accounting expects {expected}")
        kept = sel.indices[0]
        return kept, sel.scorer.running_scores(inputs)[0].gather(-1, kept) if self.replaces else None

    def visible(self, prompt_len: int, kept: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """``[H, num_tokens - P, num_tokens]``: which logical positions each query after the prompt
        sees (a step that re-runs a preempted request's prompt and generated tokens at once): the
        kept prompt tokens and the generated ones up to the query, less what streaming evicted by then."""
        heads, device = kept.shape[0], kept.device
        pos = torch.arange(num_tokens, device=device)
        queries = pos[prompt_len:]
        held = torch.ones(heads, num_tokens, dtype=torch.bool, device=device)
        held[:, :prompt_len] = False
        held[torch.arange(heads, device=device)[:, None], kept] = True
        mask = held[:, None, :] & (pos[None, :] <= queries[:, None])[None]
        if self.strategy.scorer.evicts_on_decode:
            for j, q in enumerate(queries.tolist()):
                p = self.plan(prompt_len, q + 1)
                mask[:, j] &= (pos < p.front) | (pos >= p.recent)
        return mask

    def after_prompt(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                     block_ids: torch.Tensor, prompt_len: int, scale: float, out: torch.Tensor) -> None:
        """A request's step that held its whole prompt (``query``/``key``/``value`` ``[T, heads, D]``,
        stored at positions ``0..T-1``): keep the selection and compact it. When ``T`` exceeds the
        prompt (a preempted request re-runs its generated tokens too), those tokens' outputs
        ``out[prompt_len:]`` are what the HF adapter's decode steps gave them: attention over the
        kept tokens as stored (encoded and decoded). The prompt's own outputs are the caller's."""
        total, p = query.shape[0], prompt_len
        keys, values = key.transpose(0, 1), value.transpose(0, 1)
        kept, scores = self.select(query[:p], keys[:, :p], values[:, :p], scale)
        if self.replaces:  # the decode steps again, one token at a time, on what was stored
            slots = self.compact(kv_cache, block_ids, p, kept)
            positions, running = self._state(kv_cache)
            positions[slots], running[slots] = kept.T.int(), scores.T.float()
            for n in range(p, total):
                out[n:n + 1] = self.decode(query[n:n + 1], kv_cache, block_ids, p, n, scale)
            return
        if total > p:
            out[p:] = attend(query[p:], self.paged.roundtrip(keys, "key"), self.paged.roundtrip(values, "value"),
                             scale, p, self.visible(p, kept, total))
        self.compact(kv_cache, block_ids, p, kept)

    def compact(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, prompt_len: int,
                kept: torch.Tensor) -> torch.Tensor:
        """Move the kept prompt tokens ``kept`` ``[H, K]`` into the slots the plan holds them in
        after the prompt (``[P - K, P)``; streaming's are in place already); returns those cache
        slots ``[K]``."""
        bs = kv_cache.shape[2]
        dst = self.held(prompt_len, prompt_len, kept.device)
        held = slots_of(block_ids, dst, bs)
        if not bool((kept == dst).all()):
            self.paged.move(kv_cache, slots_of(block_ids, kept, bs), held)
        return held

    @torch.no_grad()
    def decode(self, query: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor, prompt_len: int,
               position: int, scale: float) -> torch.Tensor:
        """One generated token's step (its K/V already stored at its own slot): with :attr:`replaces`
        it first takes the slot of each head's lowest-ranked unprotected token (as the HF adapter's
        layer does), then attends over the held tokens, whose running scores then take this step's
        attention. Returns ``[1, Hq, D]``."""
        if self.replaces:
            self._admit(kv_cache, block_ids, prompt_len, position)
        slots = self.held_slots(block_ids, prompt_len, position + 1, kv_cache.shape[2])
        keys, values = self.paged.read(kv_cache, slots)
        out = attend(query, keys, values, scale, position)
        if self.replaces:
            heads, group = keys.shape[0], query.shape[1] // keys.shape[0]
            logits = query[0].float().view(heads, group, -1) @ keys.float().transpose(-1, -2) * scale
            probs = group_mean(torch.softmax(logits, -1).flatten(0, 1)[None], heads)[0]  # [H, L]
            _, running = self._state(kv_cache)
            running[slots] = self.strategy.scorer.decode_update(running[slots].T[None], probs[None])[0].T
        return out

    def _admit(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, prompt_len: int, position: int) -> None:
        """The token at ``position`` joins the held slots: at its own while they grow to the
        capacity, else moved (codes and scale) into each head's evicted slot."""
        bs, heads, device = kv_cache.shape[2], kv_cache.shape[1], block_ids.device
        positions, running = self._state(kv_cache)
        capacity = self.plan(prompt_len, position).front
        held = self.held_slots(block_ids, prompt_len, position, bs)  # [S]
        own = slots_of(block_ids, torch.tensor([position], device=device), bs).expand(heads)
        target = own
        if len(held) >= capacity:
            scorer = self.strategy.scorer
            protected = scorer.protected(positions[held].T[None].long(), torch.full((1, 1, 1), position, device=device),
                                         torch.full((1, heads), capacity, device=device))[0]
            target = held[running[held].T.masked_fill(protected, float("inf")).argmin(-1)]  # [H]
            self.paged.move(kv_cache, own[:, None], target[:, None])
        h = torch.arange(heads, device=device)
        positions[target, h] = position
        running[target, h] = self.strategy.scorer.new_token_score(torch.full((heads,), position, device=device))

    def _state(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots, heads = kv_cache.shape[0] * kv_cache.shape[2], kv_cache.shape[1]
        if self.state is None or self.state[0].shape != (slots, heads):
            self.state = (torch.full((slots, heads), -1, dtype=torch.int32, device=kv_cache.device),
                          torch.zeros(slots, heads, dtype=torch.float32, device=kv_cache.device))
        return self.state

    def held_slots(self, block_ids: torch.Tensor, prompt_len: int, num_tokens: int, block_size: int) -> torch.Tensor:
        """The cache slots (``block * block_size + offset``) of :meth:`held`, through a request's block-table row."""
        return slots_of(block_ids, self.held(prompt_len, num_tokens, block_ids.device), block_size)

    def read(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, prompt_len: int,
             num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded keys/values ``[H, L, D]`` of the tokens a step over ``num_tokens`` attends over."""
        return self.paged.read(kv_cache, self.held_slots(block_ids, prompt_len, num_tokens, kv_cache.shape[2]))


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, context: int = 0,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """``query`` ``[Tq, Hq, D]`` at positions ``context ..`` over keys/values ``[H, L, D]``;
    ``mask`` ``[H, Tq, L]`` per KV head (default: causal by position). Returns ``[Tq, Hq, D]``."""
    tq, length = query.shape[0], keys.shape[1]
    q = query.transpose(0, 1)
    if mask is not None:
        mask = mask.repeat_interleave(q.shape[0] // keys.shape[0], 0)
    elif tq > 1:
        pos = torch.arange(length, device=q.device)
        mask = pos[None, :] <= (context + torch.arange(tq, device=q.device))[:, None]
    out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[0] != keys.shape[0])
    return out.transpose(0, 1)
