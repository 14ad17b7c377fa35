"""The worker side of eviction for one layer: pick the kept tokens, move them, read what is left.

Pure PyTorch on a layer's paged cache (:class:`~.layout.PagedKV`), no vLLM import, so the CPU
backend and a GPU one can share it. Where tokens go is :func:`.eviction.plan`, the function the
scheduler frees blocks by; the tokens kept after the prompt are the core's
:meth:`Strategy.select` on the same inputs the HF adapter gives it (the prompt's keys, values and
its last queries), so both engines keep the same positions per layer and head.

A prompt may come in chunks (vLLM's chunked prefill): nothing is evicted until its last chunk;
each chunk's queries inside the scorer's observation window are kept (:meth:`LayerEviction.observe`,
per request, on this object), and the chunk that ends the prompt selects over the prompt's keys
and values as the backend passes them (read back from the pages in the ``compressed`` prefill
mode, the step's raw ones in ``uncompressed``) and compacts (:meth:`LayerEviction.compress_prompt`).
Steps after the prompt of more than one token (a preempted request's re-run, in chunks or with its
prompt) read the held tokens with a mask per query (:meth:`LayerEviction.extend`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvplug.attention import step_attention
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
        self.pending: dict[int, torch.Tensor] = {}
        """Per request whose prompt is still coming in chunks (named by its first block, which no
        other running request holds: prefix caching is off with eviction), its queries in the
        observation window so far ``[n, Hq, D]``; dropped at the prompt's last chunk, replaced
        when a request starts at position 0."""

    def window(self, prompt_len: int) -> int:
        """How many of the prompt's last queries the scorer reads."""
        scorer = self.strategy.scorer
        return prompt_len if scorer.needs_all_queries else min(scorer.observation_window, prompt_len)

    def observe(self, request: int, query: torch.Tensor, context: int, prompt_len: int) -> torch.Tensor | None:
        """A chunk of the prompt, queries ``[T, Hq, D]`` at positions ``context ..`` (none past the
        prompt): keep those in the observation window; at the chunk that ends the prompt, return
        the window's queries ``[window, Hq, D]`` (else None)."""
        end = context + query.shape[0]
        if end > prompt_len:
            raise ValueError(f"kvplug: observe got positions up to {end} of a {prompt_len}-token prompt")
        lo = prompt_len - self.window(prompt_len)
        earlier = self.pending.pop(request, None) if context else None
        part = query[max(lo - context, 0):]
        rows = part if earlier is None else torch.cat([earlier, part])
        if end < prompt_len:
            self.pending[request] = rows
            return None
        if rows.shape[0] != prompt_len - lo:
            raise RuntimeError(f"kvplug: layer {self.layer_idx} saw {rows.shape[0]} of the {prompt_len - lo} "
                               f"observation queries of a {prompt_len}-token prompt (a chunk went missing)")
        return rows

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
        """Positions ``[H, K]`` (ascending) each KV head keeps of a prompt whose last queries
        ``[>= window, Hq, D]`` (the whole prompt's or the window's, :meth:`window`) and keys/values
        ``[H, P, D]`` are given (every head keeps the count the plan expects), and, with
        :attr:`replaces`, their running scores ``[H, K]`` (else None)."""
        length = keys.shape[1]
        window = self.window(length)
        observed = queries[queries.shape[0] - window:].transpose(0, 1)[None]
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

    def finish_chunk(self, request: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     kv_cache: torch.Tensor, block_ids: torch.Tensor, prompt_len: int, context: int, scale: float,
                     out: torch.Tensor, raw: bool, read: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """A request's step holding prompt tokens at positions ``context ..`` (``context <
        prompt_len``; ``query``/``key``/``value`` ``[T, heads, D]``, all stored at their own slots),
        once the caller has written the outputs of its prompt tokens: keep the observation
        queries (:meth:`observe`); at the chunk that ends the prompt select over the prompt's keys
        and values, the step's raw ones with ``raw`` (the whole prompt is in this step) or else as
        the pages hold them, and compact (:meth:`compress_prompt`); the step's tokens after the
        prompt (a preempted request's re-run) then get ``out`` from :meth:`extend`, what the HF
        adapter's decode steps gave them. ``request``: the request's first block id. ``read``: the
        keys and values ``[H, L, D]`` of positions ``0 ..`` the caller already has for its own
        attention (raw or decoded, as ``raw`` says), used when they cover the prompt."""
        m = min(context + query.shape[0], prompt_len) - context
        observed = self.observe(request, query[:m], context, prompt_len)
        if observed is None:
            return
        if raw and context:
            raise RuntimeError("kvplug: eviction with kvplug_prefill=uncompressed needs each prompt in one step "
                               f"(chunked prefill is turned off for it); this one starts at token {context}")
        if read is not None and read[0].shape[1] >= prompt_len:
            keys, values = read[0][:, :prompt_len], read[1][:, :prompt_len]
        elif raw:
            keys, values = key[:prompt_len].transpose(0, 1), value[:prompt_len].transpose(0, 1)
        else:
            keys, values = self.paged.gather(kv_cache, block_ids, prompt_len)
        self.compress_prompt(observed, keys, values, kv_cache, block_ids, prompt_len, scale)
        if m < query.shape[0]:
            out[m:] = self.extend(query[m:], kv_cache, block_ids, prompt_len, prompt_len, scale)

    def compress_prompt(self, observed: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        kv_cache: torch.Tensor, block_ids: torch.Tensor, prompt_len: int, scale: float) -> None:
        """The prompt is in: select over its keys/values ``[H, P, D]`` with its last queries
        ``observed`` (:meth:`select`), move the kept tokens where the plan holds them, and with
        :attr:`replaces` start their running scores."""
        kept, scores = self.select(observed, keys, values, scale)
        slots = self.compact(kv_cache, block_ids, prompt_len, kept)
        if self.replaces:
            positions, running = self.running_state(kv_cache)
            positions[slots], running[slots] = kept.T.int(), scores.T.float()

    def extend_slots(self, prompt_len: int, context: int, end: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """For queries at positions ``context .. end-1`` (all after the prompt), the slots any of them
        reads, ascending ``[L]``, and which each reads ``[end - context, L]``: query ``q`` reads what
        the plan holds once ``q + 1`` tokens are in (:meth:`held`), up to itself."""
        first = self.plan(prompt_len, context + 1)
        front = torch.arange(first.base, first.base + first.front, device=device)
        rest = torch.arange(max(first.recent, first.base + first.front), end, device=device)
        pos = torch.cat([front, rest])
        sees = []
        for q in range(context, end):
            p = self.plan(prompt_len, q + 1)
            sees.append(((pos >= p.base) & (pos < p.base + p.front)) | ((pos >= p.recent) & (pos <= q)))
        return pos, torch.stack(sees)

    @torch.no_grad()
    def extend(self, query: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor, prompt_len: int,
               context: int, scale: float) -> torch.Tensor:
        """Tokens after the prompt at positions ``context ..`` in one step (``query`` ``[T, Hq, D]``,
        their K/V already stored at their own slots): what :meth:`decode` gives them one at a time.
        With :attr:`replaces` that is :meth:`decode` in order (each moves into the slot it takes);
        otherwise one attention over the held slots with :meth:`extend_slots`' mask."""
        if self.replaces or query.shape[0] == 1:
            return torch.cat([self.decode(query[j:j + 1], kv_cache, block_ids, prompt_len, context + j, scale)
                              for j in range(query.shape[0])])
        pos, sees = self.extend_slots(prompt_len, context, context + query.shape[0], block_ids.device)
        keys, values = self.paged.read(kv_cache, slots_of(block_ids, pos, kv_cache.shape[2]))
        return attend(query, keys, values, scale, context, sees[None].expand(keys.shape[0], -1, -1))

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
        attention (:meth:`admit` and :meth:`rescore` for one row). Returns ``[1, Hq, D]``."""
        if self.replaces:
            p = self.plan(prompt_len, position + 1)
            count = min(p.front, position + 1 - p.base)
            device = block_ids.device
            slots, valid = self.admit(kv_cache, block_ids[None], torch.tensor([p.base], device=device),
                                      torch.tensor([p.front], device=device), torch.tensor([position], device=device),
                                      count)  # width = the held count: every slot valid
            keys, values = self.paged.read(kv_cache, slots[0])
            out = attend(query, keys, values, scale, position)
            self.rescore(step_attention(query, keys[None], scale), slots, valid, kv_cache)
            return out
        keys, values = self.read(kv_cache, block_ids, prompt_len, position + 1)
        return attend(query, keys, values, scale, position)

    def admit(self, kv_cache: torch.Tensor, block_table: torch.Tensor, base: torch.Tensor, capacity: torch.Tensor,
              position: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:attr:`replaces`, a batch of requests' generated tokens (row ``r``: block-table row
        ``block_table[r]``, its plan's ``base[r]`` and ``capacity[r]`` (:func:`.eviction.plan`'s
        front run), the token at ``position[r]`` already stored at its own slot; device tensors):
        each joins its row's held slots, at its own slot while they grow to the capacity, else
        moved (codes and scale) into each head's slot that :meth:`Scorer.replaced` picks, with its
        position and :meth:`Scorer.new_token_score` in the running state. Rows of capacity 0 (a
        prompt still coming in, a padding row) are left as they are. No host sync: shapes follow
        ``width`` (host; at least every row's capacity). Returns the cache slots of each row's
        front run ``[R, width]`` and which of them hold a token now ``[R, width]``."""
        bs, heads, device = kv_cache.shape[2], kv_cache.shape[1], kv_cache.device
        positions, running = self.running_state(kv_cache)
        dump = positions.shape[0] - 1
        rows = torch.arange(block_table.shape[0], device=device)
        j = torch.arange(width, device=device)
        base, position, capacity = base.long(), position.long(), capacity.long()
        logical = base[:, None] + j  # [R, width]
        blocks = block_table.long().gather(1, (logical // bs).clamp(max=block_table.shape[1] - 1))
        slots = blocks * bs + logical % bs
        before = j < (position - base).clamp(min=0).minimum(capacity)[:, None]  # held before this token
        held_pos = torch.where(before[:, None, :], positions[slots].long().transpose(1, 2), -1)  # [R, H, width]
        victim = self.strategy.scorer.replaced(running[slots].transpose(1, 2), held_pos, position[:, None, None],
                                               capacity[:, None].expand(-1, heads))  # [R, H]
        own = block_table.long()[rows, position // bs] * bs + position % bs  # [R]
        full = (position - base >= capacity) & (capacity > 0)
        target = torch.where(full[:, None], slots.gather(1, victim), own[:, None])  # [R, H]
        self.paged.move(kv_cache, own[None, :].expand(heads, -1), target.T)
        target = torch.where((capacity > 0)[:, None], target, dump)
        h = torch.arange(heads, device=device)
        positions[target, h] = position[:, None].int()
        running[target, h] = self.strategy.scorer.new_token_score(position[:, None].expand(-1, heads))
        return slots, j < (position + 1 - base).clamp(min=0).minimum(capacity)[:, None]

    @torch.no_grad()
    def start_lone_prompts(self, query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                           lone: torch.Tensor, scale: float) -> None:
        """:attr:`replaces`, a batch of one-token rows (``query`` ``[R, Hq, D]``, block-table rows
        ``block_table``) where ``lone`` ``[R]`` marks a prompt of one token (stored at position
        0): its running state as :meth:`compress_prompt` starts it (the token kept in place where
        the plan keeps one, its score :meth:`Scorer.running_scores` over the token as the page
        holds it), with no host sync. A replayed CUDA graph runs this where an eager step runs
        the backend's Python compaction (which then writes the same values again)."""
        if self.plan(1, 1).front < 1:
            return
        positions, running = self.running_state(kv_cache)
        heads = kv_cache.shape[1]
        own = block_table[:, 0].long() * kv_cache.shape[2]  # [R], position 0
        keys, values = self.paged.read(kv_cache, own)  # [H, R, D]
        inputs = ScoreInputs(keys=keys.transpose(0, 1)[:, :, None], values=values.transpose(0, 1)[:, :, None],
                             queries=query[:, :, None], scale=scale, layer_idx=self.layer_idx,
                             num_layers=self.num_layers,
                             valid=torch.ones(query.shape[0], 1, dtype=torch.bool, device=query.device))
        score = self.strategy.scorer.running_scores(inputs)[..., 0].float().expand(-1, heads)  # [R, H]
        target = torch.where(lone, own, positions.shape[0] - 1)[:, None]  # other rows into the dump row
        h = torch.arange(heads, device=query.device)
        positions[target, h] = torch.zeros((), dtype=positions.dtype, device=positions.device)  # no host scalar: a graph may hold this
        running[target, h] = score

    def rescore(self, probs: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor, kv_cache: torch.Tensor) -> None:
        """:attr:`replaces`, after :meth:`admit`: the running scores of each row's held slots
        ``slots`` ``[R, width]`` (where ``valid``) take the step's attention ``probs`` ``[R, H,
        width]`` (:func:`kvplug.attention.step_attention` or ``step_probs``) through
        :meth:`Scorer.decode_update`."""
        _, running = self.running_state(kv_cache)
        new = self.strategy.scorer.decode_update(running[slots].transpose(1, 2), probs)
        index = torch.where(valid, slots, running.shape[0] - 1)  # [R, width]; the rest into the dump row
        running[index[:, :, None], torch.arange(probs.shape[1], device=probs.device)] = new.transpose(1, 2)

    def running_state(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:attr:`state` for this cache, made at the first call (outside any CUDA graph capture:
        made inside one, its fill would be replayed every step)."""
        slots, heads = kv_cache.shape[0] * kv_cache.shape[2] + 1, kv_cache.shape[1]  # the last row: a dump
        if self.state is None or self.state[0].shape != (slots, heads):
            if kv_cache.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"kvplug: layer {self.layer_idx}'s eviction state was first needed inside a CUDA "
                                   f"graph capture; it must be made by an eager step before (a warm-up run)")
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
