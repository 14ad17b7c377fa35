"""The placement contract: where a layer's K/V live and when they are fetched.

A placement part decides at the grain "where it lives": the whole K/V of a layer stays in host
memory and only the tokens a step's attention will need are brought to the accelerator
(InfiniGen). It declares what an adapter must supply (:attr:`Placement.needs_hidden_states`: each
layer's input, so the next layer's tokens can be chosen ahead of it) and keeps the
choice itself in tensors in, tensors out; the adapter owns the host copy, the copies and the
streams. A codec composes with it: the host copy holds the codec's codes, so fewer bytes move.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvplug.parts import Part


@dataclass(frozen=True)
class Placement(Part):
    """Where K/V live. Subclasses may override :attr:`needs_hidden_states`; they implement :meth:`fetch_count`."""

    kind: ClassVar[str] = "placement"

    @property
    def needs_hidden_states(self) -> bool:
        """Whether the adapter must hand each decoder layer's input (the residual stream) to the
        placement before that layer runs (to choose the next layer's tokens ahead of it)."""
        return False

    def places(self, layer_idx: int, num_layers: int) -> bool:
        """Whether this part places layer ``layer_idx`` (False: the layer keeps its K/V on the
        accelerator like any other cache)."""
        return True

    def fetch_count(self, stored: int) -> int:
        """Tokens per KV head fetched for one step's attention when ``stored`` tokens are held."""
        raise NotImplementedError

    def accelerator_note(self, head_dim: int, context: int) -> str:
        """One line for ``kvplug show``: what stays on the accelerator at ``context`` tokens."""
        return ""
