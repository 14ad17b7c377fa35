"""``kivi``: 2/4-bit keys per channel, values per token, newest tokens in full precision.

KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024,
arXiv 2402.02750) observes that key outliers live in fixed channels and value outliers do not:
keys are quantized per channel over groups of ``group`` tokens, values per token in groups of
``group`` channels, and the ``residual`` newest tokens stay in full precision until a whole key
group can be quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug import quant
from kvplug.codecs.base import Codec, Encoded, Role
from kvplug.errors import SpecError
from kvplug.parts import param


@dataclass(frozen=True)
class Kivi(Codec):
    """KIVI: per-channel keys, per-token values, full-precision residual window."""

    name = "kivi"
    paper = "KIVI, arXiv 2402.02750"
    bits: int = param(2, choices=(2, 4), doc="bits per key/value element")
    group: int = param(32, low=8, high=1024, doc="tokens per key scale; channels per value scale")
    residual: int = param(128, low=0, high=65536, doc="newest tokens kept in full precision")

    @property
    def token_group(self) -> int:
        return self.group

    def value_group(self, head_dim: int) -> int:
        return min(self.group, head_dim)

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim % self.value_group(head_dim) or head_dim % (8 // self.bits):
            raise SpecError(f"kivi: group={self.group} must divide head_dim={head_dim}")

    def bytes_per_token(self, head_dim: int, dtype_bytes: int = 2) -> float:
        codes = head_dim * self.bits / 8
        key_meta = 4 * head_dim / self.group
        value_meta = 4 * head_dim / self.value_group(head_dim)
        return 2 * codes + key_meta + value_meta

    def encode(self, x: torch.Tensor, role: Role, valid: torch.Tensor | None = None) -> Encoded:
        *lead, t, d = x.shape
        self.check_head_dim(d)
        quant.check_finite(x, f"kivi {role}s")
        if role == "key":
            if t % self.group:
                raise ValueError(f"kivi keys are encoded in whole groups of {self.group} tokens, got {t}")
            blocks = x.reshape(*lead, t // self.group, self.group, d)
            mask = None if valid is None else valid.reshape(*lead, t // self.group, self.group, 1)
            scale, zero = quant.affine_params(blocks, self.bits, dim=-2, valid=mask)
            codes = quant.affine_codes(blocks, scale, zero, self.bits).reshape(x.shape)
            return {"codes": quant.pack(codes, self.bits), "scale": scale.squeeze(-2), "zero": zero.squeeze(-2)}
        g = self.value_group(d)
        grouped = x.reshape(*lead, t, d // g, g)
        scale, zero = quant.affine_params(grouped, self.bits)
        codes = quant.affine_codes(grouped, scale, zero, self.bits).reshape(x.shape)
        return {"codes": quant.pack(codes, self.bits), "scale": scale.squeeze(-1), "zero": zero.squeeze(-1)}

    def decode(self, enc: Encoded, role: Role, dtype: torch.dtype) -> torch.Tensor:
        codes = quant.unpack(enc["codes"], self.bits)
        *lead, t, d = codes.shape
        if role == "key":
            blocks = codes.reshape(*lead, t // self.group, self.group, d)
            x = quant.affine_decode(blocks, enc["scale"].unsqueeze(-2), enc["zero"].unsqueeze(-2))
        else:
            grouped = codes.reshape(*lead, t, enc["scale"].shape[-1], -1)
            x = quant.affine_decode(grouped, enc["scale"].unsqueeze(-1), enc["zero"].unsqueeze(-1))
        return x.reshape(codes.shape).to(dtype)
