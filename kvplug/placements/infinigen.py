"""``infinigen``: the K/V cache in host memory; each step fetches only the tokens attention will need.

InfiniGen (Lee et al., "InfiniGen: Efficient Generative Inference of Large Language Models with
Dynamic KV Cache Management", OSDI 2024, arXiv 2406.19707). The inputs of adjacent layers are
alike (the residual stream changes little per layer), so while layer ``i`` runs, layer ``i``'s
input through layer ``i + 1``'s norm and query projection approximates layer ``i + 1``'s query. Scoring it against a *partial*
key cache (a few columns of every key, kept on the accelerator) predicts which tokens layer
``i + 1`` will attend to; only those are fetched from host memory, on a side stream, while layer
``i`` still computes. The columns are chosen after *skewing*: an orthogonal matrix ``A`` per KV
head (the right singular vectors of the queries) leaves ``q . k = (qA) . (kA)`` unchanged while
packing most of the queries' energy into the first columns of ``qA``, so a few columns predict
the scores well.

This module holds the choice, tensors in and tensors out; the adapter (``kvplug.adapters.hf``)
holds the host copy, the copies and the streams. Differences from the paper, and why:

- The prediction passes layer ``i``'s residual input through layer ``i + 1``'s own input norm, where
  the paper's scheme takes layer ``i``'s attention input (after layer ``i``'s norm). With per-layer
  norm weights this is the closer prediction; on the reference model both gave the same
  perplexity (docs/OFFLOAD.md).
- The skew is applied to the queries and keys *after* RoPE (Llama-style models; the paper's
  code skews OPT's projection weights, which have no RoPE). RoPE mixes pairs of columns, so the
  partial query is the next layer's full query projection, rotated, then skewed (``[D, r]`` per
  KV head): one extra query projection per layer and step instead of ``r`` of its columns.
- The skew is computed from the first prompt the adapter sees for a model (the paper: once,
  offline, on a calibration sample) and reused for every later cache of that model.
- A fixed number of tokens per KV head is fetched (``budget``), the same in every layer, where
  the paper fetches the tokens whose partial score is within a threshold of the maximum: a fixed
  count keeps the accelerator's memory bounded and every shape fixed.
- With grouped-query attention a KV head's tokens are ranked by the partial attention summed
  over its query heads (the paper's models are multi-head).
- The first ``dense_layers`` layers (default 1, as the paper keeps layer 0: its attention is
  spread widely, and no layer before it could predict it) keep their whole K/V on the accelerator
  in the codec's form; the first offloaded layer after them is predicted from the last dense
  layer's input (or, with ``dense_layers=0``, layer 0 chooses from its own partial query).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug.parts import param
from kvplug.placements.base import Placement
from kvplug.tokens import TokenCount


@dataclass(frozen=True)
class InfiniGen(Placement):
    """InfiniGen: K/V in host memory; the next layer's tokens speculated from partial keys and prefetched."""

    name = "infinigen"
    paper = "InfiniGen, OSDI 2024, arXiv 2406.19707"
    budget: TokenCount = param(TokenCount(fraction=0.1),
                               doc="tokens per KV head fetched for each step (count, or % of those held)")
    partial: float = param(0.25, low=0.01, high=1.0,
                           doc="share of the head dimension kept on the accelerator as the partial key cache")
    ahead: bool = param(True, doc="choose a layer's tokens from the previous layer's input and prefetch them "
                                  "(InfiniGen); false: from the layer's own query, fetched when it runs")
    dense_layers: int = param(1, low=0, high=1024, doc="first layers kept whole on the accelerator, as the paper "
                                                       "keeps layer 0 (its attention is the least concentrated)")

    @property
    def needs_hidden_states(self) -> bool:
        return self.ahead

    def places(self, layer_idx: int, num_layers: int) -> bool:
        return layer_idx >= self.dense_layers

    def columns(self, head_dim: int) -> int:
        """Columns of the skewed keys held on the accelerator."""
        return max(1, min(head_dim, round(self.partial * head_dim)))

    def fetch_count(self, stored: int) -> int:
        return min(stored, self.budget.resolve(stored))

    def accelerator_note(self, head_dim: int, context: int) -> str:
        r = self.columns(head_dim)
        return (f"{self.name}: the ratio above is the host copy's; the accelerator holds {r} of {head_dim} skewed key "
                f"columns per token ({r / (2 * head_dim):.1%} of fp16 K+V) and the {self.fetch_count(context)} tokens "
                f"per KV head fetched for one step, for two layers at a time")

    def skew(self, queries: torch.Tensor, valid: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        """``[Hkv, D, r]`` float32: per KV head, the ``r`` right singular vectors of its query heads'
        stacked queries ``[B, Hq, T, D]`` (real tokens only, ``valid`` ``[B, T]``) with the largest
        singular values (eigenvectors of ``Q^T Q`` in float64)."""
        b, hq, t, d = queries.shape
        q = queries.double() * valid[:, None, :, None]
        q = q.reshape(b, num_kv_heads, hq // num_kv_heads, t, d)
        gram = torch.einsum("bhgtd,bhgte->hde", q, q)
        _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
        return vectors.flip(-1)[..., :self.columns(d)].float()

    @staticmethod
    def partial_keys(keys: torch.Tensor, skew: torch.Tensor) -> torch.Tensor:
        """``[B, H, T, r]`` in the keys' dtype: keys ``[B, H, T, D]`` times their head's skew."""
        return (keys.float() @ skew.to(keys.device)).to(keys.dtype)

    @staticmethod
    def partial_queries(queries: torch.Tensor, skew: torch.Tensor) -> torch.Tensor:
        """``[B, Hq, Tq, r]`` float32: queries ``[B, Hq, Tq, D]`` (RoPE applied) times the skew of
        their KV head (``skew`` per KV head ``[Hkv, D, r]``, or already repeated per query head)."""
        if skew.shape[0] != queries.shape[1]:
            skew = skew.repeat_interleave(queries.shape[1] // skew.shape[0], dim=0)
        return queries.float() @ skew.to(queries.device)

    @staticmethod
    def speculate(partial_queries: torch.Tensor, partial_keys: torch.Tensor, filled: torch.Tensor, scale: float,
                  count: int) -> torch.Tensor:
        """``[B, H, count]`` indices, ascending, of the held tokens each KV head fetches: the top
        ``count`` by partial attention (softmax of the partial scores over the filled slots
        ``[B, H, S]``, summed over the KV head's query heads and the step's queries). The partial
        scores are computed in the partial keys' dtype (float32 accumulation), the softmax in float32."""
        b, hq, tq, r = partial_queries.shape
        h = partial_keys.shape[1]
        q = (partial_queries * scale).to(partial_keys.dtype).reshape(b, h, (hq // h) * tq, r)
        logits = (q @ partial_keys.transpose(-1, -2)).float()
        logits = logits.masked_fill(~filled[:, :, None, :], float("-inf"))
        mass = torch.softmax(logits, -1).nan_to_num(0.0).sum(2)  # [B, H, S]
        return mass.topk(count, dim=-1).indices.sort(-1).values
