"""Where a request's kept tokens live in its vLLM blocks: one pure function for scheduler and worker.

Pure Python and PyTorch (no vLLM import). A worker's block table is positional (logical position
``n`` lives in slot ``n`` of the request's blocks), and vLLM's manager can free a running
request's blocks in place (a freed entry becomes the null block, as its sliding-window and R-SWA
paths do). So eviction keeps tokens where whole blocks around them can go:

* after a prompt of ``P`` tokens, layer ``l`` keeps ``K_l`` tokens per KV head (the core's
  selection, same as the HF adapter) and moves them into slots ``[P - K_l, P)``; generated
  tokens are written at their own slots ``P, P + 1, ...``; the blocks before ``P - K_l`` go;
* ``streaming`` also evicts while generating and moves nothing: its ``sinks`` first tokens stay
  in the first slots and its recent window is at its own slots; the blocks between them go;
* ``h2o`` and ``tova`` (:func:`replaces`) keep their ``C`` tokens in ``C`` slots, the kept prompt
  tokens' ``[P - C, P)`` (or ``[0, C)`` while a short prompt grows): a generated token, written at
  its own slot, moves into the slot of the token it evicts, and its own block goes.

:func:`plan` says, for a prompt length and a token count, which slots hold what; the KV-cache
manager frees :func:`freed_blocks` and the attention backend moves and reads by the same
:class:`Plan`. Both depend only on the spec, ``P`` and the token count (never on the data),
which is why the scheduler needs no message from the worker.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from kvplug.errors import SpecError
from kvplug.strategy import Strategy


class Plan(NamedTuple):
    """One layer of one request holding ``num_tokens`` tokens: slots ``[base, base + front)`` hold
    the kept prompt tokens (in the order the selection keeps them), ``[recent, num_tokens)`` the
    tokens at their own position; every other slot is stale and its block may be freed."""

    base: int
    front: int
    recent: int

    def slots(self, num_tokens: int) -> list[range]:
        """The held, valid slots (the attention reads exactly these)."""
        front_end = min(self.base + self.front, num_tokens)
        return [r for r in (range(self.base, front_end), range(max(self.recent, front_end), num_tokens)) if r]


def replaces(strategy: Strategy) -> bool:
    """Whether generated tokens replace kept ones chosen by the data (h2o, tova: a fixed set of
    slots and running scores), rather than by position (streaming) or never (snapkv)."""
    scorer = strategy.scorer
    return scorer is not None and scorer.evicts_on_decode and scorer.placement == "select"


def largest_front(strategy: Strategy, max_model_len: int) -> int:
    """:func:`replaces`: the most slots any request's front run can have (its prompt's
    :meth:`~kvplug.scorers.base.Scorer.kept_tokens`, over every prompt length up to
    ``max_model_len``), the fixed width of the replace step inside a CUDA graph."""
    kept = strategy.scorer.kept_tokens
    return max(1, max(kept(p) for p in range(1, max_model_len + 1)))


def check_evictable(strategy: Strategy) -> None:
    """Refuse, in one line, what the vLLM adapter cannot evict in paged blocks (from what the
    parts declare: ``Scorer.placement``/``per_layer``, ``Budget.fixed_counts``/``same_in_every_layer``)."""
    scorer, budget = strategy.scorer, strategy.budget
    if scorer is None:
        return
    if scorer.per_layer:
        raise SpecError(f"kvplug in vLLM: {scorer.name} decides per layer and request whether to evict, which "
                        f"vLLM's block accounting cannot follow yet; use it with the HF adapter")
    if scorer.across_layers:
        raise SpecError(f"kvplug in vLLM: {scorer.name} shares its budget across layers by each prompt's attention, "
                        f"which vLLM's block accounting cannot know in advance; use {scorer.name}(layers=false) "
                        f"or the HF adapter")
    if scorer.placement not in ("select", "window"):
        raise SpecError(f"kvplug in vLLM: {scorer.name} places its tokens as {scorer.placement!r}, which the vLLM "
                        f"adapter does not know; it places 'select' and 'window'")
    if not budget.fixed_counts:
        raise SpecError(f"kvplug in vLLM: the {budget.name} budget keeps a data-dependent number of "
                        f"tokens per head, which vLLM's block accounting cannot know in advance; use a budget "
                        f"with fixed counts (uniform, pyramid)")
    if scorer.evicts_on_decode and not budget.same_in_every_layer:
        raise SpecError(f"kvplug in vLLM: {scorer.name} keeps the same number of tokens in every layer while "
                        f"generating; drop {budget.name}")


@functools.lru_cache(maxsize=4096)
def layer_kept(strategy: Strategy, prompt_len: int, layer_idx: int, num_layers: int) -> int:
    """Tokens each KV head of ``layer_idx`` keeps after a prompt of ``prompt_len`` tokens: the
    core budget's count (uniform and pyramid keep the same number in every head of a layer)."""
    valid = torch.ones(1, prompt_len, dtype=torch.bool)
    kept = strategy.kept_per_row(valid)
    keep = strategy.budget.allocate(torch.zeros(1, 1, prompt_len), kept, layer_idx, num_layers)
    return int(keep.sum())


