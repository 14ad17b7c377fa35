"""The rotary position embedding (RoPE) of a model's attention, for scorers that need queries or
keys before rotation (tensors only; adapters build it from the engine's own rotary module).

RoPE (Su et al., RoFormer, arXiv 2104.09864) in the "rotate half" form transformers and vLLM use:
``x' = s * (cos(p w) x + sin(p w) rotate_half(x))`` with ``w`` = ``inv_freq`` repeated over both
halves of the head dimension and ``s`` the ``attention_scaling`` some RoPE types apply (1 by
default). Every rotation is orthogonal, so ``x = R(p)^T x' / s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


@dataclass(frozen=True, eq=False)
class Rope:
    """``inv_freq`` ``[D/2]`` and ``attention_scaling`` of one model's rotary embedding."""

    inv_freq: torch.Tensor
    attention_scaling: float = 1.0

    @property
    def head_dim(self) -> int:
        return 2 * self.inv_freq.shape[-1]

    def check_covers(self, head_dim: int, who: str) -> None:
        """One-line :class:`SpecError` unless this RoPE rotates all ``head_dim`` channels (``who``
        reads keys or queries before rotation, which partial rotary would leave half done)."""
        if self.head_dim != head_dim:
            from kvplug.errors import SpecError

            raise SpecError(f"{who}: RoPE rotates {self.head_dim} of the {head_dim} head channels (partial rotary), "
                            f"which it does not model yet")

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` ``[*positions.shape, D]`` in float32, without the scaling."""
        angles = positions.float()[..., None] * self.inv_freq.float().to(positions.device)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., T, D]`` rotated to ``positions`` ``[..., T]`` (broadcast), scaled, float32."""
        cos, sin = self.cos_sin(positions)
        x = x.float()
        return self.attention_scaling * (x * cos + rotate_half(x) * sin)

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`rotate`: ``x`` before RoPE, float32."""
        cos, sin = self.cos_sin(positions)
        x = x.float()
        return (x * cos - rotate_half(x) * sin) / self.attention_scaling

    def mean_rotation(self, start: torch.Tensor, count: int) -> torch.Tensor:
        """``[*start.shape, D, D]``: the mean of ``s * R(p)`` over ``p = start .. start + count - 1``
        (``R(p) x`` is :meth:`rotate`'s ``x'``; ``R = diag(cos) + diag(sin) P`` with ``P x =
        rotate_half(x)``)."""
        d = self.head_dim
        positions = start[..., None] + torch.arange(count, device=start.device)
        cos, sin = self.cos_sin(positions)  # [..., count, D]
        half = d // 2
        perm = torch.zeros(d, d, device=start.device)
        perm[:half, half:] = -torch.eye(half, device=start.device)
        perm[half:, :half] = torch.eye(half, device=start.device)
        eye = torch.eye(d, device=start.device)
        mean_cos, mean_sin = cos.mean(-2), sin.mean(-2)  # [..., D]
        return self.attention_scaling * (mean_cos[..., :, None] * eye + mean_sin[..., :, None] * perm)
