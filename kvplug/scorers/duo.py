"""``duo``: retrieval heads keep every token, streaming heads only sinks and a recent window.

DuoAttention (Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval
and Streaming Heads", arXiv 2410.10819): only some attention heads need the whole context
(retrieval heads); the others attend to the first tokens and the recent ones (streaming heads),
so their cache can stay at ``sinks + window`` tokens, while generating too. The paper learns a
gate per head offline (optimized on synthetic retrieval data) and ships the gates per model;
this part takes the head pattern as a parameter: ``pattern`` is a file of gates in DuoAttention's
released format (one row per layer, one tab-separated value per KV head; the ``streaming`` share
of heads with the lowest gates streams) or inline bits, one string per layer separated by ``/``
(``1`` retrieval, ``0`` streaming), e.g. ``duo(pattern='10/01')`` for 2 layers of 2 KV heads
(quoted: the spec parser reads ``/`` only inside quotes).
Heads hold different counts, which the HF adapter's per-head slots allow; vLLM's blocks hold one
count per layer (refused there). A streaming head evicts as ``streaming`` does (:class:`RecentFirst`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from kvplug.errors import SpecError
from kvplug.parts import param
from kvplug.scorers.base import ALWAYS, NEVER, ScoreInputs, Scorer
from kvplug.scorers.streaming import RecentFirst

UNBOUNDED = 1 << 40  # a retrieval head's capacity: it never evicts


@functools.lru_cache(maxsize=16)
def _gates(pattern: str) -> tuple[tuple[float, ...], ...]:
    """Per layer, per KV head: the gate (inline bits as 1.0 / 0.0, or a TSV file's values)."""
    if pattern and set(pattern) <= set("01/"):
        rows = [tuple(float(c) for c in row) for row in pattern.split("/")]
    else:
        path = Path(pattern).expanduser()
        if not path.is_file():
            raise SpecError(f"duo: pattern={pattern!r} is neither bits like 10/01 nor a file of head gates")
        try:
            rows = [tuple(float(v) for v in line.replace(",", "\t").split()) for line in path.read_text().splitlines()
                    if line.strip()]
        except ValueError as e:
            raise SpecError(f"duo: {path}: not a table of numbers ({e})") from None
    if not rows or any(len(r) != len(rows[0]) or not r for r in rows):
        raise SpecError(f"duo: pattern={pattern!r}: every layer needs the same number of heads")
    return tuple(rows)


@dataclass(frozen=True)
class DuoAttention(RecentFirst, Scorer):
    """DuoAttention: a fixed head pattern; streaming heads keep sinks + a window, retrieval heads all."""

    name = "duo"
    paper = "DuoAttention, arXiv 2410.10819"
    evicts_on_decode = True
    decode_on_device = True
    placement = "per_head"
    example: ClassVar[str] = "duo(pattern='10/01/11/00', window=16)"  # 4 layers x 2 KV heads
    pattern: str = param("", doc="head gates: a TSV file (DuoAttention's format) or bits per layer, e.g. 10/01")
    streaming: float = param(0.5, low=0.0, high=1.0, doc="share of heads streaming, the lowest gates (a gate file)")
    sinks: int = param(4, low=0, high=1 << 20, doc="first tokens a streaming head keeps")
    window: int = param(256, low=1, high=1 << 20, doc="recent tokens a streaming head keeps")

    def __post_init__(self):
        super().__post_init__()
        if not self.pattern:
            raise SpecError("duo: needs pattern=, a file of per-head gates or bits per layer such as 10/01")
        _gates(self.pattern)

    def retrieval(self, layer_idx: int, num_layers: int, num_kv_heads: int) -> torch.Tensor:
        """bool ``[Hkv]``: which heads of ``layer_idx`` keep every token."""
        gates = torch.tensor(_gates(self.pattern), dtype=torch.float64)
        if gates.shape != (num_layers, num_kv_heads):
            raise SpecError(f"duo: pattern={self.pattern!r} has {gates.shape[0]} layers x {gates.shape[1]} heads; "
                            f"the model has {num_layers} x {num_kv_heads} KV heads")
        if set(gates.flatten().tolist()) <= {0.0, 1.0} and set(self.pattern) <= set("01/"):
            return gates[layer_idx] > 0.5
        n_streaming = round(self.streaming * gates.numel())
        order = gates.flatten().argsort(stable=True)  # lowest gates first: the streaming heads
        retrieval = torch.ones(gates.numel(), dtype=torch.bool)
        retrieval[order[:n_streaming]] = False
        return retrieval.view_as(gates)[layer_idx]

    def kept_tokens(self, present: int) -> int:
        return present  # retrieval heads keep every token; streaming heads are held back by their scores

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        full = self.retrieval(inputs.layer_idx, inputs.num_layers, inputs.num_kv_heads)[None, :, None]
        pos = inputs.positions[:, None, :]  # [B, 1, T]
        n = inputs.valid.sum(-1)[:, None, None]
        held = (pos >= 0) & ((pos < self.sinks) | (pos >= n - self.window))
        return inputs.finish(torch.where(full.to(pos.device) | held, ALWAYS, NEVER))

    def head_capacity(self, present: torch.Tensor, layer_idx: int, num_layers: int,
                      num_kv_heads: int) -> torch.Tensor:
        full = self.retrieval(layer_idx, num_layers, num_kv_heads).to(present.device)
        return torch.where(full[None, :], UNBOUNDED, self.sinks + self.window).expand(len(present), -1).long()
