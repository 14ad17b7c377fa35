"""The paged KV-cache layout shared by the HF and vLLM adapters and the Triton kernels.

One tensor per layer. For the integer formats (8/4/2 bits per element, one float16 scale/zero per
token per head, the format of :mod:`kvplug.quant`) it is ``uint8``. Keys and values at one width::

    [num_blocks, 2 (K, V), num_kv_heads, block_size * (code_bytes + 4)]

at two widths (``value_bits`` given, e.g. 8-bit keys and 4-bit values), head-major, the K row of a
head followed by its V row::

    [num_blocks, num_kv_heads, block_size * (key code_bytes + 4) + block_size * (value code_bytes + 4)]

Each (block, K/V, head) row holds first the packed codes of its ``block_size`` tokens,
``[block_size, code_bytes]`` (``code_bytes = head_dim * bits / 8``, a multiple of 16 bytes, so a
token's codes are whole 16-byte chunks; 3-bit keys: their 2-bit part, a multiple of 16 bytes,
then their high bits, :func:`kvplug.quant.pack`), then their metadata ``[block_size, 2]`` float16
(scale, zero), or ``[block_size, 1]`` (the scale) in the symmetric format (the ``+ 4`` below is
then ``+ 2``). For 16 bits (codec ``none``) it is the model dtype::

    [num_blocks, 2 (K, V), num_kv_heads, block_size, head_dim]

A token's slot is ``block_id * block_size + offset`` (vLLM's convention). The kernels address a
row as ``block * strides[0] + role * strides[1] + head * strides[2]`` (:meth:`PagedLayout.strides`).
Which layout a codec gets is what it declares (:meth:`kvplug.codecs.base.Codec.paged_format`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug import quant

_BITS = (16, 8, 4, 3, 2)


@dataclass(frozen=True)
class PagedLayout:
    """Shape of one layer's paged KV cache.

    ``bits``: of the keys, and of the values unless ``value_bits`` is given: 16 (codec ``none``,
    stored in ``dtype``), 8, 4 or 2 (per-token integer codes). ``value_bits``: the values' width
    when it differs (both quantized). ``rotated``: the codec Hadamard-rotates heads before
    quantizing; the caller rotates q before attention and the output after (the kernels read the
    rotated basis). ``dtype``: the model dtype (float16 or bfloat16): of q, of the K/V given to
    ``store`` and of the ``none`` cache. ``key_clip`` / ``value_clip``: the share of each
    token-head's min-max range the codes of that role span, centred (:func:`kvplug.quant.affine_params`;
    1: plain min-max); only the store differs, the cache's bytes decode the same way.
    """

    block_size: int
    num_kv_heads: int
    head_dim: int
    bits: int = 16
    dtype: torch.dtype = torch.float16
    value_bits: int | None = None
    rotated: bool = False
    key_clip: float = 1.0
    value_clip: float = 1.0
    symmetric: bool = False

    def __post_init__(self):
        for name, bits in (("bits", self.bits), ("value_bits", self.vbits)):
            if bits not in _BITS:
                raise ValueError(f"PagedLayout: {name}={bits} not supported; allowed: {_BITS} (16 = none)")
        if (self.bits == 16) != (self.vbits == 16):
            raise ValueError(f"PagedLayout: keys at {self.bits} and values at {self.vbits} bits: both are "
                             "quantized or neither")
        for name, clip in (("key_clip", self.key_clip), ("value_clip", self.value_clip)):
            if not 0.0 < clip <= 1.0:
                raise ValueError(f"PagedLayout: {name}={clip} must be in (0, 1]")
        if self.bits == 16 and ((self.key_clip, self.value_clip) != (1.0, 1.0) or self.symmetric):
            raise ValueError("PagedLayout: clip and symmetric apply to quantized layouts only")
        if self.vbits == 3:
            raise ValueError("PagedLayout: 3 bits is a key width (the kernels read 3-bit keys, not values)")
        if self.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"PagedLayout: dtype={self.dtype} not supported; allowed: float16, bfloat16")
        if self.block_size < 1 or self.num_kv_heads < 1:
            raise ValueError("PagedLayout: block_size and num_kv_heads must be positive")
        hd = self.head_dim
        if hd < 16 or hd & (hd - 1):
            raise ValueError(f"PagedLayout: head_dim={hd} must be a power of two >= 16")
        for bits in {self.bits, self.vbits} - {16}:
            if (hd * quant.first_part_bits(bits) // 8) % 16:  # 3 bits: its 2-bit part comes first
                raise ValueError(f"PagedLayout: head_dim={hd} at {bits} bits gives "
                                 f"{hd * bits / 8:g} code bytes, not a multiple of 16")

    @classmethod
    def for_codec(cls, codec, block_size: int, num_kv_heads: int, head_dim: int,
                  dtype: torch.dtype = torch.float16) -> "PagedLayout":
        """The layout a codec declares (:meth:`~kvplug.codecs.base.Codec.paged_format`); a spec
        string (``"int4"``) is parsed first. One-line ``ValueError`` for a codec the kernels cannot read."""
        if isinstance(codec, str):
            from kvplug import parse

            codec = parse(codec).codec
        fmt = codec.paged_format(head_dim)
        if fmt is None:
            raise ValueError(f"PagedLayout: codec {codec} has no paged kernel layout (the kernels read "
                             "per-token integer codes with one scale/zero per token-head, or the model dtype)")
        value_bits = None if fmt.value_bits == fmt.key_bits else fmt.value_bits
        return cls(block_size, num_kv_heads, head_dim, fmt.key_bits, dtype, value_bits, fmt.rotated,
                   fmt.key_clip, fmt.value_clip, fmt.symmetric)

    # sizes -------------------------------------------------------------------------------
    @property
    def vbits(self) -> int:
        """Bits of the values (``bits`` unless ``value_bits`` is given)."""
        return self.bits if self.value_bits is None else self.value_bits

    @property
    def mixed(self) -> bool:
        """Keys and values at different widths (the head-major layout)."""
        return self.vbits != self.bits

    def role_bits(self, role: int) -> int:
        """Bits of role 0 (keys) or 1 (values)."""
        return self.bits if role == 0 else self.vbits

    def role_clip(self, role: int) -> float:
        """Clip of role 0 (keys) or 1 (values)."""
        return self.key_clip if role == 0 else self.value_clip

    @property
    def quantized(self) -> bool:
        return self.bits != 16

    @property
    def code_bytes(self) -> int:
        """Bytes of one token's packed key codes for one head (``head_dim * bits / 8``)."""
        return self.role_code_bytes(0)

    def role_code_bytes(self, role: int) -> int:
        """Bytes of one token's codes of role 0 (keys) or 1 (values) for one head (16 bits: the
        head in the model dtype)."""
        bits = self.role_bits(role)
        return self.head_dim * bits // 8 if bits != 16 else self.head_dim * self.dtype.itemsize

    @property
    def meta_bytes(self) -> int:
        """Bytes of one token's metadata per role and head: (scale, zero) float16, a scale alone
        when symmetric, none for 16 bits."""
        return 0 if not self.quantized else 2 if self.symmetric else 4

    def role_row_bytes(self, role: int) -> int:
        """Bytes of one (block, role, head) row: codes, then (scale, zero) when quantized."""
        return self.block_size * (self.role_code_bytes(role) + self.meta_bytes)

    @property
    def row_bytes(self) -> int:
        """Bytes of one (block, K/V, head) row of a quantized cache at one width."""
        return self.role_row_bytes(0)

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.uint8 if self.quantized else self.dtype

    def shape(self, num_blocks: int) -> tuple[int, ...]:
        if self.mixed:
            return (num_blocks, self.num_kv_heads, self.role_row_bytes(0) + self.role_row_bytes(1))
        if self.quantized:
            return (num_blocks, 2, self.num_kv_heads, self.row_bytes)
        return (num_blocks, 2, self.num_kv_heads, self.block_size, self.head_dim)

    def strides(self) -> tuple[int, int, int]:
        """``(block, role, head)`` strides of a row's start, in storage elements (bytes when quantized)."""
        if self.mixed:
            head = self.role_row_bytes(0) + self.role_row_bytes(1)
            return self.num_kv_heads * head, self.role_row_bytes(0), head
        row = self.row_bytes if self.quantized else self.block_size * self.head_dim
        return 2 * self.num_kv_heads * row, self.num_kv_heads * row, row

    def bytes_per_token(self) -> int:
        """Bytes one token takes, K and V, all KV heads of one layer."""
        return self.num_kv_heads * sum(self.role_row_bytes(r) for r in (0, 1)) // self.block_size

    def page_bytes(self) -> int:
        """Bytes of one block of one layer: exactly the cache tensor's size per block."""
        return self.block_size * self.bytes_per_token()

    def token_row_bytes(self) -> int:
        """Bytes of one token of one head, K and V, packed as a *token row*: per role its codes
        then its (scale, zero) (16 bits: the K then the V head in the model dtype). The form an
        offloaded cache keeps in host memory (:func:`kvplug.triton_ops.copy_token_rows`)."""
        return sum(length for _, length, _, _ in self.token_row_segments())

    def token_row_segments(self) -> list[tuple[int, int, int, int]]:
        """Where a token row's bytes live in the cache: ``(row offset, length, offset in the
        (block, head) bytes, bytes per slot offset)`` per segment. A segment of the token at slot
        offset ``o`` of block ``b``, head ``h`` is at byte ``b * s0 + h * s2 + base + o * step``
        (``s0, s2``: :meth:`strides` in bytes)."""
        item = self.storage_dtype.itemsize
        role_stride = self.strides()[1] * item
        out, at = [], 0
        for role in (0, 1):
            cb = self.role_code_bytes(role)
            out.append((at, cb, role * role_stride, cb))
            at += cb
            if self.quantized:
                mb = self.meta_bytes
                out.append((at, mb, role * role_stride + self.block_size * cb, mb))
                at += mb
        return out

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

    def role_codes(self, cache: torch.Tensor, role: int) -> torch.Tensor:
        """uint8 view ``[num_blocks, heads, block_size, code_bytes]`` of role 0 (K) or 1 (V)'s codes."""
        self._need_quantized()
        bs, cb = self.block_size, self.role_code_bytes(role)
        return self._rows(cache, role)[..., : bs * cb].unflatten(-1, (bs, cb))

    def role_meta(self, cache: torch.Tensor, role: int) -> torch.Tensor:
        """float16 view ``[num_blocks, heads, block_size, 2]`` of role 0 (K) or 1 (V)'s (scale, zero)
        (``[..., 1]``, the scale alone, when symmetric)."""
        self._need_quantized()
        bs, cb = self.block_size, self.role_code_bytes(role)
        return self._rows(cache, role)[..., bs * cb:].view(torch.float16).unflatten(-1, (bs, self.meta_bytes // 2))

    def _rows(self, cache: torch.Tensor, role: int) -> torch.Tensor:
        """``[num_blocks, heads, row_bytes]`` rows of one role."""
        if self.mixed:
            k = self.role_row_bytes(0)
            return cache[..., :k] if role == 0 else cache[..., k:]
        return cache[:, role]

    def codes(self, cache: torch.Tensor) -> torch.Tensor:
        """uint8 view ``[num_blocks, 2, heads, block_size, code_bytes]`` of the packed codes (one width)."""
        self._need_one_width()
        return cache[..., : self.block_size * self.code_bytes].unflatten(-1, (self.block_size, self.code_bytes))

    def meta(self, cache: torch.Tensor) -> torch.Tensor:
        """float16 view ``[num_blocks, 2, heads, block_size, 2]`` of (scale, zero) (one width)."""
        self._need_one_width()
        bs = self.block_size
        return cache[..., bs * self.code_bytes:].view(torch.float16).unflatten(-1, (bs, self.meta_bytes // 2))

    def scale(self, cache: torch.Tensor) -> torch.Tensor:
        """float16 view ``[num_blocks, 2, heads, block_size]`` of the scales (one width)."""
        return self.meta(cache)[..., 0]

    def zero(self, cache: torch.Tensor) -> torch.Tensor:
        """float16 view ``[num_blocks, 2, heads, block_size]`` of the zeros (one width)."""
        if self.symmetric:
            raise ValueError(f"{self}: the symmetric format stores no zero (it is -(2**bits - 1) / 2 * scale)")
        return self.meta(cache)[..., 1]

    def values(self, cache: torch.Tensor) -> torch.Tensor:
        """The ``none`` cache itself, ``[num_blocks, 2, heads, block_size, head_dim]``."""
        if self.quantized:
            raise ValueError(f"{self}: a quantized layout has codes/scale/zero, not values")
        return cache

    def _need_one_width(self):
        self._need_quantized()
        if self.mixed:
            raise ValueError(f"{self}: keys and values differ in width; use role_codes/role_meta")

    def _need_quantized(self):
        if not self.quantized:
            raise ValueError(f"{self}: codec none has no codes/scale/zero; use values()")
