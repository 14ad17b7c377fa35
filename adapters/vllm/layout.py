"""The bytes of one paged KV-cache block, and the PyTorch reference that writes and reads them.

Pure PyTorch (no vLLM import), so it is unit-tested without an engine. vLLM hands a layer its
cache as a tensor ``[num_blocks, num_kv_heads, block_size, C]`` (0.32's head-major ``[B, H, N, C]``
page, ``C`` bytes per token-head). kvplug reads each block's page as the layout of
:class:`kvplug.triton_ops.PagedLayout`, so the Triton kernels can later work on the same bytes::

    page = [2 (K, V), num_kv_heads, block_size * (code_bytes + meta_bytes)]
    row  = codes [block_size, code_bytes] then metadata [block_size, meta_bytes]

or, when keys and values take different bytes (``mixed``: e.g. 8-bit keys, 4-bit values),
head-major, each head's K row then its V row::

    page = [num_kv_heads, block_size * (K code + meta bytes) + block_size * (V code + meta bytes)]

For the integer codecs ``codes`` are the planar-packed codes of :mod:`kvplug.quant` and the
metadata of a token is its float16 ``scale`` then ``zero`` (one pair per group; ``group=0``: one
pair, the Triton layout exactly). For ``none`` the codes are the K/V in the model dtype and there
is no metadata. A token-head therefore costs ``C`` = the K and V code and metadata bytes, which
is what the codec declares in ``bytes_per_token`` and what the KV-cache spec reports to vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug.codecs.base import Codec, Encoded
from kvplug.errors import SpecError

ROLES = ("key", "value")


@dataclass(frozen=True)
class Field:
    """One tensor of a codec's encoding: its name, dtype and elements per token."""

    name: str
    dtype: torch.dtype
    width: int

    @property
    def nbytes(self) -> int:
        return self.width * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class RoleLayout:
    """How one role (keys or values) of a token-head is laid out: its codes, then its metadata."""

    codes: Field
    meta: tuple[Field, ...]

    @property
    def code_bytes(self) -> int:
        return self.codes.nbytes

    @property
    def meta_bytes(self) -> int:
        return sum(f.nbytes for f in self.meta)

    @property
    def nbytes(self) -> int:
        return self.code_bytes + self.meta_bytes

    def to_bytes(self, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, meta)`` uint8 ``[..., T, code_bytes]``, ``[..., T, meta_bytes]``."""
        codes = _as_bytes(enc[self.codes.name])
        if not self.meta:
            return codes, codes.new_empty(*codes.shape[:-1], 0)
        return codes, torch.cat([_as_bytes(enc[f.name]) for f in self.meta], -1)

    def from_bytes(self, codes: torch.Tensor, meta: torch.Tensor) -> Encoded:
        enc = {self.codes.name: codes.contiguous().view(self.codes.dtype)}
        start = 0
        for f in self.meta:
            enc[f.name] = meta[..., start:start + f.nbytes].contiguous().view(f.dtype)
            start += f.nbytes
        return enc


@dataclass(frozen=True)
class TokenLayout:
    """How one token-head of ``codec`` is laid out in bytes, per role (keys, values)."""

    codec: Codec
    head_dim: int
    dtype: torch.dtype  # the model dtype: what K/V come in as and decode to
    roles: tuple[RoleLayout, RoleLayout]

    @classmethod
    def for_codec(cls, codec: Codec, head_dim: int, dtype: torch.dtype) -> TokenLayout:
        """Probe ``codec`` with one token to learn its fields; refuse codecs a page cannot hold."""
        if not codec.per_token:
            raise SpecError(f"{codec.name}: kvplug in vLLM stores each token on its own in paged blocks; "
                            f"{codec.name} encodes groups of {codec.token_group} tokens (residual "
                            f"{codec.residual}); use int2/int4 (optionally rotate=true) or mixed instead")
        codec.check_head_dim(head_dim)
        roles = []
        for role in ROLES:
            enc = codec.encode(torch.zeros(1, 1, head_dim, dtype=dtype), role)
            fields = tuple(Field(name, t.dtype, t.shape[-1]) for name, t in enc.items())
            roles.append(RoleLayout(fields[0], fields[1:]))
        layout = cls(codec, head_dim, dtype, tuple(roles))
        declared = codec.bytes_per_token(head_dim, torch.empty((), dtype=dtype).element_size())
        if declared != layout.token_bytes:
            raise SpecError(f"{codec.name}: declares {declared} bytes per token-head but encodes "
                            f"{layout.token_bytes}; the page size would be wrong")
        return layout

    @property
    def mixed(self) -> bool:
        """Keys and values take different bytes: the page is head-major (see :meth:`PagedKV.pages`)."""
        return self.roles[0].nbytes != self.roles[1].nbytes

    @property
    def token_bytes(self) -> int:
        """Bytes of K and V of one token for one KV head: the ``C`` of vLLM's page."""
        return sum(r.nbytes for r in self.roles)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


