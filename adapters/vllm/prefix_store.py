"""What :mod:`.connector` keeps in host memory, without vLLM: block keys, the LRU index, the blocks.

Pure PyTorch and the standard library, so it is unit-tested without an engine.

* :func:`block_keys`: a request's full blocks named by their tokens and everything before them
  (a chain: key ``j`` digests key ``j - 1`` and block ``j``'s token ids), so a key names a block's
  K/V exactly when the pages depend on the tokens only, as kvplug's pages do without eviction.
* :class:`HostIndex` (scheduler side): which keys are stored, their bytes, least recently used
  first; decides what each step stores and drops within a byte budget, and how many tokens of a
  request a hit covers.
* :class:`HostBlocks` (worker side): the blocks themselves, per layer, as the pages hold them
  (kvplug's compressed pages are copied byte for byte: no re-quantization), or, for vLLM's own
  floating-point pages, encoded by a kvplug codec on save and decoded on load.
"""

from __future__ import annotations

import hashlib
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
    to host memory after the forward pass (``stores``), keys to forget (``drops``). Loads run
    before the forward pass, stores and drops after it, so a key dropped in a step can still be
    loaded in it."""

    loads: list[tuple[int, bytes]] = field(default_factory=list)
    stores: list[tuple[int, bytes]] = field(default_factory=list)
    drops: list[bytes] = field(default_factory=list)


class HostIndex:
    """The scheduler's view of host memory: stored keys, least recently used first, each costing
    ``block_bytes``; at most ``capacity_bytes`` in all."""

    def __init__(self, block_bytes: int, capacity_bytes: int):
        if block_bytes <= 0:
            raise SpecError(f"kvplug connector: a block must take bytes, got {block_bytes}")
        self.block_bytes = int(block_bytes)
        self.capacity = int(capacity_bytes) // self.block_bytes
        self._keys: OrderedDict[bytes, None] = OrderedDict()
        self.stored = self.dropped = self.hits = 0

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
            del self._keys[victim]
            plan.drops.append(victim)
            self.dropped += 1
        self._keys[key] = None
        plan.stores.append((block_id, key))
        self.stored += 1
        return True


class HostBlocks:
    """The stored blocks (worker side): for each key, the block of every layer in one host tensor
    ``[layers, ...]`` as the cache holds it, or encoded. ``codec`` (a kvplug codec of one token at
    a time, or None) encodes vLLM's own floating-point pages on save, row by row: the last axis of a
    page holds a token-head's K then its V (``2 * head_size`` values, vLLM's ``[blocks, heads,
    block_size, 2 * head_size]``)."""

    def __init__(self, codec=None, head_size: int | None = None):
        if codec is not None and (codec.token_group != 1 or codec.residual):
            raise SpecError(f"kvplug connector: codec {codec} encodes tokens in groups or keeps a residual; "
                            f"the connector stores blocks with a codec of one token at a time (int8, int4, ...)")
        if codec is not None:
            if head_size is None:
                raise SpecError("kvplug connector: a codec needs the layers' head_size")
            codec.check_head_dim(head_size)
        self.codec, self.head_size = codec, head_size
        self._blocks: dict[bytes, object] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def put(self, keys: list[bytes], blocks: torch.Tensor) -> None:
        """Keep the blocks ``keys`` name: ``blocks`` ``[layers, len(keys), ...]`` as the caches hold
        them, on any device (encoded there, then copied here in one transfer)."""
        fresh = [i for i, key in enumerate(keys) if key not in self._blocks]
        if not fresh:
            return
        x = blocks.detach()
        if len(fresh) < len(keys):
            x = x[:, torch.tensor(fresh, device=x.device)]
        for i, stored in zip(fresh, self._encode(x)):
            self._blocks[keys[i]] = stored
            self.bytes += _nbytes(stored)

    def get(self, keys: list[bytes], like: torch.Tensor) -> torch.Tensor:
        """The blocks ``keys`` name, ``[layers, len(keys), ...]`` with ``like``'s block shape (its
        axes after the first two), dtype and device (decoded there)."""
        return self._decode([self._blocks[key] for key in keys], like)

    def drop(self, key: bytes) -> None:
        stored = self._blocks.pop(key, None)
        if stored is not None:
            self.bytes -= _nbytes(stored)

    def _encode(self, x: torch.Tensor) -> list:
        """Blocks ``x`` ``[layers, n, ...]`` -> n stored forms (host tensors of their own)."""
        if self.codec is None:
            return [t.clone() for t in x.cpu().unbind(1)]
        d = self.head_size
        if x.shape[-1] != 2 * d or not x.dtype.is_floating_point:
            raise SpecError(f"kvplug connector: codec {self.codec} needs vLLM's own floating-point pages with K "
                            f"and V on the last axis (2 x {d}); these blocks are {tuple(x.shape[2:])} {x.dtype}")
        rows = x.transpose(0, 1).reshape(x.shape[1], -1, 2 * d).float()  # [n, layers * heads * tokens, 2d]
        k, v = self.codec.encode(rows[..., :d], "key"), self.codec.encode(rows[..., d:], "value")
        k, v = ({f: t.cpu() for f, t in enc.items()} for enc in (k, v))
        return [({f: t[i].clone() for f, t in k.items()}, {f: t[i].clone() for f, t in v.items()})
                for i in range(x.shape[1])]

    def _decode(self, stored: list, like: torch.Tensor) -> torch.Tensor:
        layers, n = like.shape[0], len(stored)
        if self.codec is None:
            return torch.stack(stored, dim=1).to(like.device, non_blocking=True)
        k, v = ({f: torch.stack([s[j][f] for s in stored]).to(like.device) for f in stored[0][j]} for j in (0, 1))
        k, v = self.codec.decode(k, "key", torch.float32), self.codec.decode(v, "value", torch.float32)
        out = torch.cat([k, v], dim=-1).reshape(n, layers, *like.shape[2:])
        return out.transpose(0, 1).to(like.dtype)


def _nbytes(stored) -> int:
    if isinstance(stored, torch.Tensor):
        return stored.numel() * stored.element_size()
    return sum(t.numel() * t.element_size() for enc in stored for t in enc.values())


def check_blocks_first(shape: tuple[int, ...], num_blocks: int) -> None:
    """A layer's cache must count blocks on its first axis (kvplug's pages and vLLM's own
    ``[blocks, heads, block_size, 2 * head_size]`` do, in 0.26 and 0.32); a one-line error otherwise."""
    if not shape or shape[0] != num_blocks:
        raise SpecError(f"kvplug connector: a KV cache of shape {tuple(shape)} does not count its {num_blocks} "
                        f"blocks on the first axis, as the connector expects")
