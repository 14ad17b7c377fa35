"""``criticalkv``: SnapKV's attention, weighted by how much each value moves the layer's output.

CriticalKV (Feng et al., "Identify Critical KV Cache in LLM Inference from an Output Perturbation
Perspective", arXiv 2502.03805): attention weights alone bound the error of dropping a token
poorly; the output perturbation also scales with the projected value ``|v W_o|``. Two stages:
the first ``first_stage`` share of a head's budget goes to the tokens with the highest attention
score (SnapKV's: the observation window's mean attention over the prefix, average-pooled,
group-averaged; the window itself always kept), the rest to the highest ``(score + epsilon) *
|v W_o^h|_1``, the L1 norm of what the value adds to the layer's output through query head ``h``'s
slice of the output projection, averaged over the KV head's query heads.

As kvpress's ``CriticalKVPress(SnapKVPress(...))`` (which takes the stage-1 share of kvpress's
token count; here of the scorer's own budget for the row). With a head-sharing budget (``adakv``)
the stage-1 tokens are still the scorer's own count per head, and the budget spreads the rest,
where kvpress has a separate ``CriticalAdaKVPress``. Needs the layer's output projection, which
the HF adapter reads from the model (``o_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug.budgets.base import ranks
from kvplug.parts import param
from kvplug.scorers.base import ALWAYS, ScoreInputs, Scorer
from kvplug.scorers.snapkv import SnapKV
from kvplug.tokens import TokenCount


def projected_value_norm(values: torch.Tensor, out_proj: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``|v W_o^h|_1`` averaged over each KV head's query heads: ``[B, Hkv, T]`` (float32).

    ``values`` ``[B, Hkv, T, D]``; ``out_proj`` ``[hidden, num_heads * D]`` (query head ``h``'s
    output goes through columns ``h * D .. (h + 1) * D``)."""
    b, hkv, t, d = values.shape
    group = num_heads // hkv
    wo = out_proj.float().t().reshape(num_heads, d, -1)  # [Hq, D, hidden]
    norms = torch.stack([(values[:, h // group].float() @ wo[h]).abs().sum(-1) for h in range(num_heads)], 1)
    return norms.reshape(b, hkv, group, t).mean(2)


@dataclass(frozen=True)
class CriticalKV(Scorer):
    """CriticalKV: SnapKV's scores, the second half of the budget weighted by the projected value norm."""

    name = "criticalkv"
    paper = "CriticalKV, arXiv 2502.03805"
    needs_out_proj = True
    budget: TokenCount = param(TokenCount(tokens=1024), doc="tokens kept per head (count or %), the window included")
    window: int = param(32, low=1, high=4096, doc="SnapKV's observation window (kvpress: 64)")
    kernel: int = param(5, low=1, high=63, doc="SnapKV's pool width along the sequence (odd)")
    first_stage: float = param(0.5, low=0.0, high=1.0, doc="share of the budget picked by attention alone")
    epsilon: float = param(1e-4, low=0.0, high=1.0, doc="added to the attention score before weighting")

    def __post_init__(self):
        super().__post_init__()
        SnapKV(budget=self.budget, window=self.window, kernel=self.kernel)  # its checks (odd kernel)

    @property
    def observation_window(self) -> int:
        return self.window

    def kept_tokens(self, present: int) -> int:
        return self.budget.resolve(present)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        if inputs.out_proj is None:
            raise ValueError("criticalkv needs ScoreInputs.out_proj (the layer's output projection)")
        attn = SnapKV(budget=self.budget, window=self.window, kernel=self.kernel).score(inputs)
        w = inputs.queries.shape[2]
        attn = torch.where(torch.isfinite(attn), attn / w, attn)  # the window's mean, as kvpress
        present = inputs.valid.sum(-1)
        first = torch.tensor([int(self.kept_tokens(int(n)) * self.first_stage) for n in present],
                             device=attn.device)
        stage1 = (ranks(attn) < first[:, None, None]) | (attn == ALWAYS)
        norm = projected_value_norm(inputs.values, inputs.out_proj, inputs.queries.shape[1])
        weighted = (attn + self.epsilon) * norm
        return inputs.finish(torch.where(stage1, ALWAYS, weighted))
