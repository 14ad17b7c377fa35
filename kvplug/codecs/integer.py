"""``int8`` / ``int4`` / ``int3`` / ``int2``: per-token integer quantization.

Each token's head vector is split into groups along head_dim, each group stored as ``bits``-bit
codes with a float16 scale and zero (format in :mod:`kvplug.quant`). With ``group=0`` (default)
one scale/zero covers the whole head, the layout a paged cache reads fastest; smaller groups trade
bytes for accuracy (KIVI's value quantization, Liu et al. 2024, arXiv 2402.02750; group-wise
quantization as in FlexGen, arXiv 2303.06865). ``rotate=true`` applies a Hadamard rotation
first (QuaRot, arXiv 2404.00456), which tames outlier channels at 2 and 4 bits. ``residual=N``
keeps the N newest tokens in full precision and quantizes a token when it leaves that window
(KIVI's residual, Liu et al. 2024, arXiv 2402.02750, section 3.3, here with per-token keys): the
newest tokens draw much of a decode step's attention, and quantizing them is where most of
per-token int4's perplexity loss on the reference model comes from (docs/EVALUATION.md).
``clip`` < 1 spans the codes over a centred part of each group's range (at 2 bits the min-max
step is about 1.6 sigma of a Gaussian head where about 1 sigma minimises the error; clipping as
in ACIQ, Banner et al. 2019, arXiv 1810.05723); ``symmetric=true`` stores a scale only, levels
symmetric about 0 (as the symmetric KV formats of KVQuant, Hooper et al. 2024, arXiv 2401.18079,
without its non-uniform levels), which buys the bytes that 3-bit keys need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvplug import quant
from kvplug.codecs.base import Codec, Encoded, PagedFormat, Role
from kvplug.errors import SpecError
from kvplug.parts import param
from kvplug.rotation import hadamard, rotate


@dataclass(frozen=True)
class IntCodec(Codec):
    """Per-token asymmetric integer quantization (subclasses fix ``bits``)."""

    bits: ClassVar[int]
    paper: ClassVar[str] = "KIVI 2402.02750 (groups); QuaRot 2404.00456 (rotate); ACIQ 1810.05723 (clip)"
    group: int = param(0, low=0, high=1024, doc="elements per scale/zero along head_dim; 0 = whole head")
    rotate: bool = param(False, doc="Hadamard-rotate heads before quantizing (power-of-two head_dim)")
    residual: int = param(0, low=0, high=65536, doc="newest tokens kept in full precision (HF: paged or reference path; not in vLLM yet)")
    clip: float = param(1.0, low=0.05, high=1.0, doc="fraction of each group's min-max range the codes span, centred (below 1 clamps the extremes)")
    symmetric: bool = param(False, doc="store a scale only, levels symmetric about 0 (2 bytes less per token-head and role)")

    def group_size(self, head_dim: int) -> int:
        return self.group or head_dim

    def check_head_dim(self, head_dim: int) -> None:
        g = self.group_size(head_dim)
        per_byte = 8 if self.bits == 3 else 8 // self.bits
        if head_dim % g or g % per_byte:
            raise SpecError(f"{self.name}: group={g} must divide head_dim={head_dim} "
                            f"and be a multiple of {per_byte}")
        if self.rotate:
            hadamard(head_dim)

    def paged_format(self, head_dim: int) -> PagedFormat | None:
        """One scale/zero per token-head (``group=0``) is what the kernels read; a residual window
        is held beside the pages (:class:`~kvplug.codecs.base.PagedFormat`)."""
        if self.group_size(head_dim) != head_dim:
            return None
        return PagedFormat(self.bits, self.bits, self.rotate, self.residual, self.clip, self.clip, self.symmetric)

    def bytes_per_token(self, head_dim: int, dtype_bytes: int = 2) -> float:
        groups = head_dim // self.group_size(head_dim)
        return 2 * (head_dim * self.bits / 8 + (2 if self.symmetric else 4) * groups)

    def encode(self, x: torch.Tensor, role: Role, valid: torch.Tensor | None = None) -> Encoded:
        d = x.shape[-1]
        self.check_head_dim(d)
        quant.check_finite(x, f"{self.name} {role}s")
        if self.rotate:
            x = rotate(x)
        grouped = x.reshape(*x.shape[:-1], d // self.group_size(d), self.group_size(d))
        if self.symmetric:
            scale = quant.symmetric_scale(grouped, self.bits, self.clip)
            codes = quant.symmetric_codes(grouped, scale, self.bits).reshape(x.shape)
            return {"codes": quant.pack(codes, self.bits), "scale": scale.squeeze(-1)}
        scale, zero = quant.affine_params(grouped, self.bits, clip=self.clip)
        codes = quant.affine_codes(grouped, scale, zero, self.bits).reshape(x.shape)
        return {"codes": quant.pack(codes, self.bits), "scale": scale.squeeze(-1), "zero": zero.squeeze(-1)}

    def decode(self, enc: Encoded, role: Role, dtype: torch.dtype) -> torch.Tensor:
        codes = quant.unpack(enc["codes"], self.bits)
        grouped = codes.reshape(*codes.shape[:-1], enc["scale"].shape[-1], -1)
        if self.symmetric:
            x = quant.symmetric_decode(grouped, enc["scale"].unsqueeze(-1), self.bits).reshape(codes.shape)
        else:
            x = quant.affine_decode(grouped, enc["scale"].unsqueeze(-1), enc["zero"].unsqueeze(-1)).reshape(codes.shape)
        if self.rotate:
            x = rotate(x)
        return x.to(dtype)


@dataclass(frozen=True)
class Int8(IntCodec):
    """8-bit per-token integer KV (about 1.9x smaller than fp16)."""

    name = "int8"
    bits = 8


@dataclass(frozen=True)
class Int4(IntCodec):
    """4-bit per-token integer KV (about 3.8x smaller than fp16 at head_dim 128)."""

    name = "int4"
    bits = 4


@dataclass(frozen=True)
class Int3(IntCodec):
    """3-bit per-token integer KV; in the paged layout as the keys of ``mixed(key=3, ...)``."""

    name = "int3"
    bits = 3


@dataclass(frozen=True)
class Int2(IntCodec):
    """2-bit per-token integer KV (about 7x smaller than fp16 at head_dim 128); best with rotate=true."""

    name = "int2"
    bits = 2


BY_BITS: dict[int, type[IntCodec]] = {8: Int8, 4: Int4, 3: Int3, 2: Int2}
"""The per-token integer codec of each width (``BY_BITS[4](rotate=True)``)."""
