"""``fp8``: float8 e4m3 with one float16 scale per token and head.

FP8 formats for deep learning (Micikevicius et al., arXiv 2209.05433); the per-token scale keeps
large keys in range, where a single tensor-wide scale (vLLM's default) may clip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug import quant
from kvplug.codecs.base import Codec, Encoded, Role
from kvplug.errors import SpecError

E4M3 = getattr(torch, "float8_e4m3fn", None)
E4M3_MAX = 448.0


@dataclass(frozen=True)
class Fp8(Codec):
    """float8 e4m3 K/V with a per-token, per-head float16 scale (about 2x smaller than fp16)."""

    name = "fp8"
    paper = "FP8 formats, arXiv 2209.05433"

    def __post_init__(self):
        super().__post_init__()
        if E4M3 is None:
            raise SpecError("fp8: this torch build has no float8_e4m3fn dtype")

    def bytes_per_token(self, head_dim: int, dtype_bytes: int = 2) -> float:
        return 2 * (head_dim + 2)

    def encode(self, x: torch.Tensor, role: Role, valid: torch.Tensor | None = None) -> Encoded:
        quant.check_finite(x, f"fp8 {role}s")
        xf = x.float()
        scale = (xf.abs().amax(-1, keepdim=True) / E4M3_MAX).to(quant.SCALE_DTYPE)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = (xf / scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
        return {"codes": codes.view(torch.uint8), "scale": scale}

    def decode(self, enc: Encoded, role: Role, dtype: torch.dtype) -> torch.Tensor:
        return (enc["codes"].view(E4M3).float() * enc["scale"].float()).to(dtype)