def plan(strategy: Strategy, prompt_len: int, num_tokens: int, layer_idx: int, num_layers: int) -> Plan:
    """Where layer ``layer_idx``'s kept tokens are once ``num_tokens >= prompt_len`` tokens have
    been processed (before that every written slot is valid: ``Plan(0, 0, 0)``)."""
    if num_tokens < prompt_len or strategy.scorer is None:
        return Plan(0, 0, 0)
    if strategy.scorer.placement == "window":
        sinks, window = strategy.scorer.sinks_and_window(prompt_len)
        return Plan(0, sinks, max(sinks, num_tokens - window))
    if replaces(strategy):  # C slots from base: the prompt's kept tokens, then the generated ones in them
        capacity = strategy.scorer.kept_tokens(prompt_len)
        base = max(prompt_len - capacity, 0)
        return Plan(base, capacity, max(num_tokens, base + capacity))
    kept = layer_kept(strategy, prompt_len, layer_idx, num_layers)
    return Plan(prompt_len - kept, kept, prompt_len)


READ_ALL = 1 << 30
"""A ``window`` that reads every slot after the front run (:func:`held_spans`)."""


@functools.lru_cache(maxsize=4096)
def _spans(strategy: Strategy, prompt_len: int, num_layers: int) -> torch.Tensor:
    """int32 ``[num_layers, 3]`` of one prompt length (cached: read, never written)."""
    if strategy.scorer.placement == "window":
        rows = [(0, *strategy.scorer.sinks_and_window(prompt_len))] * num_layers
    elif replaces(strategy):
        plan0 = plan(strategy, prompt_len, prompt_len, 0, num_layers)
        rows = [(plan0.base, plan0.front, 0)] * num_layers
    else:
        plans = [plan(strategy, prompt_len, prompt_len, layer, num_layers) for layer in range(num_layers)]
        rows = [(p.base, p.front, READ_ALL) for p in plans]
    return torch.tensor(rows, dtype=torch.int32)


def held_spans(strategy: Strategy, prompt_lens: torch.Tensor, num_layers: int) -> torch.Tensor:
    """int32 ``[num_layers, len(prompt_lens), 3]``: what each layer reads of each request while it
    generates, as the decode kernel's ``held`` (start, front, window): slots ``[start, start +
    front)`` and the last ``window`` tokens, the :class:`Plan` of every later token count in a
    form that does not depend on it (so it is set once per request and step, before CUDA graphs).
    Computed once per distinct prompt length (a batch of hundreds costs tens of microseconds)."""
    unique, row = torch.unique(prompt_lens, return_inverse=True)
    table = torch.stack([_spans(strategy, p, num_layers) for p in unique.tolist()])
    return table[row].transpose(0, 1)


def freed_blocks(strategy: Strategy, prompt_len: int, num_tokens: int, block_size: int,
                 num_layers: int) -> list[tuple[int, int]]:
    """Ranges ``[first, last)`` of a request's block-table entries that no layer reads any more
    once ``num_tokens`` tokens are processed: the blocks before every layer's ``base`` and those
    wholly between every layer's front run and its recent tokens (streaming's gap)."""
    plans = [plan(strategy, prompt_len, num_tokens, layer, num_layers) for layer in range(num_layers)]
    lead = min(p.base for p in plans) // block_size
    gap = (max(-(-(p.base + p.front) // block_size) for p in plans), min(p.recent // block_size for p in plans))
    return [r for r in ((0, lead), gap) if r[1] > r[0]]
