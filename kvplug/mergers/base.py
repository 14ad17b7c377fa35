"""The merger contract: layers that share one stored copy of their prompt K/V.

A merger decides across layers, not per token within one: :meth:`Merger.pairs` is its plan for a
model of ``num_layers`` (which adjacent layers merge), and :meth:`Merger.merge` turns the two
layers' K (or V) into one shared tensor plus what each layer keeps of its own. Adapters keep the
first layer of a pair waiting until the second has its K/V (the cross-layer state lives in the
cache), store the :class:`Merged` once, and rebuild each layer's K/V from it with
:meth:`Merged.restore`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvplug.parts import Part


@dataclass(eq=False)
class Merged:
    """One pair's K (or V), shared: ``direction`` ``[B, H, T, D]`` (stored once), each layer's
    ``magnitudes`` ``[2, B, H, T]``, and ``retained`` ``[B, H, T]``: tokens each layer keeps as its
    own original vector instead."""

    direction: torch.Tensor
    magnitudes: torch.Tensor
    retained: torch.Tensor

    def restore(self, which: int, original: torch.Tensor | None = None) -> torch.Tensor:
        """Layer ``which`` (0 or 1) of the pair: its magnitude times the shared direction, and its
        ``original`` vectors where retained (omit ``original`` to see the merged vectors alone)."""
        x = self.direction * self.magnitudes[which][..., None]
        if original is None:
            return x
        return torch.where(self.retained[..., None], original.to(x.dtype), x)


@dataclass(frozen=True)
class Merger(Part):
    """Shares storage between layers. Subclasses implement :meth:`pairs` and :meth:`merge`."""

    kind: ClassVar[str] = "merger"

    def pairs(self, num_layers: int) -> list[tuple[int, int]]:
        """The layer pairs ``(first, second)`` that merge, in a model of ``num_layers`` layers."""
        raise NotImplementedError

    def merge(self, first: torch.Tensor, second: torch.Tensor, valid: torch.Tensor) -> Merged:
        """Merge two layers' K (or V) ``[B, H, T, D]``; ``valid`` ``[B, T]`` is False on padding."""
        raise NotImplementedError
