"""What :mod:`.connector` keeps in host memory, without vLLM: block keys, the LRU index, the blocks.

Pure PyTorch and the standard library, so it is unit-tested without an engine.

* :func:`block_keys`: a request's full blocks named by their tokens and everything before them
  (a chain: key ``j`` digests key ``j - 1`` and block ``j``'s token ids), so a key names a block's
  K/V exactly when the pages depend on the tokens only, as kvplug's pages do without eviction.
* :class:`HostIndex` (scheduler side): which keys are stored, their bytes, least recently used
  first; decides what each step stores and drops within a byte budget, and how many tokens of a
  request a hit covers.
* :class:`HostPool` (worker side): the blocks themselves as the pages hold them, every layer's
  block of a key in one slot (kvplug's compressed pages are copied byte for byte: no
  re-quantization); :class:`HostBlocks`: for vLLM's own floating-point pages, encoded by a kvplug
  codec on save and decoded on load.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from kvplug.errors import SpecError

KEY_BYTES = 16


def block_keys(tokens, block_size: int, namespace: bytes, start: list[bytes] | None = None) -> list[bytes]:
    """Keys of the full blocks of ``tokens`` (``len(tokens) // block_size`` of them), each the
    first :data:`KEY_BYTES` of a SHA-256 over the previous key (``namespace`` for the first) and
    the block's token ids as little-endian int64. ``start``: keys already computed for a prefix
    of ``tokens`` (extended, not recomputed)."""
    keys = list(start or [])
    first, full = len(keys), len(tokens) // block_size
    if full <= first:
        return keys
    data = np.asarray(tokens[first * block_size:full * block_size], dtype="<i8").tobytes()
    step = 8 * block_size
    for j in range(full - first):
        prev = keys[-1] if keys else namespace
        keys.append(hashlib.sha256(prev + data[j * step:(j + 1) * step]).digest()[:KEY_BYTES])
    return keys


@dataclass
class Plan:
    """One step's work for the worker: blocks to fill from host memory (``loads``), blocks to copy
    to host memory after the forward pass (``stores``), keys to forget (``drops``); each load and
    store as (GPU block id, key, host slot), each drop as (key, slot). Loads run before the forward
    pass, drops then stores after it, so a key dropped in a step (its slot taken by a store) can
    still be loaded in it."""

    loads: list[tuple[int, bytes, int]] = field(default_factory=list)
    stores: list[tuple[int, bytes, int]] = field(default_factory=list)
    drops: list[tuple[bytes, int]] = field(default_factory=list)


class HostIndex:
    """The scheduler's view of host memory: stored keys, least recently used first, each costing
    ``block_bytes`` and holding a slot (``0 .. capacity - 1``, the lowest free one, so that a
    step's stores mostly take consecutive slots); at most ``capacity_bytes`` in all."""

    def __init__(self, block_bytes: int, capacity_bytes: int):
        if block_bytes <= 0:
            raise SpecError(f"kvplug connector: a block must take bytes, got {block_bytes}")
        self.block_bytes = int(block_bytes)
        self.capacity = int(capacity_bytes) // self.block_bytes
        self._keys: OrderedDict[bytes, int] = OrderedDict()
        self._free: list[int] = []  # freed slots (a heap)
        self._fresh = 0  # slots never used: _fresh .. capacity - 1
        self.stored = self.dropped = self.hits = 0

    def slot(self, key: bytes) -> int:
        return self._keys[key]

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: bytes) -> bool:
        return key in self._keys

    @property
    def used_bytes(self) -> int:
        return len(self._keys) * self.block_bytes

    def hit(self, keys: list[bytes], first: int) -> int:
        """How many of ``keys[first:]`` are stored, counted from ``first`` without a gap."""
        n = 0
        for key in keys[first:]:
            if key not in self._keys:
                break
            n += 1
        return n

    def touch(self, keys) -> None:
        """Mark ``keys`` (those stored) as just used."""
        for key in keys:
            if key in self._keys:
                self._keys.move_to_end(key)

    def add(self, key: bytes, plan: Plan, block_id: int, pinned: set[bytes]) -> bool:
        """Plan storing ``key`` (the block ``block_id`` holds), dropping least recently used keys
        outside ``pinned`` to make room; False (nothing planned) when no room can be made."""
        if key in self._keys:
            self._keys.move_to_end(key)
            return True
        while len(self._keys) >= self.capacity:
            victim = next((k for k in self._keys if k not in pinned), None)
            if victim is None:
                return False
            freed = self._keys.pop(victim)
            heapq.heappush(self._free, freed)
            plan.drops.append((victim, freed))
            self.dropped += 1
        if self._free:
            slot = heapq.heappop(self._free)
        else:
            slot, self._fresh = self._fresh, self._fresh + 1
        self._keys[key] = slot
        plan.stores.append((block_id, key, slot))
        self.stored += 1
        return True


class HostPool:
    """The stored blocks as vLLM's pages hold them (worker side), byte for byte, in host memory
    ``[slots, layers, *block]``: pinned when the caches are on a GPU, allocated ``chunk`` slots at
    a time as slots are first used. A step's stores and loads move runs of consecutive slots in one
    copy each, asynchronously on the current stream (ordered with the attention that reads the
    loaded blocks and with the next step's loads; the host never reads the pool)."""

    CHUNK_BYTES = 256 << 20

    def __init__(self, slots: int, layers: int, block_shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device):
        self.slots, self.layers, self.block_shape, self.dtype, self.device = slots, layers, block_shape, dtype, device
        self.slot_bytes = layers * math.prod(block_shape) * torch.empty(0, dtype=dtype).element_size()
        self.chunk = max(1, self.CHUNK_BYTES // self.slot_bytes)
        self._chunks: list[torch.Tensor | None] = [None] * -(-slots // self.chunk)
        self.used: set[int] = set()

    @property
    def bytes(self) -> int:
        return len(self.used) * self.slot_bytes

    @property
    def allocated_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self._chunks if c is not None)

    def __len__(self) -> int:
        return len(self.used)

    def _runs(self, slots: list[int]):
        """(position in ``slots``, chunk tensor, offset, length) of each run of consecutive slots in one chunk."""
        i = 0
        while i < len(slots):
            c, o = divmod(slots[i], self.chunk)
            k = 1
            while i + k < len(slots) and slots[i + k] == slots[i] + k and (o + k) < self.chunk:
                k += 1
            yield i, self._chunk(c), o, k
            i += k

    def _chunk(self, c: int) -> torch.Tensor:
        if self._chunks[c] is None:
            n = min(self.chunk, self.slots - c * self.chunk)
            pin = self.device.type == "cuda"
            self._chunks[c] = torch.empty((n, self.layers, *self.block_shape), dtype=self.dtype, pin_memory=pin)
        return self._chunks[c]

    def put(self, slots: list[int], blocks: torch.Tensor) -> None:
        """Copy ``blocks`` ``[len(slots), layers, *block]`` (on the caches' device) into ``slots``."""
        for i, chunk, o, k in self._runs(slots):
            chunk[o:o + k].copy_(blocks[i:i + k], non_blocking=True)
        self.used.update(slots)

    def get(self, slots: list[int]) -> torch.Tensor:
        """The blocks in ``slots``, ``[len(slots), layers, *block]`` on the caches' device."""
        out = torch.empty((len(slots), self.layers, *self.block_shape), dtype=self.dtype, device=self.device)
        for i, chunk, o, k in self._runs(slots):
            out[i:i + k].copy_(chunk[o:o + k], non_blocking=True)
        return out

    def drop(self, slot: int) -> None:
        self.used.discard(slot)


class HostBlocks:
    """The stored blocks encoded by a kvplug codec (worker side, vLLM's own floating-point pages):
    for each key, the K and V of every layer's block, encoded row by row (a row: one token-head;
    the last axis of vLLM's page ``[blocks, heads, block_size, 2 * head_size]`` holds its K then
    its V). ``codec``: one token at a time (``token_group`` 1, no residual)."""

    def __init__(self, codec, head_size: int | None):
        if not codec.per_token:
            raise SpecError(f"kvplug connector: codec {codec} encodes tokens in groups or keeps a residual; "
                            f"the connector stores blocks with a codec of one token at a time (int8, int4, ...)")
        if head_size is None:
            raise SpecError("kvplug connector: a codec needs the layers' head_size")
        codec.check_head_dim(head_size)
        self.codec, self.head_size = codec, head_size
        self._blocks: dict[bytes, tuple] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def put(self, keys: list[bytes], blocks: torch.Tensor) -> None:
        """Keep the blocks ``keys`` name: ``blocks`` ``[len(keys), layers, *block]`` as the caches
        hold them, on any device (encoded there, then copied here in one transfer per field)."""
        fresh = [i for i, key in enumerate(keys) if key not in self._blocks]
        if not fresh:
            return
        x = blocks.detach()
        if len(fresh) < len(keys):
            x = x[torch.tensor(fresh, device=x.device)]
        d = self.head_size
        if x.shape[-1] != 2 * d or not x.dtype.is_floating_point:
            raise SpecError(f"kvplug connector: codec {self.codec} needs vLLM's own floating-point pages with K "
                            f"and V on the last axis (2 x {d}); these blocks are {tuple(x.shape[2:])} {x.dtype}")
        rows = x.reshape(x.shape[0], -1, 2 * d).float()  # [n, layers * heads * tokens, K|V]
        k, v = (self.codec.encode(rows[..., half], role) for half, role in ((slice(0, d), "key"),
                                                                             (slice(d, 2 * d), "value")))
        k, v = ({f: t.cpu() for f, t in enc.items()} for enc in (k, v))
        for j, i in enumerate(fresh):
            stored = ({f: t[j].clone() for f, t in k.items()}, {f: t[j].clone() for f, t in v.items()})
            self._blocks[keys[i]] = stored
            self.bytes += _nbytes(stored)

    def get(self, keys: list[bytes], like: torch.Tensor) -> torch.Tensor:
        """The blocks ``keys`` name, ``[len(keys), *like.shape[1:]]`` in ``like``'s dtype and on its
        device (decoded there)."""
        stored = [self._blocks[key] for key in keys]
        k, v = ({f: torch.stack([s[j][f] for s in stored]).to(like.device) for f in stored[0][j]} for j in (0, 1))
        k, v = self.codec.decode(k, "key", torch.float32), self.codec.decode(v, "value", torch.float32)
        return torch.cat([k, v], dim=-1).reshape(len(keys), *like.shape[1:]).to(like.dtype)

    def drop(self, key: bytes) -> None:
        stored = self._blocks.pop(key, None)
        if stored is not None:
            self.bytes -= _nbytes(stored)


def _nbytes(stored) -> int:
    return sum(t.numel() * t.element_size() for enc in stored for t in enc.values())


def check_blocks_first(shape: tuple[int, ...], num_blocks: int) -> None:
    """A layer's cache must count blocks on its first axis (kvplug's pages and vLLM's own
    ``[blocks, heads, block_size, 2 * head_size]`` do, in 0.26 and 0.32); a one-line error otherwise."""
    if not shape or shape[0] != num_blocks:
        raise SpecError(f"kvplug connector: a KV cache of shape {tuple(shape)} does not count its {num_blocks} "
                        f"blocks on the first axis, as the connector expects")
