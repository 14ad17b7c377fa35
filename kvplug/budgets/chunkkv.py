"""``chunkkv``: keep whole chunks of consecutive tokens instead of single tokens.

ChunkKV ("ChunkKV: Semantic-Preserving KV Cache Compression for Efficient
Long-Context LLM Inference", arXiv 2502.00299): a token means little without its neighbours, so
the prompt is cut into chunks of ``chunk`` tokens (the remainder is one more, shorter chunk), a
chunk's score is the mean over its tokens of the scorer's scores summed over the layer's KV
heads, and the best ``max(1, floor(chunks * kept / tokens))`` chunks are kept, the same for every
head (kvpress's ``ChunkKVPress`` wrapping a scorer press). A prompt shorter than one chunk falls
back to per-head top-k. A chunk holding a token the scorer must keep (``+inf``: SnapKV's window)
is always kept. The kept count is a whole number of chunks, so it differs from the scorer's
budget by less than one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug.budgets.base import Budget, ranks, top_per_head
from kvplug.parts import param


@dataclass(frozen=True)
class ChunkKV(Budget):
    """ChunkKV: whole chunks of tokens, ranked by their mean score over the layer's heads."""

    name = "chunkkv"
    paper = "ChunkKV, arXiv 2502.00299"
    chunk: int = param(20, low=1, high=1 << 16, doc="tokens per chunk")

    def allocate(self, scores: torch.Tensor, kept: torch.Tensor, layer_idx: int, num_layers: int) -> torch.Tensor:
        b, h, t = scores.shape
        keep = torch.zeros_like(scores, dtype=torch.bool)
        present = (scores > float("-inf")).any(1).sum(-1).tolist()  # prompts are left-padded
        for row, n in enumerate(present):
            if n == 0:
                continue
            full, rest = divmod(n, self.chunk)
            region = scores[row, :, t - n:]  # [H, n]
            if full == 0:
                keep[row, :, t - n:] = top_per_head(region[None], kept[row:row + 1])[0]
                continue
            summed = region.sum(0)  # [n]
            means = summed[:full * self.chunk].view(full, self.chunk).mean(-1)
            if rest:
                means = torch.cat([means, summed[full * self.chunk:].mean()[None]])
            count = max(1, int(len(means) * int(kept[row]) // n))
            chosen = ranks(means) < count  # ties: the earlier chunk
            tokens = chosen.repeat_interleave(self.chunk)[:n]
            keep[row, :, t - n:] = tokens[None].expand(h, -1)
        return keep
