"""Where a request's kept tokens live in its vLLM blocks: one pure function for scheduler and worker.

Pure Python and PyTorch (no vLLM import). vLLM frees a running request's blocks only from the
front of its block table (the sliding-window path), and a worker's block table is positional:
logical position ``n`` lives in slot ``n`` of the request's blocks. So eviction compacts kept
tokens towards the end of what is already written, and the slots before them can be freed:

* after a prompt of ``P`` tokens, layer ``l`` keeps ``K_l`` tokens per KV head (the core's
  selection, same as the HF adapter) and moves them into slots ``[P - K_l, P)``; generated
  tokens are written at their own slots ``P, P + 1, ...``;
* ``streaming`` also evicts while generating: its ``sinks`` first tokens sit at the front of the
  held slots and the recent window at its own slots; every block's worth of generated tokens
  the sinks move forward one block, so the block behind them can be freed.

:func:`plan` says, for a prompt length and a token count, which slots hold what; the KV-cache
manager frees the blocks before :func:`freed_tokens` and the attention backend moves and masks
by the same :class:`Plan`. Both depend only on the spec, ``P`` and the token count (never on
the data), which is why the scheduler needs no message from the worker.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from kvplug.budgets.pyramid import Pyramid
from kvplug.budgets.uniform import Uniform
from kvplug.errors import SpecError
from kvplug.scorers.streaming import Streaming
from kvplug.strategy import Strategy


class Plan(NamedTuple):
    """One layer of one request holding ``num_tokens`` tokens: slots ``[base, base + front)`` hold
    the compacted tokens (in the order the selection keeps them), ``[recent, num_tokens)`` the
    tokens at their own position; every other slot is stale. Slots before ``base`` may be freed."""

    base: int
    front: int
    recent: int

    def slots(self, num_tokens: int) -> list[range]:
        """The held, valid slots (the attention reads exactly these)."""
        front_end = min(self.base + self.front, num_tokens)
        return [r for r in (range(self.base, front_end), range(max(self.recent, front_end), num_tokens)) if r]


def check_evictable(strategy: Strategy) -> None:
    """Refuse, in one line, what the vLLM adapter cannot evict in paged blocks."""
    scorer = strategy.scorer
    if scorer is None:
        return
    if scorer.evicts_on_decode and not isinstance(scorer, Streaming):
        raise SpecError(f"kvplug in vLLM: {scorer.name} evicts by attention while generating, which paged "
                        f"blocks cannot follow yet; use snapkv, knorm, random or streaming (optionally "
                        f"+pyramid) in vLLM, or {scorer.name} with the HF adapter")
    if not isinstance(strategy.budget, (Uniform, Pyramid)):
        raise SpecError(f"kvplug in vLLM: the {strategy.budget.name} budget keeps a data-dependent number of "
                        f"tokens per head, which vLLM's block accounting cannot know in advance; use the "
                        f"uniform or pyramid budget")
    if isinstance(scorer, Streaming) and not isinstance(strategy.budget, Uniform):
        raise SpecError(f"kvplug in vLLM: streaming keeps sinks + window in every layer; drop "
                        f"{strategy.budget.name}")


@functools.lru_cache(maxsize=4096)
def layer_kept(strategy: Strategy, prompt_len: int, layer_idx: int, num_layers: int) -> int:
    """Tokens each KV head of ``layer_idx`` keeps after a prompt of ``prompt_len`` tokens: the
    core budget's count (uniform and pyramid keep the same number in every head of a layer)."""
    valid = torch.ones(1, prompt_len, dtype=torch.bool)
    kept = strategy.kept_per_row(valid)
    keep = strategy.budget.allocate(torch.zeros(1, 1, prompt_len), kept, layer_idx, num_layers)
    return int(keep.sum())


def plan(strategy: Strategy, prompt_len: int, num_tokens: int, block_size: int, layer_idx: int,
         num_layers: int) -> Plan:
    """Where layer ``layer_idx``'s kept tokens are once ``num_tokens >= prompt_len`` tokens have
    been processed (before that every written slot is valid: ``Plan(0, 0, 0)``)."""
    if num_tokens < prompt_len or strategy.scorer is None:
        return Plan(0, 0, 0)
    scorer = strategy.scorer
    if isinstance(scorer, Streaming):
        capacity = scorer.kept_tokens(prompt_len)  # the HF adapter's: sinks + window, while generating too
        sinks = min(scorer.sinks, capacity)
        window = capacity - sinks
        if num_tokens <= capacity:
            return Plan(0, sinks, sinks)
        base = max(prompt_len - capacity, (num_tokens - capacity) // block_size * block_size)
        return Plan(base, sinks, num_tokens - window)
    kept = layer_kept(strategy, prompt_len, layer_idx, num_layers)
    return Plan(prompt_len - kept, kept, prompt_len)


@functools.lru_cache(maxsize=4096)
def _layer_bases(strategy: Strategy, prompt_len: int, num_layers: int) -> tuple[int, ...]:
    return tuple(plan(strategy, prompt_len, prompt_len, 1, layer, num_layers).base for layer in range(num_layers))


def decode_starts(strategy: Strategy, prompt_lens: list[int], num_layers: int) -> torch.Tensor:
    """int32 ``[num_layers, len(prompt_lens)]``: the first slot each layer reads of each request
    while it generates, for strategies that evict only at the prompt: ``[base, num_tokens)`` is
    then one run (the kept tokens, then the generated ones at their own slots)."""
    if strategy.scorer is not None and strategy.scorer.evicts_on_decode:
        raise ValueError(f"decode_starts: {strategy.scorer.name} evicts while generating; its slots are not one run")
    rows = [_layer_bases(strategy, p, num_layers) for p in prompt_lens]
    return torch.tensor(rows, dtype=torch.int32).reshape(len(prompt_lens), num_layers).T


def freed_tokens(strategy: Strategy, prompt_len: int, num_tokens: int, block_size: int, num_layers: int) -> int:
    """Leading slots no layer needs any more: the blocks before ``freed_tokens // block_size``
    go back to vLLM's pool."""
    return min(plan(strategy, prompt_len, num_tokens, block_size, layer, num_layers).base
               for layer in range(num_layers))
