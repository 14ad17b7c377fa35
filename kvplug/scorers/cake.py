"""``cake``: a layer's share of the budget from how its attention spreads and shifts; tokens by
attention mean plus variance.

CAKE (Qin et al., "CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences",
ICLR 2025, arXiv 2503.12491). Both halves read the observation window's attention ``A`` (the last
``window`` prompt queries over the tokens before the window):

* **Layer preference.** A layer whose attention is spread over many tokens (spatial dispersion:
  the entropy ``H = -sum A log A``) and whose focus moves from query to query (temporal shift:
  ``V = sum_j var_i A_ij``) needs more cache: ``P = H^(1/tau1) * V^(1/tau2)``, summed over the
  layer's heads. The layers share ``L * (budget - window)`` tokens per head in proportion to
  ``P`` (a layer keeps at most its prompt; what it cannot take goes to the others), and every
  layer keeps its window on top.
* **Eviction indicator.** A token is kept by its mean attention over the window's queries plus
  ``gamma`` times their variance (a token some queries need a lot matters even if others ignore
  it), average-pooled along the sequence (kernel 5) and averaged over a KV head's query heads.

CAKE cascades: while prefilling layer ``l`` it re-splits the budget over layers ``0..l`` and the
earlier layers evict down to their new share, so the cache never holds more than the budget.
Prefill attention does not depend on what is evicted, so the end state is the split over all
layers that kvplug computes directly: the HF adapter keeps each layer's prompt until the last
layer has seen its own and then selects every layer at once. The prefill peak is therefore the
whole prompt's K/V, as with no compression (CAKE's cascade avoids that peak); decoding is the
same. Differences from the authors' code: the preference is computed per prompt of a batch
(theirs sums over the batch), and the excess of a capped layer is passed on in proportion to
preference (theirs spreads it equally). ``tau1``/``tau2`` are tuned per model and budget by the
authors (0.4 to 2.3 in their tables); the defaults here are 1. ``layers=false`` keeps the
indicator with the strategy's own budget split (uniform unless given), which vLLM can place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvplug.attention import group_mean
from kvplug.errors import SpecError
from kvplug.parts import param
from kvplug.scorers.base import ALWAYS, ScoreInputs, Scorer
from kvplug.tokens import TokenCount


@dataclass(frozen=True)
class Cake(Scorer):
    """CAKE: budgets split over layers by attention dispersion and shift; tokens by mean + variance."""

    name = "cake"
    paper = "CAKE, arXiv 2503.12491"
    budget: TokenCount = param(TokenCount(tokens=1024),
                               doc="mean tokens kept per head over layers (count or %), the window included")
    window: int = param(32, low=1, high=4096, doc="observation window: last prompt tokens whose attention is used")
    kernel: int = param(5, low=1, high=63, doc="pool width along the sequence (odd)")
    gamma: float = param(200.0, low=0.0, high=1e6, doc="weight of the attention's variance over the window's queries")
    tau1: float = param(1.0, low=0.01, high=100.0, doc="temperature of the spatial dispersion (entropy)")
    tau2: float = param(1.0, low=0.01, high=100.0, doc="temperature of the temporal shift (variance)")
    layers: bool = param(True, doc="share the budget across layers by preference (false: the budget part's split)")

    def __post_init__(self):
        super().__post_init__()
        if self.kernel % 2 == 0:
            raise SpecError(f"cake: kernel={self.kernel} must be odd")

    @property
    def across_layers(self) -> bool:
        return self.layers

    @property
    def observation_window(self) -> int:
        return self.window

    def kept_tokens(self, present: int) -> int:
        return self.budget.resolve(present)

    def _prefix_attention(self, inputs: ScoreInputs) -> torch.Tensor:
        """The window's attention over the tokens before it ``[B, Hq, W, T - W]``."""
        probs = inputs.window_probs
        return probs[..., :max(probs.shape[-1] - probs.shape[2], 0)]

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        probs = inputs.window_probs  # [B, Hq, W, T]
        b, hq, w, t = probs.shape
        n = max(t - w, 0)
        indicator = probs.mean(2) + (self.gamma * probs.var(2) if w > 1 else 0)  # [B, Hq, T]
        scores = torch.zeros(b, hq, t, device=probs.device)
        if n:
            scores[..., :n] = F.avg_pool1d(indicator[..., :n].reshape(b * hq, 1, n), self.kernel, stride=1,
                                           padding=self.kernel // 2).reshape(b, hq, n)
        scores = group_mean(scores, inputs.num_kv_heads)
        in_window = torch.arange(t, device=probs.device) >= n
        return inputs.finish(torch.where(in_window, ALWAYS, scores))

    def layer_preference(self, inputs: ScoreInputs) -> torch.Tensor:
        a = self._prefix_attention(inputs).double()  # [B, Hq, W, n]
        dispersion = -(a * torch.log(a + 1e-10)).sum((1, 2, 3))
        shift = a.var(2).sum((1, 2)) if a.shape[2] > 1 else torch.zeros_like(dispersion)
        return (dispersion.clamp(min=0) ** (1 / self.tau1) * shift.clamp(min=0) ** (1 / self.tau2)).float()
