"""The budget contract: turn scores into a kept set for one layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvplug.parts import Part


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last axis, 0 for the highest score (ties: earlier first)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    arange = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, arange)


def top_per_head(scores: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Keep the ``kept`` (``[B]`` or ``[B, H]``) highest-scoring tokens of each head."""
    kept = kept.view(kept.shape[0], -1, 1)
    return (ranks(scores) < kept) & (scores > float("-inf"))


@dataclass(frozen=True)
class Budget(Part):
    """Splits a per-head token budget over layers and heads."""

    kind: ClassVar[str] = "budget"
    fixed_counts: ClassVar[bool] = False
    """Whether every head of a layer keeps a count fixed by the prompt length and the layer alone
    (not by the scores), so an adapter can place the kept tokens before seeing them (vLLM)."""
    same_in_every_layer: ClassVar[bool] = False
    """Whether that count is the same in every layer."""

    def allocate(self, scores: torch.Tensor, kept: torch.Tensor, layer_idx: int, num_layers: int) -> torch.Tensor:
        """Kept mask ``[B, Hkv, T]`` given scores and the mean tokens per head ``kept`` ``[B]``."""
        raise NotImplementedError


def split_across_layers(preference: torch.Tensor, kept: torch.Tensor, present: torch.Tensor,
                        reserved: int = 0) -> torch.Tensor:
    """Tokens per head each layer keeps ``[L, B]`` when a total budget is shared by preference.

    ``preference`` ``[L, B]`` (non-negative; a row of zeros shares equally), ``kept`` ``[B]`` the
    mean tokens per head over layers, ``present`` ``[B]`` the prompt's tokens, ``reserved`` the
    tokens every layer keeps anyway (an observation window). Each layer gets ``reserved`` plus its
    preference's share of ``L * (kept - reserved)``, at most ``present - reserved`` (``reserved``
    is capped at ``kept``: a budget below it keeps the budget in every layer); what a capped
    layer cannot take goes to the others in proportion to their preference, and integer parts go
    by largest remainder, so the counts sum to exactly ``L * kept`` whenever the layers can hold it
    (and never exceed ``present``).
    """
    num_layers = preference.shape[0]
    out = torch.empty(preference.shape, dtype=torch.long, device=preference.device)
    for b in range(preference.shape[1]):
        n, k = int(present[b]), int(kept[b])
        res = min(reserved, n, k)  # a budget below the reserved tokens keeps the budget
        cap, total = n - res, num_layers * max(k - res, 0)
        if total >= num_layers * cap:
            out[:, b] = n
            continue
        pref = preference[:, b].double().clamp(min=0)
        pref = pref if float(pref.sum()) > 0 else torch.ones_like(pref)
        alloc = torch.zeros_like(pref)
        free = torch.ones(num_layers, dtype=torch.bool, device=pref.device)
        left = float(total)
        while left > 1e-9 and bool(free.any()):  # water-filling: capped layers pass their excess on
            share = torch.where(free, pref, torch.zeros_like(pref))
            share = share / share.sum() if float(share.sum()) > 0 else free.double() / free.sum()
            alloc = alloc + share * left
            over = alloc > cap
            left = float((alloc - cap).clamp(min=0).sum())
            alloc = alloc.clamp(max=cap)
            free = free & ~over & (alloc < cap)
        whole = alloc.floor()
        short = total - int(whole.sum())
        order = (alloc - whole).argsort(descending=True, stable=True)
        for i in order.tolist():
            if short <= 0:
                break
            if whole[i] < cap:
                whole[i] += 1
                short -= 1
        out[:, b] = whole.long() + res
    return out
