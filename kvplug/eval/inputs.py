"""The inputs of every ``kvplug eval`` measurement, a pure function of (settings, context, task).

Peers measured outside kvplug (``benchmarks/peers/``) call these too, so every method sees exactly
the same tokens. Needs only torch and :mod:`kvplug.retrieval` (no transformers).
"""

from __future__ import annotations

import random
import zlib

import torch

from kvplug.retrieval import make_sample


def _rng(seed: int, context: int, task: str) -> random.Random:
    return random.Random(zlib.crc32(f"{seed}/{context}/{task}".encode()))


def windows(source: list[int], length: int, count: int, rng: random.Random, device="cpu") -> torch.Tensor:
    """``count`` random windows of ``length`` tokens of ``source``: ``[count, length]``."""
    starts = [rng.randrange(len(source) - length) for _ in range(count)]
    return torch.tensor([source[s:s + length] for s in starts], device=device)


def perplexity_ids(source, seed: int, context: int, sequences: int, tokens: int, device="cpu") -> torch.Tensor:
    """``[sequences, context + tokens]``: prompts, then the tokens scored one at a time."""
    return windows(source, context + tokens, sequences, _rng(seed, context, "perplexity"), device)


def agreement_prompts(source, seed: int, context: int, sequences: int, device="cpu") -> torch.Tensor:
    return windows(source, context, sequences, _rng(seed, context, "agreement"), device)


def memory_prompt(source, seed: int, context: int, device="cpu") -> torch.Tensor:
    return windows(source, context, 1, _rng(seed, context, "memory"), device)


def lookup_samples(tokenizer, source, seed: int, context: int, depth: float, trials: int):
    """``trials`` lookup samples (fresh keys from the evaluation key space, held-out text)."""
    rng = _rng(seed, context, f"retrieval/{depth:g}")
    return [make_sample(tokenizer, source, context, depth, rng) for _ in range(trials)]


def exact_matches(produced: torch.Tensor, samples) -> int:
    """How many rows of ``produced`` equal their sample's answer in every token."""
    answers = torch.tensor([s.answer_ids for s in samples], device=produced.device)
    return int((produced == answers).all(-1).sum())
