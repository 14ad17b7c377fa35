"""The measurements ``kvplug eval`` makes of one strategy on one model (HF transformers).

Every measurement runs the model through a fresh kvplug cache, prompt first, then one token at a
time, so it sees what a user sees while generating. Inputs of equal length are batched (no
padding), so any strategy and the baseline see exactly the same tokens.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

import kvplug.hf
from kvplug.retrieval import make_sample


@torch.no_grad()
def _prefill(model, ids: torch.Tensor, spec):
    cache = kvplug.hf.cache(model, spec)
    logits = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits[:, -1]
    return cache, logits


@torch.no_grad()
def _step(model, cache, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens[:, None], past_key_values=cache).logits[:, -1]


def windows(source: list[int], length: int, count: int, rng: random.Random, device) -> torch.Tensor:
    """``count`` random windows of ``length`` tokens of ``source``: ``[count, length]``."""
    starts = [rng.randrange(len(source) - length) for _ in range(count)]
    return torch.tensor([source[s:s + length] for s in starts], device=device)


@torch.no_grad()
def decode_nll(model, spec, ids: torch.Tensor, context: int) -> torch.Tensor:
    """Mean negative log-likelihood of ``ids[:, context:]``, fed one token at a time after a
    prompt of ``ids[:, :context]`` through the compressed cache."""
    cache, logits = _prefill(model, ids[:, :context], spec)
    total = torch.zeros((), dtype=torch.float64)
    for t in range(context, ids.shape[1]):
        total += F.cross_entropy(logits.float(), ids[:, t], reduction="sum").double().cpu()
        if t + 1 < ids.shape[1]:
            logits = _step(model, cache, ids[:, t])
    return total / (ids.shape[0] * (ids.shape[1] - context))


@torch.no_grad()
def greedy(model, spec, prompt: torch.Tensor, steps: int):
    """Greedy continuation ``[B, steps]`` of ``prompt`` and the cache it ends with."""
    cache, logits = _prefill(model, prompt, spec)
    out = []
    for i in range(steps):
        token = logits.argmax(-1)
        out.append(token)
        if i + 1 < steps:
            logits = _step(model, cache, token)
    return torch.stack(out, 1), cache


def retrieval_cell(model, tokenizer, spec, source: list[int], context: int, depth: float, trials: int,
                   seed: int, device) -> tuple[int, int]:
    """(correct, trials) of the lookup task at one context length and needle depth; a trial
    counts only if every token of the value is produced exactly."""
    rng = random.Random(seed)
    samples = [make_sample(tokenizer, source, context, depth, rng) for _ in range(trials)]
    prompts = torch.tensor([s.prompt_ids for s in samples], device=device)
    answers = torch.tensor([s.answer_ids for s in samples], device=device)
    produced, _ = greedy(model, spec, prompts, answers.shape[1])
    return int((produced == answers).all(-1).sum()), trials


def kv_bytes_dynamic(model, tokens: int) -> int:
    """Bytes a ``DynamicCache`` holds for ``tokens`` tokens per sequence (all layers, K and V)."""
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    dtype_bytes = next(model.parameters()).element_size()
    return tokens * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2 * dtype_bytes
