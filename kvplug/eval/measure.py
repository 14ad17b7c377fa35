"""The measurements ``kvplug eval`` makes (HF transformers), each for many strategies at once.

A prompt is run through the model once (:class:`Prompt`); every strategy then gets that prompt
compressed its own way (``KVPlugCache.fork``: the prompt's attention does not depend on the
strategy, only what is kept afterwards does) and continues one token at a time, so it sees what a
user sees while generating, on exactly the same inputs as the others. Inputs of one call have
equal lengths (no padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kvplug.hf
from kvplug.config import parse, split_paged


class Prompt:
    """A batch of prompts ``[B, T]`` run through the model once, kept for every strategy."""

    @torch.no_grad()
    def __init__(self, model, ids: torch.Tensor):
        self.model = model
        self.cache = kvplug.hf.cache(model, "none", keep_prompt=True)
        self.logits = model(input_ids=ids, past_key_values=self.cache, logits_to_keep=1).logits[:, -1]

    def cache_for(self, name):
        """The prompt compressed by ``name``: a spec, ``paged:SPEC`` or ``ref:SPEC`` (see ``split_paged``)."""
        spec, paged = split_paged(name)
        return self.cache.fork(parse(spec), paged=paged)

    @torch.no_grad()
    def step(self, cache, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens[:, None], past_key_values=cache).logits[:, -1]


@torch.no_grad()
def decode_nll(prompt: Prompt, spec, continuation: torch.Tensor) -> float:
    """Mean negative log-likelihood of ``continuation`` ``[B, N]``, fed one token at a time after
    the prompt, through ``spec``'s cache."""
    cache, logits = prompt.cache_for(spec), prompt.logits
    total = 0.0
    for t in range(continuation.shape[1]):
        total += float(F.cross_entropy(logits.float(), continuation[:, t], reduction="sum"))
        if t + 1 < continuation.shape[1]:
            logits = prompt.step(cache, continuation[:, t])
    return total / continuation.numel()


@torch.no_grad()
def greedy(prompt: Prompt, spec, steps: int):
    """Greedy continuation ``[B, steps]`` after the prompt, and the cache it ends with."""
    cache, logits = prompt.cache_for(spec), prompt.logits
    out = []
    for i in range(steps):
        token = logits.argmax(-1)
        out.append(token)
        if i + 1 < steps:
            logits = prompt.step(cache, token)
    return torch.stack(out, 1), cache
