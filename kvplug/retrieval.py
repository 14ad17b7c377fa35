"""Long-range key -> value lookup task (training data and evaluation prompts).

Pure Python (no torch, no numpy needed). Works with any tokenizer that has either
``encode(text, add_special_tokens=False) -> list[int]`` (transformers) or
``encode(text).ids`` (``tokenizers.Tokenizer``), plus ``decode(ids)``.

Format
------
A sample is real text (a window of token ids from a corpus, e.g. held-out Python files) with
``n_pairs`` lines spliced in at line ends (right before a token whose text starts with
``"\\n"``, or at the very end of the text), each one the text::

    \\n# key kqz47 -> 58213

(a newline, then the pair; the text's own newline that follows ends the line), and, at the very
end of the prompt, the query for one of the keys::

    \\n# lookup kqz47 -> 

(a newline, the query, one space). The answer is exactly the value's digits, ``58213``: with the
reference tokenizer every digit is its own token, so ``answer_ids`` has one token per digit and a
prediction counts only if all of them match. Keys are three lowercase letters and two digits,
values five digits with a non-zero first digit; within a sample all keys and all values are
distinct. Keys are drawn from two disjoint key spaces: ``split="train"`` keys never occur with
``split="eval"`` (the crc32 of the key decides), so evaluation keys are fresh.

Each spliced piece is tokenized on its own and concatenated with the text's token ids, so
``len(prompt_ids) + len(answer_ids) == context_length`` exactly. The target pair ("needle") starts
at token ``needle_position`` of ``prompt_ids`` (its leading newline); the requested ``depth`` in
[0, 1] places it at the line end nearest to ``depth * len(prompt_ids)`` (``needle_depth`` is the
realised ``needle_position / len(prompt_ids)``). The distractor pairs go to random line ends.
"""

from __future__ import annotations

import random
import string
import zlib
from dataclasses import dataclass, field
from typing import Sequence

__all__ = [
    "EOT",
    "Pair",
    "RetrievalSample",
    "LookupTask",
    "make_sample",
    "encode_documents",
    "load_heldout_ids",
]

EOT = "<|endoftext|>"
PAIR_LINE = "\n# key {key} -> {value}"
QUERY_LINE = "# lookup {key} -> "


@dataclass
class Pair:
    key: str
    value: str
    position: int  # token index of the line's first token in prompt_ids


@dataclass
class RetrievalSample:
    prompt_ids: list[int]
    answer_ids: list[int]
    answer_text: str
    key: str
    needle_position: int
    needle_depth: float
    requested_depth: float
    context_length: int
    pairs: list[Pair] = field(default_factory=list)  # every pair, the needle included, prompt order

    @property
    def needle_line(self) -> str:
        return PAIR_LINE.format(key=self.key, value=self.answer_text)


def _encode(tokenizer, text: str) -> list[int]:
    try:
        out = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        out = tokenizer.encode(text)
    ids = getattr(out, "ids", out)
    return list(ids)


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids))


def _vocab_size(tokenizer) -> int:
    fn = getattr(tokenizer, "get_vocab_size", None)  # tokenizers.Tokenizer
    return int(fn()) if callable(fn) else len(tokenizer)


def _key_split(key: str) -> str:
    return "eval" if zlib.crc32(key.encode()) % 10 == 0 else "train"


