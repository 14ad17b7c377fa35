"""``none``: keep K/V as the model computed them (fp16/bf16), the baseline every ratio is against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug.codecs.base import Codec, Encoded, PagedFormat, Role


@dataclass(frozen=True)
class NoCodec(Codec):
    """No compression: K/V kept in the model's dtype."""

    name = "none"
    paper = "baseline"

    def bytes_per_token(self, head_dim: int, dtype_bytes: int = 2) -> float:
        return 2 * head_dim * dtype_bytes

    def paged_format(self, head_dim: int) -> PagedFormat:
        return PagedFormat(16, 16)

    def encode(self, x: torch.Tensor, role: Role, valid: torch.Tensor | None = None) -> Encoded:
        return {"x": x}

    def decode(self, enc: Encoded, role: Role, dtype: torch.dtype) -> torch.Tensor:
        return enc["x"].to(dtype)