class PagedKV:
    """Writes and reads one layer's paged cache in the kvplug layout with the core codec."""

    def __init__(self, layout: TokenLayout):
        self.layout = layout

    def pages(self, kv_cache: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per role, views ``codes [NB, H, BS, code_bytes]`` and ``meta [NB, H, BS, meta_bytes]``
        into ``kv_cache`` (``[NB, H, BS, C]`` of any dtype, each block's page dense): K rows of
        every head then V rows (``[2, H, row]``) when the roles take the same bytes, else head-major
        (``[H, K row + V row]``), as :class:`kvplug.triton_ops.PagedLayout`."""
        nb, h, bs = kv_cache.shape[:3]
        raw = kv_cache.view(torch.uint8)
        if raw.shape[-1] != self.layout.token_bytes:
            raise ValueError(f"kvplug: the KV cache holds {raw.shape[-1]} bytes per token-head but "
                             f"{self.layout.codec} needs {self.layout.token_bytes}: the page size "
                             "reported to vLLM does not match this backend")
        rk, rv = (bs * r.nbytes for r in self.layout.roles)
        try:
            if self.layout.mixed:
                page = raw.view(nb, h, rk + rv)
                rows = (page[..., :rk], page[..., rk:])
            else:
                page = raw.view(nb, 2, h, rk)
                rows = (page[:, 0], page[:, 1])
        except RuntimeError as e:  # pragma: no cover - depends on vLLM's allocation
            raise ValueError("kvplug: each block's KV page must be dense (head-major LBHNC layout)") from e
        out = []
        for row, role in zip(rows, self.layout.roles):
            cb, mb = role.code_bytes, role.meta_bytes
            out.append((row[..., :bs * cb].unflatten(-1, (bs, cb)), row[..., bs * cb:].unflatten(-1, (bs, mb))))
        return out

    def store(self, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        """Encode ``key``/``value`` ``[T, H, D]`` and write token ``t`` into slot ``slots[t]``
        (``block * block_size + offset``; negative slots are skipped)."""
        keep = slots >= 0
        if not bool(keep.all()):
            key, value, slots = key[keep], value[keep], slots[keep]
        if slots.numel() == 0:
            return
        pages = self.pages(kv_cache)
        block, offset = _split(slots, kv_cache.shape[2])
        for (codes, meta), role_layout, x, role in zip(pages, self.layout.roles, (key, value), ROLES):
            enc = self.layout.codec.encode(x.transpose(0, 1), role)  # [H, T, ...]
            c, m = role_layout.to_bytes(enc)
            codes[block, :, offset] = c.transpose(0, 1)  # [T, H, code_bytes]
            if m.shape[-1]:
                meta[block, :, offset] = m.transpose(0, 1)

    def gather(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded keys and values ``[H, length, D]`` (model dtype) of the first ``length``
        tokens held by ``block_ids`` (a request's block-table row)."""
        positions = torch.arange(length, device=block_ids.device)
        return self.read(kv_cache, slots_of(block_ids, positions, kv_cache.shape[2]))

    def read(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded keys and values ``[H, L, D]`` (model dtype) of the tokens in ``slots`` ``[L]``."""
        pages = self.pages(kv_cache)
        heads = torch.arange(kv_cache.shape[1], device=kv_cache.device)[:, None]
        block, offset = _split(slots[None, :], kv_cache.shape[2])
        out = []
        for (codes, meta), role_layout, role in zip(pages, self.layout.roles, ROLES):
            c, m = codes[block, heads, offset], meta[block, heads, offset]  # [H, L, bytes]
            out.append(self.layout.codec.decode(role_layout.from_bytes(c, m), role, self.layout.dtype))
        return out[0], out[1]

    def roundtrip(self, x: torch.Tensor, role: str) -> torch.Tensor:
        """``x`` as it reads back once stored (encoded and decoded to the model dtype)."""
        return self.layout.codec.decode(self.layout.codec.encode(x, role), role, self.layout.dtype)

    def move(self, kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy token-head ``(src[h, j], h)`` to ``(dst[h, j], h)`` for every head ``h`` (slots
        ``[H, K]``; a ``[K]`` dst is the same for every head), codes and metadata alike; all rows
        are read before any is written, so sources and destinations may overlap."""
        heads = torch.arange(kv_cache.shape[1], device=kv_cache.device)[:, None]
        src_block, src_offset = _split(src, kv_cache.shape[2])
        dst_block, dst_offset = _split(dst if dst.dim() == 2 else dst[None, :], kv_cache.shape[2])
        for role_pages in self.pages(kv_cache):
            for part in role_pages:
                if part.shape[-1]:
                    part[dst_block, heads, dst_offset] = part[src_block, heads, src_offset]


def slots_of(block_ids: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Slots (``block * block_size + offset``) of logical ``positions`` in a request's block-table row."""
    positions = positions.long()
    return block_ids.long()[positions // block_size] * block_size + positions % block_size


def _split(slots: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    slots = slots.long()
    return slots // block_size, slots % block_size


def as_triton_cache(kv_cache: torch.Tensor, paged_layout) -> torch.Tensor:
    """vLLM's ``[num_blocks, heads, block_size, C]`` layer cache viewed (no copy) in the shape of a
    :class:`kvplug.triton_ops.PagedLayout` cache, for the GPU path's ``store_kv`` /
    ``decode_attention``: the bytes are the same, only the tensor's shape differs."""
    num_blocks = kv_cache.shape[0]
    return kv_cache.view(paged_layout.storage_dtype).view(paged_layout.shape(num_blocks))
