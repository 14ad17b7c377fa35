"""The codec contract: encode/decode K or V tensors and say what a token costs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from kvplug.parts import Part

Role = Literal["key", "value"]
Encoded = dict[str, torch.Tensor]
"""Encoded tensors; every one has the token axis at -2 (codes, scales, zeros...)."""


@dataclass(frozen=True)
class PagedFormat:
    """What a codec declares so that the paged Triton kernels read its tokens in place
    (:class:`kvplug.triton_ops.PagedLayout`): per role the bits per element, 16 for K/V kept in the
    model dtype, or 8/4/2 for the codes of :mod:`kvplug.quant` (planar packed, one float16
    scale/zero per token and head, ``encode`` returning ``codes``, ``scale``, ``zero``); and
    whether heads are Hadamard-rotated first (:mod:`kvplug.rotation`: the caller rotates q before
    attention and the output after). Both roles are quantized or neither.

    ``residual``: the newest ``residual`` tokens of each head are also held in the model dtype
    beside the pages, by the adapter, and attended from there (the pages hold every token's codes,
    written as it arrives, since a per-token code does not depend on when it is written; the
    kernel reads the older tokens and the two parts are merged by log-sum-exp,
    :func:`kvplug.triton_ops.merge_attention`). An adapter that cannot hold that window refuses
    the codec.

    ``key_clip`` / ``value_clip``: the fraction of each token-head's min-max range that the codes
    of that role span, centred (:func:`kvplug.quant.affine_params`); 1 is the plain min-max
    format. Only the writer differs: every token decodes as ``code * scale + zero``.
    ``symmetric``: both roles store a scale only, the zero implied (``-(2**bits - 1) / 2 * scale``,
    :func:`kvplug.quant.symmetric_scale`). Keys may be 3 bits (:func:`kvplug.quant.pack`)."""

    key_bits: int
    value_bits: int
    rotated: bool = False
    residual: int = 0
    key_clip: float = 1.0
    value_clip: float = 1.0
    symmetric: bool = False


@dataclass(frozen=True)
class Codec(Part):
    """Stores K/V tensors shaped ``[..., tokens, head_dim]``.

    ``token_group`` tokens are encoded together (1: each token alone, so a token may be written
    into any free slot); the newest ``residual`` tokens stay in full precision.
    """

    kind: ClassVar[str] = "codec"

    @property
    def token_group(self) -> int:
        return 1

    @property
    def residual(self) -> int:
        return 0

    @property
    def per_token(self) -> bool:
        """Each token is encoded alone and as soon as it arrives (``token_group`` 1, no
        full-precision residual): a token may be written into any slot, fetched or evicted alone."""
        return self.token_group == 1 and self.residual == 0

    def bytes_per_token(self, head_dim: int, dtype_bytes: int = 2) -> float:
        """Bytes one token takes for K and V together, per KV head (residual not counted)."""
        raise NotImplementedError

    def check_head_dim(self, head_dim: int) -> None:
        """Raise a clear error if this codec cannot store heads of ``head_dim``."""

    def paged_format(self, head_dim: int) -> PagedFormat | None:
        """The paged kernels' format of this codec's tokens, or None when they cannot read it
        (then the adapters use the codec's own encode/decode in PyTorch, where they can)."""
        return None

    def encode(self, x: torch.Tensor, role: Role, valid: torch.Tensor | None = None) -> Encoded:
        """Encode ``x`` (``[..., T, D]``); ``valid`` (``[..., T]``) marks tokens that count."""
        raise NotImplementedError

    def decode(self, enc: Encoded, role: Role, dtype: torch.dtype) -> torch.Tensor:
        """Values of ``enc`` as ``[..., T, D]`` in ``dtype``."""
        raise NotImplementedError
