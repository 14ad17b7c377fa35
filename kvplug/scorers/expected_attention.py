"""``expected_attention``: keep the tokens future queries are expected to attend to.

Expected Attention (Devoto et al., "Expected Attention: KV Cache Compression by Estimating
Attention from Future Queries Distribution", arXiv 2510.00636; NVIDIA kvpress's
``ExpectedAttentionPress``): the prompt's queries before RoPE are modelled as a Gaussian
(mean ``mu``, covariance ``S`` over the positions after the ``n_sink`` first), moved to the next
``n_future`` positions by the mean RoPE rotation ``R`` (``mu' = R mu``, ``S' = R S R^T``); a key's
expected attention logit is ``E[q.k] * scale + Var term = scale * k.mu' + scale^2 / 2 * k^T S' k``
(the log of ``E[exp(scale * q.k)]`` for a Gaussian ``q``), softmaxed over the keys after the
sinks, averaged over the KV head's query heads, and (``use_vnorm``) multiplied by the value's
norm, as the output a token adds is proportional to it. The ``n_sink`` first tokens are always
kept. Needs the model's rotary embedding (``ScoreInputs.rope``) to undo RoPE on the queries.

Defaults are kvpress 0.5.5's (512 future positions, 4 sinks, covariance and value norm on, no
epsilon); the kept sets equal kvpress's on the reference model (docs/EVALUATION.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug.attention import group_mean
from kvplug.errors import SpecError
from kvplug.parts import param
from kvplug.scorers.base import ALWAYS, ScoreInputs, Scorer
from kvplug.tokens import TokenCount


@dataclass(frozen=True)
class ExpectedAttention(Scorer):
    """Expected Attention: keys ranked by the attention a Gaussian of future queries gives them."""

    name = "expected_attention"
    paper = "Expected Attention, arXiv 2510.00636"
    needs_all_queries = True
    needs_rope = True
    budget: TokenCount = param(TokenCount(tokens=1024), doc="tokens kept per head (count or %), the sinks included")
    n_future: int = param(512, low=1, high=1 << 20, doc="future positions the query distribution is rotated over")
    n_sink: int = param(4, low=0, high=1 << 20, doc="first tokens always kept and left out of the statistics")
    use_covariance: bool = param(True, doc="add the query covariance term to the expected logit")
    use_vnorm: bool = param(True, doc="multiply the expected attention by the value norm")
    epsilon: float = param(0.0, low=0.0, high=1e6, doc="added to the expected attention before the value norm")

    def kept_tokens(self, present: int) -> int:
        return self.budget.resolve(present)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        rope = inputs.rope
        if rope is None:
            raise SpecError(f"{self.name} needs the model's rotary embedding (RoPE), which this adapter did not pass")
        q, keys, values = inputs.queries.float(), inputs.keys.float(), inputs.values.float()
        b, hq, t, d = q.shape
        if t != keys.shape[2]:
            raise ValueError(f"{self.name}: needs every prompt query ({keys.shape[2]}), got {t}")
        rope.check_covers(d, self.name)
        pos = inputs.positions  # [B, T], -1 on padding
        stats = (pos >= self.n_sink)  # [B, T]: the positions the query statistics use
        n = stats.sum(-1).clamp(min=1).float()[:, None, None]  # [B, 1, 1]
        pre = rope.unrotate(q, pos.clamp(min=0)[:, None, :]) * stats[:, None, :, None]  # [B, Hq, T, D]
        mean = pre.sum(2) / n  # [B, Hq, D], before RoPE
        rot = rope.mean_rotation(inputs.valid.sum(-1), self.n_future)[:, None]  # [B, 1, D, D]: after the prompt
        mu = (rot @ mean[..., None]).squeeze(-1)  # [B, Hq, D]
        k = keys.repeat_interleave(hq // keys.shape[1], dim=1)  # [B, Hq, T, D]
        logits = inputs.scale * (k @ mu[..., None]).squeeze(-1)  # [B, Hq, T]
        if self.use_covariance:
            centred = (pre - mean[:, :, None]) * stats[:, None, :, None]
            cov = centred.transpose(-1, -2) @ centred / n[..., None]  # [B, Hq, D, D]
            cov = rot @ cov @ rot.transpose(-1, -2)
            logits = logits + inputs.scale ** 2 / 2 * ((k @ cov) * k).sum(-1)
        logits = logits.masked_fill(~stats[:, None, :], float("-inf"))
        probs = torch.nan_to_num(torch.softmax(logits, dim=-1))
        scores = group_mean(probs, keys.shape[1])  # [B, Hkv, T]
        if self.use_vnorm:
            scores = (scores + self.epsilon) * values.norm(dim=-1)
        sinks = (pos >= 0) & (pos < self.n_sink)
        return inputs.finish(torch.where(sinks[:, None, :], ALWAYS, scores))

