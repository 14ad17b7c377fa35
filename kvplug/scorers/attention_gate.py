"""``attention_gate``: a small learned gate per layer and KV head says which prompt tokens to keep.

Attention-Gate (Zeng et al., "In-context KV-Cache Eviction for LLMs via Attention-Gate",
arXiv 2410.12876) puts a light gate before each attention layer that flags, per token and head,
whether later tokens may still see its K/V; the gates are trained (continual pre-training or
fine-tuning) with the flagged tokens masked out of later tokens' attention and a penalty that
sets the evicted share. kvplug's gate is trained the same way, on the frozen reference model
(only the gates learn: ``benchmarks/reference_model/train_attention_gate.py``), and differs in
what it reads:

- the paper's gate reads the layer's hidden state through a small attention of its own (the
  decision is "in context"); kvplug's reads what the cache holds for the token, so it runs in any
  engine through the scorer contract, which sees K/V only: per KV head, the norm of each rotary
  pair of the key (``|(k_i, k_{i+D/2})|``, unchanged by RoPE's rotation, so the stored, rotated
  key gives the same feature at every position; HF's and vLLM's Llama pair dimensions this way)
  and the value, through a two-layer MLP (GELU) to one logit;
- the kept set is the ``budget``'s top tokens by that logit per KV head (a fixed share, as every
  kvplug budget), where the paper thresholds each flag; the last ``window`` prompt tokens are
  always kept, as they were never masked in training.

The weights are a learned part's tensors (:mod:`kvplug.learned`): ``weights=kvplug-ref`` (the
default) is the gate shipped for ``models/kvplug-ref``; a file trained for another model's layers,
KV heads or head size is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvplug import learned
from kvplug.parts import param
from kvplug.scorers.base import ALWAYS, ScoreInputs, Scorer
from kvplug.tokens import TokenCount

TENSORS = {"w1": 4, "b1": 3, "w2": 3, "b2": 2}
"""The gate's tensors and their dimensions: ``w1`` ``[L, Hkv, F, M]``, ``b1`` ``[L, Hkv, M]``,
``w2`` ``[L, Hkv, M]``, ``b2`` ``[L, Hkv]`` with ``F = D/2 + D`` features and ``M`` hidden units
(32 in the shipped gates; any ``M`` loads)."""
HIDDEN = 32


def gate_features(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The gate's input per token ``[..., D/2 + D]`` (float32): the norms of the key's rotary
    pairs ``(i, i + D/2)`` and the value."""
    k = keys.float()
    half = k.shape[-1] // 2
    pairs = torch.sqrt(k[..., :half] ** 2 + k[..., half:] ** 2)
    return torch.cat([pairs, values.float()], dim=-1)


def gate_logits(features: torch.Tensor, w: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """Gate logits ``[B, Hkv, T]`` of ``layer`` from features ``[B, Hkv, T, F]`` (higher: keep)."""
    hidden = F.gelu(torch.einsum("bhtf,hfm->bhtm", features, w["w1"][layer]) + w["b1"][layer][:, None, :])
    return torch.einsum("bhtm,hm->bht", hidden, w["w2"][layer]) + w["b2"][layer][:, None]


@dataclass(frozen=True)
class AttentionGate(Scorer, learned.LearnedPart):
    """Attention-Gate: a learned gate on each token's key and value ranks the prompt (trained here)."""

    name = "attention_gate"
    paper = "Attention-Gate, arXiv 2410.12876"
    budget: TokenCount = param(TokenCount.parse("25%"), doc="tokens kept per head (count or %), the window included")
    window: int = param(32, low=0, high=4096, doc="last prompt tokens always kept (never masked in training)")
    weights: str = param("kvplug-ref", doc="gate weights: a name shipped with kvplug, package:file.safetensors or a path")

    def __post_init__(self):
        super().__post_init__()
        learned.resolve(self.weights, self.name)  # a missing or pickled file is refused when the spec is read

    @classmethod
    def weight_shapes(cls, num_layers: int, num_kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
        f = head_dim // 2 + head_dim
        return {"w1": (num_layers, num_kv_heads, f, HIDDEN), "b1": (num_layers, num_kv_heads, HIDDEN),
                "w2": (num_layers, num_kv_heads, HIDDEN), "b2": (num_layers, num_kv_heads)}

    def kept_tokens(self, present: int) -> int:
        return self.budget.resolve(present)

    def gate(self) -> learned.LearnedWeights:
        return learned.load(self.weights, self.name, tensors=TENSORS)

    def check(self, inputs: ScoreInputs) -> learned.LearnedWeights:
        """The gate weights, checked against this model's shape (one-line error otherwise)."""
        w = self.gate()
        w.check(num_layers=inputs.num_layers, num_kv_heads=inputs.num_kv_heads, head_dim=inputs.keys.shape[-1])
        return w

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        w = self.check(inputs).on(inputs.keys.device)
        logits = gate_logits(gate_features(inputs.keys, inputs.values), w, inputs.layer_idx)
        t = logits.shape[-1]
        if self.window:  # prompts are left-padded: the last columns are every row's newest tokens
            recent = torch.arange(t, device=logits.device) >= t - self.window
            logits = torch.where(recent, ALWAYS, logits)
        return inputs.finish(logits)
