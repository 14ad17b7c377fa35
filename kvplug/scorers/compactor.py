"""``compactor``: outlier keys (approximate leverage) blended with non-causal chunked attention.

Compactor (Chari & Van Durme, "Compactor: Calibrated Query-Agnostic KV Cache Compression with
Approximate Leverage Scores", arXiv 2507.08143). Two query-agnostic signals over the prompt, each
z-normalised, added as ``blending * leverage + attention``:

* **Leverage.** Keys that are geometric outliers carry what the others cannot reconstruct. The
  statistical leverage of each token's pre-RoPE key (``diag(X (X^T X)^-1 X^T)`` of the
  sequence-centred keys) is approximated through a right Gaussian sketch to ``sketch`` columns.
* **Non-causal attention.** The prompt is cut into chunks of ``chunk`` tokens and every query of a
  chunk attends to every key of that chunk (no causal mask); a key's score is the attention it
  receives, averaged over a KV head's query heads, times its value's L2 norm, average-pooled
  over 3 neighbours.

The first ``sinks_start`` and last ``sinks_end`` tokens are always kept; the rest are scored.
``blending`` defaults to the share of tokens evicted (the authors' heuristic: the harder the
compression, the more the geometry counts).

As the authors' code (kvpress's ``CompactorPress``, written by the first author): attention logits
are not scaled by ``1/sqrt(d)``; in the last chunk, when it is partial, padding queries count as
uniform rows and padding keys take logit zero (they are not masked); the leverage's Cholesky
factor gets a jitter of 1e-2, raised tenfold until it factors. Differences: the sketch is drawn
from a generator seeded by ``seed`` and the layer (kvpress draws from torch's global random
state, so the two sketches differ and only ``blending=0`` can be compared token for token), and
the z-normalisation is per prompt of a batch (kvpress's is over the whole batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvplug.parts import param
from kvplug.scorers.base import ALWAYS, ScoreInputs, Scorer
from kvplug.tokens import TokenCount


def _zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / (x.std() if x.numel() > 1 else torch.ones((), device=x.device)).clamp(min=1e-6)


def leverage_scores(keys: torch.Tensor, sketch: torch.Tensor) -> torch.Tensor:
    """Approximate leverage of each row of ``keys`` ``[H, S, D]`` through ``sketch`` ``[H, D, k]``: ``[H, S]``."""
    x = ((keys - keys.mean(-2, keepdim=True)) @ sketch).float()  # [H, S, k]
    gram = x.transpose(-1, -2) @ x
    gram = (gram + gram.transpose(-1, -2)) / 2
    eye = torch.eye(gram.shape[-1], device=gram.device)
    jitter = 1e-2
    for _ in range(5):
        factor, info = torch.linalg.cholesky_ex(gram + jitter * eye)
        if bool((info == 0).all()):
            break
        jitter *= 10
    else:
        raise RuntimeError("compactor: the sketched Gram matrix did not factor")
    solved = torch.cholesky_solve(x.transpose(-1, -2), factor)  # [H, k, S]
    return (x * solved.transpose(-1, -2)).sum(-1).clamp(min=0)


def chunked_attention(queries: torch.Tensor, keys: torch.Tensor, chunk: int) -> torch.Tensor:
    """Attention each key receives from the queries of its chunk, no causal mask, logits unscaled:
    ``queries`` ``[Hq, S, D]``, ``keys`` ``[Hq, S, D]`` -> ``[Hq, S]``; a partial last chunk is
    padded as the authors' code pads it (zero-logit keys, uniform query rows)."""
    h, s, d = keys.shape
    total = -(-s // chunk) * chunk
    pad = total - s
    q = F.pad(queries.float(), (0, 0, 0, pad)).view(h, -1, chunk, d)
    k = F.pad(keys.float(), (0, 0, 0, pad)).view(h, -1, chunk, d)
    dots = q @ k.transpose(-1, -2)  # [H, chunks, chunk, chunk]
    if pad:
        fake = torch.arange(chunk, device=keys.device) >= chunk - pad
        last = dots[:, -1].masked_fill(fake[:, None], 0.0)
        dots[:, -1] = last.masked_fill(fake[None, :], -1e-9)
    return dots.softmax(-1).sum(-2).reshape(h, total)[:, :s]


@dataclass(frozen=True)
class Compactor(Scorer):
    """Compactor: approximate key leverage blended with non-causal chunked attention."""

    name = "compactor"
    paper = "Compactor, arXiv 2507.08143"
    needs_all_queries = True
    needs_rope = True
    budget: TokenCount = param(TokenCount(tokens=1024), doc="tokens kept per head (count or %), sinks included")
    sinks_start: int = param(8, low=0, high=1 << 20, doc="first tokens always kept")
    sinks_end: int = param(4, low=0, high=1 << 20, doc="last tokens always kept")
    chunk: int = param(256, low=1, high=1 << 20, doc="tokens per chunk of the non-causal attention")
    sketch: int = param(48, low=1, high=4096, doc="columns of the Gaussian sketch of the keys")
    blending: float = param(-1.0, low=-1.0, high=1e3, doc="weight of the leverage (-1: the share of tokens evicted)")
    seed: int = param(0, low=0, high=2**31 - 1, doc="seed of the sketch (with the layer index)")

    def kept_tokens(self, present: int) -> int:
        return self.budget.resolve(present)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.by_row(lambda row, first, n: self._score_row(inputs, row, first, n))

    def _score_row(self, inputs: ScoreInputs, row: int, first: int, n: int) -> torch.Tensor:
        left = min(self.sinks_start, n)
        right = min(self.sinks_end, n - left)
        lo, hi = first + left, first + n - right
        keys, values = inputs.keys[row, :, lo:hi].float(), inputs.values[row, :, lo:hi].float()
        hkv, s = keys.shape[0], keys.shape[1]
        scores = torch.full((hkv, n), ALWAYS, device=keys.device)
        if s == 0:
            return scores
        queries = inputs.queries[row, :, lo:hi].float()  # all prompt queries (needs_all_queries)
        group = queries.shape[0] // hkv
        attn = chunked_attention(queries, keys.repeat_interleave(group, 0), self.chunk)
        attn = attn.view(hkv, group, s).mean(1) * values.norm(dim=-1)
        attn = _zscore(F.avg_pool1d(attn[:, None], 3, stride=1, padding=1)[:, 0])
        blend = self.blending if self.blending >= 0 else 1 - min(self.kept_tokens(n), n) / n
        if blend:
            if inputs.rope is None:
                raise ValueError(f"{self.name} needs ScoreInputs.rope (the model's RoPE) for its leverage half")
            inputs.rope.check_covers(keys.shape[-1], self.name)
            positions = torch.arange(left, n - right, device=keys.device)
            pre = inputs.rope.unrotate(keys, positions)
            gen = torch.Generator(device=keys.device).manual_seed(self.seed * 1009 + inputs.layer_idx)
            sketch = torch.randn(hkv, keys.shape[-1], self.sketch, generator=gen, device=keys.device)
            lev = _zscore(leverage_scores(pre, sketch / math.sqrt(self.sketch)))
            attn = blend * lev + attn
        scores[:, left:n - right] = attn
        return scores