class LookupTask:
    """Builds lookup samples for one tokenizer (caches the ids of tokens that end a line)."""

    def __init__(self, tokenizer, n_pairs: int = 6, value_digits: int = 5):
        if n_pairs < 1:
            raise ValueError("n_pairs must be >= 1")
        self.tokenizer = tokenizer
        self.n_pairs = n_pairs
        self.value_digits = value_digits
        self.newline_ids = _encode(tokenizer, "\n")
        self.line_start_ids = frozenset(
            i for i in range(_vocab_size(tokenizer)) if _decode(tokenizer, [i]).startswith("\n")
        )
        if not self.line_start_ids:
            raise ValueError("tokenizer has no token starting with a newline")

    # -- pieces ---------------------------------------------------------------------------------
    def random_key(self, rng: random.Random, split: str = "eval") -> str:
        while True:
            key = "".join(rng.choice(string.ascii_lowercase) for _ in range(3)) + f"{rng.randrange(100):02d}"
            if split == "any" or _key_split(key) == split:
                return key

    def random_value(self, rng: random.Random) -> str:
        lo = 10 ** (self.value_digits - 1)
        return str(rng.randrange(lo, 10 * lo))

    def pair_ids(self, key: str, value: str) -> list[int]:
        """Ids of a pair line, leading newline included: ``\\n# key KEY -> VALUE``."""
        return self.newline_ids + _encode(self.tokenizer, PAIR_LINE.format(key=key, value=value)[1:])

    def query_ids(self, key: str) -> list[int]:
        """Ids of the query, newline included: ``\\n# lookup KEY -> ``."""
        return self.newline_ids + _encode(self.tokenizer, QUERY_LINE.format(key=key))

    def value_ids(self, value: str) -> list[int]:
        return _encode(self.tokenizer, value)

    # -- sample ---------------------------------------------------------------------------------
    def sample(self, source_ids: Sequence[int], context_length: int, depth: float,
               rng: random.Random, split: str = "eval", n_pairs: int | None = None) -> RetrievalSample:
        if not 0.0 <= depth <= 1.0:
            raise ValueError("depth must be in [0, 1]")
        n_pairs = self.n_pairs if n_pairs is None else n_pairs
        keys: list[str] = []
        values: list[str] = []
        while len(keys) < n_pairs:
            k = self.random_key(rng, split)
            if k not in keys:
                keys.append(k)
        while len(values) < n_pairs:
            v = self.random_value(rng)
            if v not in values:
                values.append(v)
        target = 0  # index of the needle among keys
        lines = [self.pair_ids(k, v) for k, v in zip(keys, values)]
        query = self.query_ids(keys[target])
        answer = self.value_ids(values[target])
        n_fill = context_length - len(answer) - len(query) - sum(len(x) for x in lines)
        if n_fill < 4 * n_pairs:
            raise ValueError(f"context_length {context_length} too short for {n_pairs} pairs")
        if len(source_ids) < n_fill:
            raise ValueError("source_ids shorter than the filler needed")
        start = rng.randrange(len(source_ids) - n_fill + 1)
        window = source_ids[start:start + n_fill]
        filler = window.tolist() if hasattr(window, "tolist") else list(window)

        starts = self.line_start_ids
        cands = [i for i, t in enumerate(filler) if t in starts] + [n_fill]
        prompt_len = context_length - len(answer)
        others = [rng.choice(cands) for _ in range(n_pairs - 1)]
        goal = depth * prompt_len

        def shifted(c: int) -> int:  # prompt position of a needle put at filler position c
            return c + sum(len(lines[j + 1]) for j, p in enumerate(others) if p < c)

        needle_at = min(cands, key=lambda c: abs(shifted(c) - goal))
        # at equal filler positions the needle goes first
        placements = sorted([(needle_at, 0, 0)] + [(p, 1, j + 1) for j, p in enumerate(others)])

        prompt: list[int] = []
        pairs: list[Pair] = []
        last = 0
        needle_pos = -1
        for pos, _, j in placements:
            prompt.extend(filler[last:pos])
            last = pos
            if j == target:
                needle_pos = len(prompt)
            pairs.append(Pair(keys[j], values[j], len(prompt)))
            prompt.extend(lines[j])
        prompt.extend(filler[last:])
        prompt.extend(query)
        assert len(prompt) == prompt_len, (len(prompt), prompt_len)
        return RetrievalSample(
            prompt_ids=prompt, answer_ids=answer, answer_text=values[target], key=keys[target],
            needle_position=needle_pos, needle_depth=needle_pos / prompt_len, requested_depth=depth,
            context_length=context_length, pairs=pairs,
        )


_TASKS: dict[int, LookupTask] = {}


def make_sample(tokenizer, source_ids: Sequence[int], context_length: int, depth: float,
                rng: random.Random, n_pairs: int = 6, split: str = "eval") -> RetrievalSample:
    """One lookup sample; see the module docstring for the format."""
    task = _TASKS.get(id(tokenizer))
    if task is None or task.tokenizer is not tokenizer:
        task = _TASKS[id(tokenizer)] = LookupTask(tokenizer)
    return task.sample(source_ids, context_length, depth, rng, split=split, n_pairs=n_pairs)


def encode_documents(tokenizer, text: str) -> list[int]:
    """Token ids of documents joined by ``<|endoftext|>`` (each document preceded by it)."""
    eot = _encode(tokenizer, EOT)
    ids: list[int] = []
    for doc in text.split(EOT):
        if doc:
            ids.extend(eot)
            ids.extend(_encode(tokenizer, doc))
    return ids


def load_heldout_ids(model_dir: str, tokenizer, file: str | None = None) -> list[int]:
    """Token ids of the held-out sample shipped with a model (``MODEL_DIR/heldout.txt``), or of
    ``file`` (documents joined by ``<|endoftext|>``) where one is named."""
    import os

    with open(file or os.path.join(model_dir, "heldout.txt"), encoding="utf-8") as f:
        return encode_documents(tokenizer, f.read())
