"""``minicache``: adjacent layers from the middle of the stack share one direction per token.

MiniCache (Liu et al., "MiniCache: KV Cache Compression in Depth Dimension for Large Language
Models", NeurIPS 2024, arXiv 2405.14366) finds that the K/V states of adjacent deep layers point
in similar directions. From layer ``start`` on, each pair of layers stores one direction per
token, the SLERP at ``t`` of the two layers' unit vectors, and each layer keeps its own vector
norm. Tokens whose two directions are far apart would be damaged by the merge: those with an
angular distance (angle / pi) above ``d_min + (d_max - d_min) * gamma`` (min and max over the
row's tokens) are retained unmerged, in both layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvplug.mergers.base import Merged, Merger
from kvplug.parts import param
from kvplug.tokens import TokenCount

TINY = 1e-6  # below this sin(angle), SLERP is computed as the linear interpolation it tends to


@dataclass(frozen=True)
class MiniCache(Merger):
    """MiniCache: adjacent layers share SLERP-merged directions, keep their own norms."""

    name = "minicache"
    paper = "MiniCache, arXiv 2405.14366"
    start: TokenCount = param(TokenCount(fraction=0.5), low=0, doc="first merged layer (index or % of layers)")
    t: float = param(0.6, low=0.0, high=1.0, doc="SLERP position between the first (0) and second (1) layer")
    gamma: float = param(0.05, low=0.0, high=1.0, doc="retention threshold within the row's angular-distance range")

    def pairs(self, num_layers: int) -> list[tuple[int, int]]:
        return [(i, i + 1) for i in range(self.start.resolve(num_layers), num_layers - 1, 2)]

    def merge(self, first: torch.Tensor, second: torch.Tensor, valid: torch.Tensor) -> Merged:
        a, b = first.float(), second.float()
        norm_a, norm_b = a.norm(dim=-1), b.norm(dim=-1)
        unit_a = a / norm_a.clamp_min(TINY)[..., None]
        unit_b = b / norm_b.clamp_min(TINY)[..., None]
        angle = torch.arccos((unit_a * unit_b).sum(-1).clamp(-1.0, 1.0))
        sin = torch.sin(angle)
        straight = sin < TINY
        safe = torch.where(straight, torch.ones_like(sin), sin)
        w_a = torch.where(straight, torch.full_like(sin, 1 - self.t), torch.sin((1 - self.t) * angle) / safe)
        w_b = torch.where(straight, torch.full_like(sin, self.t), torch.sin(self.t * angle) / safe)
        direction = w_a[..., None] * unit_a + w_b[..., None] * unit_b
        distance = angle / math.pi
        real = valid[:, None, :].expand_as(distance)
        low = distance.masked_fill(~real, float("inf")).amin(-1, keepdim=True)
        high = distance.masked_fill(~real, float("-inf")).amax(-1, keepdim=True)
        threshold = low * (1 - self.gamma) + high * self.gamma  # exactly low / high at gamma 0 / 1
        retained = real & (distance > threshold)
        return Merged(direction=direction, magnitudes=torch.stack([norm_a, norm_b]), retained=retained)
