"""``mixed``: keys and values at different integer widths, e.g. 8-bit keys with 4-bit values.

Keys carry the outlier channels that one scale/zero per token and head cannot hold, values do not
(KIVI, Liu et al. 2024, arXiv 2402.02750, section 3); spending the bits on keys keeps most of
int8's quality for about the bytes of int4 values. vLLM's TurboQuant presets make the same choice
(``turboquant_k8v4``: 8-bit keys, 4-bit values, both after a rotation). Each role is stored as the
per-token codec of its width (:mod:`kvplug.codecs.integer`, one float16 scale/zero per token and
head), optionally after the Hadamard rotation (QuaRot, arXiv 2404.00456); ``residual=N`` keeps
the N newest tokens in full precision (as :mod:`kvplug.codecs.integer`). Keys may take 3 bits;
``symmetric=true`` stores one scale per token-head and role, no zero point, and ``key_clip`` /
``value_clip`` span the codes over a centred share of each range (:mod:`kvplug.quant`):
``mixed(key=3, value=2, symmetric=true, rotate=true, key_clip=0.85, residual=64)`` is the 2-3-bit
format measured in docs/EVALUATION.md (5.6x bf16 at +5% perplexity at 8K on the reference model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug.codecs.base import Codec, Encoded, PagedFormat, Role
from kvplug.codecs.integer import BY_BITS, IntCodec
from kvplug.parts import param


@dataclass(frozen=True)
class Mixed(Codec):
    """Per-token integer K/V with their own widths (default: 8-bit keys, 4-bit values)."""

    name = "mixed"
    paper = "KIVI 2402.02750; QuaRot 2404.00456 (rotate)"
    key: int = param(8, choices=(8, 4, 3, 2), doc="bits per key element")
    value: int = param(4, choices=(8, 4, 2), doc="bits per value element")
    rotate: bool = param(False, doc="Hadamard-rotate heads before quantizing (power-of-two head_dim)")
    residual: int = param(0, low=0, high=65536, doc="newest tokens kept in full precision (HF: paged or reference path; not in vLLM yet)")
    key_clip: float = param(1.0, low=0.05, high=1.0, doc="fraction of each key's min-max range the codes span, centred (as int2's clip)")
    value_clip: float = param(1.0, low=0.05, high=1.0, doc="fraction of each value's min-max range the codes span, centred")
    symmetric: bool = param(False, doc="both roles store a scale only, levels symmetric about 0")

    def role_codec(self, role: Role) -> IntCodec:
        """The per-token codec that stores ``role``."""
        bits, clip = (self.key, self.key_clip) if role == "key" else (self.value, self.value_clip)
        return BY_BITS[bits](rotate=self.rotate, clip=clip, symmetric=self.symmetric)

    def check_head_dim(self, head_dim: int) -> None:
        for role in ("key", "value"):
            self.role_codec(role).check_head_dim(head_dim)

    def paged_format(self, head_dim: int) -> PagedFormat | None:
        return PagedFormat(self.key, self.value, self.rotate, self.residual, self.key_clip, self.value_clip,
                           self.symmetric)

    def bytes_per_token(self, head_dim: int, dtype_bytes: int = 2) -> float:
        return sum(self.role_codec(role).bytes_per_token(head_dim, dtype_bytes) / 2 for role in ("key", "value"))

    def encode(self, x: torch.Tensor, role: Role, valid: torch.Tensor | None = None) -> Encoded:
        return self.role_codec(role).encode(x, role, valid)

    def decode(self, enc: Encoded, role: Role, dtype: torch.dtype) -> torch.Tensor:
        return self.role_codec(role).decode(enc, role, dtype)
