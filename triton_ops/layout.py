"""The paged KV-cache layout shared by the HF and vLLM adapters and the Triton kernels.

One tensor per layer. For the integer codecs (int8/int4/int2, one float16 scale/zero per token
per head, the format of :mod:`kvplug.quant`) it is ``uint8``::

    [num_blocks, 2 (K, V), num_kv_heads, block_size * (code_bytes + 4)]

where each ``(block, K/V, head)`` row holds first the packed codes of its ``block_size`` tokens,
``[block_size, code_bytes]`` (``code_bytes = head_dim * bits / 8``, a multiple of 16 bytes, so a
token's codes are whole 16-byte chunks), then their metadata ``[block_size, 2]`` float16
(scale, zero). For codec ``none`` (bits 16) it is the model dtype::

    [num_blocks, 2 (K, V), num_kv_heads, block_size, head_dim]

A token's slot is ``block_id * block_size + offset`` (vLLM's convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_BITS = (16, 8, 4, 2)
_CODEC_BITS = {"none": 16, "int8": 8, "int4": 4, "int2": 2}


@dataclass(frozen=True)
class PagedLayout:
    """Shape of one layer's paged KV cache.

    ``bits``: 16 (codec ``none``, stored in ``dtype``), 8, 4 or 2 (integer codecs, group 0).
    ``dtype``: the model dtype (float16 or bfloat16): of q, of the K/V given to ``store`` and of
    the ``none`` cache.
    """

    block_size: int
    num_kv_heads: int
    head_dim: int
    bits: int = 16
    dtype: torch.dtype = torch.float16

    def __post_init__(self):
        if self.bits not in _BITS:
            raise ValueError(f"PagedLayout: bits={self.bits} not supported; allowed: {_BITS} (16 = none)")
        if self.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"PagedLayout: dtype={self.dtype} not supported; allowed: float16, bfloat16")
        if self.block_size < 1 or self.num_kv_heads < 1:
            raise ValueError("PagedLayout: block_size and num_kv_heads must be positive")
        hd = self.head_dim
        if hd < 16 or hd & (hd - 1):
            raise ValueError(f"PagedLayout: head_dim={hd} must be a power of two >= 16")
        if self.quantized and (hd * self.bits // 8) % 16:
            raise ValueError(f"PagedLayout: head_dim={hd} at {self.bits} bits gives "
                             f"{hd * self.bits / 8:g} code bytes, not a multiple of 16")

    @classmethod
    def for_codec(cls, codec, block_size: int, num_kv_heads: int, head_dim: int,
                  dtype: torch.dtype = torch.float16) -> "PagedLayout":
        """Layout for a codec object or name (``none``, ``int8``, ``int4``, ``int2``; group 0).

        A ``rotate=true`` codec is fine: the caller rotates q before and the output after.
        """
        name = codec if isinstance(codec, str) else codec.name
        if name not in _CODEC_BITS:
            raise ValueError(f"PagedLayout: codec {name!r} has no paged kernel; known: {sorted(_CODEC_BITS)}")
        if getattr(codec, "group", 0):
            raise ValueError(f"PagedLayout: codec {codec} uses group={codec.group}; the paged kernels "
                             "need group=0 (one scale/zero per token per head)")
        return cls(block_size, num_kv_heads, head_dim, _CODEC_BITS[name], dtype)

    # sizes -------------------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        return self.bits != 16

    @property
    def code_bytes(self) -> int:
        """Bytes of one token's packed codes for one head (``head_dim * bits / 8``)."""
        return self.head_dim * self.bits // 8

    @property
    def row_bytes(self) -> int:
        """Bytes of one (block, K/V, head) row of a quantized cache."""
        return self.block_size * (self.code_bytes + 4)

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.uint8 if self.quantized else self.dtype

    def shape(self, num_blocks: int) -> tuple[int, ...]:
        if self.quantized:
            return (num_blocks, 2, self.num_kv_heads, self.row_bytes)
        return (num_blocks, 2, self.num_kv_heads, self.block_size, self.head_dim)

    def bytes_per_token(self) -> int:
        """Bytes one token takes, K and V, all KV heads of one layer."""
        if self.quantized:
            return 2 * self.num_kv_heads * (self.code_bytes + 4)
        return 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def page_bytes(self) -> int:
        """Bytes of one block of one layer: exactly the cache tensor's size per block."""
        return self.block_size * self.bytes_per_token()

    # tensors -----------------------------------------------------------------------------
    def allocate(self, num_blocks: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """An uninitialised cache tensor of ``num_blocks`` blocks."""
        return torch.empty(self.shape(num_blocks), dtype=self.storage_dtype, device=device)

    def check(self, cache: torch.Tensor) -> None:
        """Raise if ``cache`` is not a contiguous tensor of this layout."""
        if cache.dtype != self.storage_dtype or tuple(cache.shape[1:]) != self.shape(1)[1:]:
            raise ValueError(f"cache of shape {tuple(cache.shape)} {cache.dtype} does not match {self} "
                             f"(expected {self.shape(cache.shape[0])} {self.storage_dtype})")
        if not cache.is_contiguous():
            raise ValueError("paged cache must be contiguous")

    def codes(self, cache: torch.Tensor) -> torch.Tensor:
        """uint8 view ``[num_blocks, 2, heads, block_size, code_bytes]`` of the packed codes."""
        self._need_quantized()
        bs = self.block_size
        return cache[..., : bs * self.code_bytes].unflatten(-1, (bs, self.code_bytes))

    def meta(self, cache: torch.Tensor) -> torch.Tensor:
        """float16 view ``[num_blocks, 2, heads, block_size, 2]`` of (scale, zero)."""
        self._need_quantized()
        bs = self.block_size
        return cache[..., bs * self.code_bytes:].view(torch.float16).unflatten(-1, (bs, 2))

    def scale(self, cache: torch.Tensor) -> torch.Tensor:
        """float16 view ``[num_blocks, 2, heads, block_size]`` of the scales."""
        return self.meta(cache)[..., 0]

    def zero(self, cache: torch.Tensor) -> torch.Tensor:
        """float16 view ``[num_blocks, 2, heads, block_size]`` of the zeros."""
        return self.meta(cache)[..., 1]

    def values(self, cache: torch.Tensor) -> torch.Tensor:
        """The ``none`` cache itself, ``[num_blocks, 2, heads, block_size, head_dim]``."""
        if self.quantized:
            raise ValueError(f"{self}: a quantized layout has codes/scale/zero, not values")
        return cache

    def _need_quantized(self):
        if not self.quantized:
            raise ValueError(f"{self}: codec none has no codes/scale/zero; use values()")
