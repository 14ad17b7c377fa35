"""The measurements ``kvplug eval`` makes (HF transformers), each for many strategies at once.

A prompt is run through the model once (:class:`Prompt`); every strategy then gets that prompt
compressed its own way (``KVPlugCache.fork``: the prompt's attention does not depend on the
strategy, only what is kept afterwards does) and continues one token at a time, so it sees what a
user sees while generating, on exactly the same inputs as the others. Inputs of one call have
equal lengths (no padding).

A model that declares ``kvplug_own_cache`` (the Layer-Condensed KV model,
:class:`kvplug.adapters.hf.LckvForCausalLM`) keeps its own reduced K/V in transformers'
``DynamicCache``: it runs with ``none`` only, its prompt cache copied for each measurement.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from transformers import DynamicCache

import kvplug.hf
from kvplug.config import parse, split_paged
from kvplug.errors import SpecError


class Prompt:
    """A batch of prompts ``[B, T]`` run through the model once, kept for every strategy."""

    @torch.no_grad()
    def __init__(self, model, ids: torch.Tensor, cuda_graphs: bool = True):
        self.model, self.cuda_graphs = model, cuda_graphs
        self.own_cache = bool(getattr(model, "kvplug_own_cache", False))
        self.cache = DynamicCache() if self.own_cache else kvplug.hf.cache(model, "none", keep_prompt=True)
        self.logits = model(input_ids=ids, past_key_values=self.cache, logits_to_keep=1).logits[:, -1]

    def cache_for(self, name):
        """The prompt compressed by ``name``: a spec, ``paged:SPEC`` or ``ref:SPEC`` (see ``split_paged``)."""
        if self.own_cache:
            if name != "none":
                raise SpecError(f"{self.model.config.model_type} keeps its own K/V: only 'none' runs on it, not {name!r}")
            return copy.deepcopy(self.cache)
        spec, paged = split_paged(name)
        return self.cache.fork(parse(spec), paged=paged)

    @torch.no_grad()
    def step(self, cache, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens[:, None], past_key_values=cache).logits[:, -1]

    def stepper(self, cache, steps: int):
        """What feeds ``cache`` one token per sequence and returns the logits, for ``steps`` steps:
        on CUDA a replayed :class:`kvplug.hf.DecodeGraph` where the cache allows one (the same
        kernels, without the host's time per step), else the model eagerly."""
        if self.cuda_graphs and not self.own_cache and kvplug.hf.graph_blocker(cache) is None:
            graph = kvplug.hf.DecodeGraph(self.model, cache, max_new_tokens=max(steps, 1))
            return lambda tokens: graph(tokens).clone()
        return lambda tokens: self.step(cache, tokens)


@torch.no_grad()
def decode_nll(prompt: Prompt, spec, continuation: torch.Tensor) -> float:
    """Mean negative log-likelihood of ``continuation`` ``[B, N]``, fed one token at a time after
    the prompt, through ``spec``'s cache."""
    cache, logits = prompt.cache_for(spec), prompt.logits
    step = prompt.stepper(cache, continuation.shape[1])
    total = 0.0
    for t in range(continuation.shape[1]):
        total += float(F.cross_entropy(logits.float(), continuation[:, t], reduction="sum"))
        if t + 1 < continuation.shape[1]:
            logits = step(continuation[:, t])
    return total / continuation.numel()


@torch.no_grad()
def greedy(prompt: Prompt, spec, steps: int):
    """Greedy continuation ``[B, steps]`` after the prompt, and the cache it ends with."""
    cache, logits = prompt.cache_for(spec), prompt.logits
    step = prompt.stepper(cache, steps)
    out = []
    for i in range(steps):
        token = logits.argmax(-1)
        out.append(token)
        if i + 1 < steps:
            logits = step(token)
    return torch.stack(out, 1), cache
