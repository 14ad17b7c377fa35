"""Where one layer's compressed K/V live in the HF cache.

:class:`SlotStore` keeps each KV head's tokens compact in slots ``0 .. count-1`` (heads may hold
different counts), encoded token by token, so a new token goes into any slot: appended, or
written over an evicted one. :class:`GroupStore` holds codecs that encode whole groups of tokens
(KIVI keys), appended a group at a time, the same number for every head.
"""

from __future__ import annotations

import torch

from kvplug.codecs.base import Codec, Encoded
from kvplug.codecs.none import NoCodec
from kvplug.rotation import rotate

GROWTH = 256  # slots added at once when a SlotStore is full (amortizes reallocation)


def _pad(t: torch.Tensor, extra: int, dim: int, value: float = 0) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_full(shape, value)], dim=dim)


def read_dtype(codec: Codec, dtype: torch.dtype) -> torch.dtype:
    """The dtype a layer reads its stored K/V in: the model's for codec none; float32 for a
    quantized codec, since rounding dequantized K/V to a 16-bit dtype before attention would add
    error on top of the codec's (large logits amplify it)."""
    return dtype if isinstance(codec, NoCodec) else torch.float32


def encoded_bytes(tensors: Encoded) -> int:
    """Bytes of one encoded K or V (codes, scales, ...)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


class SlotStore:
    """Per-head compact slots of a token-wise codec, with per-slot positions and scores.

    ``dtype``: what :meth:`decode` returns."""

    def __init__(self, codec: Codec, dtype: torch.dtype):
        self.codec, self.dtype = codec, dtype
        self.keys: Encoded = {}
        self.values: Encoded = {}
        self.counts: torch.Tensor | None = None  # [B, H]
        self.positions: torch.Tensor | None = None  # [B, H, S] logical positions, -1 = empty
        self.scores: torch.Tensor | None = None  # [B, H, S] eviction scores (float32)

    @property
    def capacity(self) -> int:
        return 0 if self.positions is None else self.positions.shape[-1]

    def init(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
             scores: torch.Tensor | None = None) -> None:
        """Start from ``[B, H, S, D]`` tokens whose first ``valid.sum(-1)`` slots per head are real."""
        self.keys = self.codec.encode(keys, "key", valid)
        self.values = self.codec.encode(values, "value", valid)
        self.counts = valid.sum(-1)
        self.positions = positions.masked_fill(~valid, -1)
        self.scores = torch.zeros_like(positions, dtype=torch.float32) if scores is None else scores.float()

    def _grow(self, needed: int) -> None:
        extra = max(GROWTH, needed - self.capacity)
        self.keys = {k: _pad(v, extra, -2) for k, v in self.keys.items()}
        self.values = {k: _pad(v, extra, -2) for k, v in self.values.items()}
        self.positions = _pad(self.positions, extra, -1, -1)
        self.scores = _pad(self.scores, extra, -1)

    def write(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
              scores: torch.Tensor | None, top: int | None = None, added=None) -> None:
        """Write tokens ``[B, H, N, D]`` into ``slots`` ``[B, H, N]`` (each < capacity or == count).
        ``top``: a host-side bound on ``slots.max() + 1`` (None: read it, a device sync); ``added``:
        how many of the slots were empty (int or ``[B, H]``; None: recount); ``scores`` None: leave
        the scores (zeros for scorers that do not evict)."""
        if top is None:
            top = int(slots.max()) + 1 if slots.numel() else 0
        if top > self.capacity:
            self._grow(top)
        for store, x, role in ((self.keys, keys, "key"), (self.values, values, "value")):
            enc = self.codec.encode(x, role)
            for name, t in enc.items():
                idx = slots[..., None].expand(*slots.shape, t.shape[-1])
                store[name].scatter_(-2, idx, t)
        self.positions.scatter_(-1, slots, positions)
        if scores is not None:
            self.scores.scatter_(-1, slots, scores)
        self.counts = (self.positions >= 0).sum(-1) if added is None else self.counts + added

    def decode(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(keys, values, filled)``: ``[B, H, S, D]`` in the model dtype and ``[B, H, S]`` bool."""
        return (self.codec.decode(self.keys, "key", self.dtype), self.codec.decode(self.values, "value", self.dtype),
                self.positions >= 0)

    def take_front(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Remove and return the first ``n`` slots of every head (decoded), shifting the rest left."""
        k, v, _ = self.decode()
        front = (k[..., :n, :], v[..., :n, :], self.positions[..., :n])
        keep = slice(n, None)
        self.keys = {name: t[..., keep, :] for name, t in self.keys.items()}
        self.values = {name: t[..., keep, :] for name, t in self.values.items()}
        self.positions, self.scores = self.positions[..., keep], self.scores[..., keep]
        self.counts = (self.positions >= 0).sum(-1)
        return front

    def used_slots(self) -> int:
        """Slots every (row, head) holds in the tensors: the longest head's count (heads and rows
        with fewer tokens are padded to it); slots allocated ahead for later tokens are not counted."""
        return 0 if self.counts is None or self.capacity == 0 else int(self.counts.max())

    def stored_bytes(self) -> int:
        """Bytes of K/V the tensors hold for the tokens, padding included (:meth:`used_slots`)."""
        if self.counts is None or self.capacity == 0:
            return 0
        per_slot = (encoded_bytes(self.keys) + encoded_bytes(self.values)) // self.positions.numel()
        return per_slot * self.counts.numel() * self.used_slots()

    def bookkeeping_bytes(self) -> int:
        """Bytes of the per-slot positions and scores over the same slots."""
        if self.counts is None or self.capacity == 0:
            return 0
        return (self.positions.element_size() + self.scores.element_size()) * self.counts.numel() * self.used_slots()



class GroupStore:
    """Whole token groups of a grouped codec (KIVI), appended in step for every head."""

    def __init__(self, codec: Codec, dtype: torch.dtype):
        self.codec, self.dtype = codec, dtype
        self.keys: list[Encoded] = []
        self.values: list[Encoded] = []
        self.tokens = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Encode ``[B, H, n * group, D]`` tokens (all real) as new groups."""
        if keys.shape[-2] == 0:
            return
        self.keys.append(self.codec.encode(keys, "key"))
        self.values.append(self.codec.encode(values, "value"))
        self.tokens += keys.shape[-2]

    def decode(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.keys:
            return None
        k = torch.cat([self.codec.decode(e, "key", self.dtype) for e in self.keys], dim=-2)
        v = torch.cat([self.codec.decode(e, "value", self.dtype) for e in self.values], dim=-2)
        return k, v

    def stored_bytes(self) -> int:
        return sum(encoded_bytes(e) for e in self.keys + self.values)


def store_paged(layout, keys: torch.Tensor, values: torch.Tensor, cache: torch.Tensor, flat: torch.Tensor) -> None:
    """Quantize ``[B, H, N, D]`` tokens into the paged ``cache`` at slots ``flat`` ``[B, H, N]``
    (-1 skips): the Triton store kernel on CUDA, its reference elsewhere. A rotated layout gets
    K/V rotated in float32 and quantized from there, as the codec does."""
    from kvplug import triton_ops

    b, h, n, d = keys.shape
    if layout.rotated:
        keys, values = rotate(keys), rotate(values)
    else:
        keys, values = keys.to(layout.dtype), values.to(layout.dtype)
    k = keys.permute(0, 2, 1, 3).reshape(b * n, h, d)
    v = values.permute(0, 2, 1, 3).reshape(b * n, h, d)
    store = triton_ops.store_kv if cache.device.type == "cuda" else triton_ops.store_kv_reference
    store(k, v, cache, flat.permute(0, 2, 1).reshape(b * n, h), layout)


def read_paged(layout, cache: torch.Tensor, tables: torch.Tensor, slots: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``slots`` of every row's blocks as ``[B, H, slots, D]`` K and V in ``dtype``
    (a rotated layout rotated back: H is its own inverse)."""
    from kvplug import triton_ops

    if layout.rotated:
        k, v = triton_ops.gather_kv(cache, layout, tables, slots)
        return rotate(k).to(dtype), rotate(v).to(dtype)
    return triton_ops.gather_kv(cache, layout, tables, slots, dtype)


def attend_paged_one(layout, queries: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                     scale: float, tail: tuple | None = None, logits: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention of one query per sequence ``[B, Hq, D]`` straight from the codes of the
    first ``lens`` slots (the Triton kernel on CUDA, its reference elsewhere; a rotated layout:
    q rotated in, the output rotated back, scores unchanged). ``tail``: dense tokens attended
    besides them, ``(keys, values, counts)`` as :func:`kvplug.triton_ops.decode_attention` takes
    them, in the model's basis (rotated here for a rotated layout). ``logits`` (float32
    ``[B, Hq, W]``): receives each slot's ``q . k * scale`` as the kernel (or its reference) computes it."""
    from kvplug import triton_ops

    q = (rotate(queries).to(queries.dtype) if layout.rotated else queries).contiguous()
    if tail is not None and layout.rotated:
        tail = (rotate(tail[0]), rotate(tail[1]), tail[2])
    if cache.device.type == "cuda":
        out = triton_ops.decode_attention(q, cache, layout, tables, lens, scale, tail=tail, logits=logits)
    else:
        out = triton_ops.decode_attention_reference(q, cache, layout, tables, lens, scale, tail=tail, logits=logits)
    return (rotate(out) if layout.rotated else out).to(queries.dtype)


class Tail:
    """The newest ``n`` tokens of each head in the model dtype (a residual window), beside the
    pages that hold every token's codes. A ring: the token in slot ``s`` sits in entry ``s % n``;
    a head holding ``count`` tokens has entries for slots ``count - n .. count - 1`` (those >= 0)."""

    def __init__(self, n: int, dtype: torch.dtype):
        self.n, self.dtype = n, dtype
        self.keys = self.values = None  # [B, H, n, D]

    def slots(self, counts: torch.Tensor) -> torch.Tensor:
        """``[B, H, n]``: the slot each entry holds (-1: none yet)."""
        i = torch.arange(self.n, device=counts.device)
        last = counts[..., None] - 1
        return last - torch.remainder(last - i, self.n)

    def init(self, keys: torch.Tensor, values: torch.Tensor, counts: torch.Tensor) -> None:
        """From ``[B, H, S, D]`` tokens whose first ``counts`` slots per head are real."""
        b, h, s, d = keys.shape
        self.keys = keys.new_zeros(b, h, self.n, d, dtype=self.dtype)
        self.values = torch.zeros_like(self.keys)
        if s == 0:
            return
        slots = self.slots(counts)
        at = slots.clamp(0, s - 1)[..., None].expand(b, h, self.n, d)
        held = (slots >= 0)[..., None]
        self.keys = torch.where(held, keys.gather(2, at), 0).to(self.dtype)
        self.values = torch.where(held, values.gather(2, at), 0).to(self.dtype)

    def write(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> None:
        """Tokens ``[B, H, N, D]`` appended at ``slots`` ``[B, H, N]`` (consecutive per head): the
        last ``n`` of them go into their entries."""
        keep = min(self.n, keys.shape[-2])
        at = torch.remainder(slots[..., -keep:], self.n)[..., None].expand(*slots.shape[:-1], keep, keys.shape[-1])
        self.keys.scatter_(2, at, keys[..., -keep:, :].to(self.dtype))
        self.values.scatter_(2, at, values[..., -keep:, :].to(self.dtype))

    def overwrite(self, keys: torch.Tensor, values: torch.Tensor, counts: torch.Tensor) -> None:
        """Put the held entries into decoded ``[B, H, S, D]`` K/V, in place, at their slots."""
        slots = self.slots(counts)
        bi, hi, ei = (slots >= 0).nonzero(as_tuple=True)
        at = slots[bi, hi, ei]
        keys[bi, hi, at] = self.keys[bi, hi, ei].to(keys.dtype)
        values[bi, hi, at] = self.values[bi, hi, ei].to(values.dtype)

    def stored_bytes(self) -> int:
        return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()


class PagedStore:
    """Per-head compact slots in the paged layout of :mod:`kvplug.triton_ops`.

    Row ``b`` owns blocks ``b * nb .. (b + 1) * nb - 1``. On CUDA the Triton kernels quantize and
    store each token in one pass and decode attention reads the codes directly; elsewhere their
    PyTorch references do the same work. A codec with a residual window (``int4(residual=32)``)
    also keeps its newest tokens in a :class:`Tail`: decode attention reads the older tokens'
    codes from the pages and the window densely, in one softmax (the window's codes stay
    in the pages too: a per-token code is the same whenever it is written, so a token leaving the
    window costs nothing).
    """

    BLOCK = 16

    def __init__(self, codec: Codec, dtype: torch.dtype, num_kv_heads: int, head_dim: int, device: torch.device,
                 read_dtype: torch.dtype | None = None):
        from kvplug import triton_ops

        self.codec, self.dtype, self.read_dtype = codec, dtype, read_dtype or dtype
        self.layout = triton_ops.PagedLayout.for_codec(codec, self.BLOCK, num_kv_heads, head_dim, dtype)
        self.device = device
        self.cache: torch.Tensor | None = None
        self.counts = self.positions = self.scores = None
        window = codec.paged_format(head_dim).residual
        self.tail = Tail(window, dtype) if window else None

    @staticmethod
    def supports(codec: Codec, dtype: torch.dtype, head_dim: int) -> bool:
        """Whether the paged kernels can hold this codec (it declares a layout they read)."""
        from kvplug.triton_ops import PagedLayout

        try:
            PagedLayout.for_codec(codec, PagedStore.BLOCK, 1, head_dim, dtype)
        except ValueError:
            return False
        return True

    @property
    def capacity(self) -> int:
        return 0 if self.positions is None else self.positions.shape[-1]

    def _allocate(self, batch: int, slots: int) -> None:
        blocks = -(-max(slots, 1) // self.BLOCK)
        old, old_blocks = self.cache, (0 if self.cache is None else self.cache.shape[0] // batch)
        self.cache = self.layout.allocate(batch * blocks, self.device)
        if old is not None:
            self.cache.view(batch, blocks, *self.cache.shape[1:])[:, :old_blocks] = old.view(batch, old_blocks,
                                                                                           *old.shape[1:])
        self.block_tables = torch.arange(batch * blocks, dtype=torch.int32, device=self.device).view(batch, blocks)
        # first slot of each row, for the decode-step slot mapping (one add, no arange/where/cast)
        self.row_base = torch.arange(batch, device=self.device).view(batch, 1, 1) * (blocks * self.BLOCK)

    def _store(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, skips: bool = True) -> None:
        """Write ``[B, H, N, D]`` tokens at per-head ``slots`` ``[B, H, N]`` (-1: skip; ``skips``
        False: none is -1, as while generating). The kernel takes int64 slots as well as int32."""
        flat = slots + self.row_base
        if skips:
            flat = torch.where(slots >= 0, flat, -1)
        store_paged(self.layout, keys, values, self.cache, flat)

    def init(self, keys, values, valid, positions, scores=None) -> None:
        b, h, s, _ = keys.shape
        self._allocate(b, s + GROWTH)
        cap = self.cache.shape[0] // b * self.BLOCK
        self.positions = _pad(positions.masked_fill(~valid, -1), cap - s, -1, -1)
        base = torch.zeros_like(positions, dtype=torch.float32) if scores is None else scores.float()
        self.scores = _pad(base, cap - s, -1)
        slots = torch.arange(s, device=keys.device).expand(b, h, s)
        self._store(keys, values, torch.where(valid, slots, -1))
        self.counts = valid.sum(-1)
        if self.tail is not None:
            self.tail.init(keys, values, self.counts)

    def reserve(self, slots: int) -> None:
        """Make room for ``slots`` token slots per row (whole blocks, ``GROWTH`` more when it has
        to grow): the pages, positions and scores are reallocated only here, so tensors read by a
        captured CUDA graph stay where they are while the capacity suffices."""
        if slots <= self.capacity:
            return
        b = self.positions.shape[0]
        self._allocate(b, slots + GROWTH)
        extra = self.cache.shape[0] // b * self.BLOCK - self.positions.shape[-1]
        self.positions, self.scores = _pad(self.positions, extra, -1, -1), _pad(self.scores, extra, -1)

    def write(self, keys, values, slots, positions, scores, top: int | None = None, added=None) -> None:
        """As :meth:`SlotStore.write` (``top``, ``added``, ``scores`` None likewise). The counts
        change in place (a CUDA graph of the step keeps reading the same tensor)."""
        if top is None:
            top = int(slots.max()) + 1 if slots.numel() else 0
        self.reserve(top)
        self._store(keys, values, slots, skips=False)
        if self.tail is not None:  # appends only: a residual window and eviction are refused together
            self.tail.write(keys, values, slots)
        self.positions.scatter_(-1, slots, positions)
        if scores is not None:
            self.scores.scatter_(-1, slots, scores)
        if added is None:
            self.counts.copy_((self.positions >= 0).sum(-1))
        else:
            self.counts.add_(added)

    def decode(self):
        k, v = read_paged(self.layout, self.cache, self.block_tables, self.capacity, self.read_dtype)
        filled = self.positions >= 0
        # slots never written hold whatever the allocation held: zero them, since a masked-out NaN
        # value still poisons the attention output (0 * NaN)
        empty = ~filled[..., None]
        k, v = k.masked_fill(empty, 0), v.masked_fill(empty, 0)
        if self.tail is not None:
            self.tail.overwrite(k, v, self.counts)
        return k, v, filled

    def attend_one(self, queries: torch.Tensor, scale: float) -> torch.Tensor:
        """Decode attention of one query per sequence ``[B, Hq, D]`` straight from the codes
        (with a residual window: the older tokens' codes, and the window's tokens densely, in one
        softmax)."""
        if self.tail is None:
            return attend_paged_one(self.layout, queries, self.cache, self.block_tables, self.counts, scale)
        n = self.tail.n  # while a head holds fewer than n tokens, its entries 0 .. count - 1 are its slots
        older, recent = (self.counts - n).clamp_min(0), self.counts.clamp_max(n)
        return attend_paged_one(self.layout, queries, self.cache, self.block_tables, older, scale,
                                tail=(self.tail.keys, self.tail.values, recent))

    def attend_scored(self, queries: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`attend_one` (no residual window) and the step's attention per slot as
        decode-time eviction reads it (:func:`kvplug.attention.step_probs` of the logits the
        kernel wrote while attending: no second pass over the codes; slots past a head's count,
        never written, are masked)."""
        from kvplug.attention import step_probs

        b, hq, _ = queries.shape
        logits = torch.empty(b, hq, self.capacity, dtype=torch.float32, device=queries.device)
        out = attend_paged_one(self.layout, queries, self.cache, self.block_tables, self.counts, scale, logits=logits)
        return out, step_probs(logits, self.layout.num_kv_heads, self.positions >= 0)

    def used_slots(self) -> int:
        """Token slots per row the blocks hold: the longest head's count in whole blocks (a block
        holds every head; rows are padded to the longest); blocks allocated ahead are not counted."""
        if self.counts is None:
            return 0
        return -(-int(self.counts.max()) // self.BLOCK) * self.BLOCK

    def stored_bytes(self) -> int:
        """Bytes of the blocks that hold tokens, padding included (:meth:`used_slots`), and of a
        residual window's full-precision tokens (its tokens' codes are in the blocks as well)."""
        if self.counts is None:
            return 0
        tail = 0 if self.tail is None else self.tail.stored_bytes()
        return self.counts.shape[0] * self.used_slots() * self.layout.bytes_per_token() + tail

    def bookkeeping_bytes(self) -> int:
        """Bytes of the per-slot positions and scores (one per head and slot)."""
        if self.counts is None:
            return 0
        return (self.positions.element_size() + self.scores.element_size()) * self.counts.numel() * self.used_slots()
