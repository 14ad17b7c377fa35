"""The prompt K/V of a layer pair merged by a kvplug merger (MiniCache), stored once for both.

Per role (key, value): the shared direction encoded with the strategy's codec, each layer's
norms, and each layer's retained tokens (their original vectors, compact per
head, with their indices). A layer reads back its own K/V with :meth:`MergedStore.decode`.
"""

from __future__ import annotations

import torch

from kvplug.codecs.base import Codec
from kvplug.codecs.none import NoCodec
from kvplug.mergers.base import Merged, Merger
from kvplug.strategy import Selection

from .store import encoded_bytes


class MergedStore:
    """One layer pair's merged prompt tokens ``[B, H, M, D]``; ``dtype``: what :meth:`decode` returns."""

    def __init__(self, merger: Merger, codec: Codec, dtype: torch.dtype):
        self.merger, self.codec, self.dtype = merger, codec, dtype
        # retained originals are single tokens at scattered positions: a grouped codec cannot hold them
        self.own_codec = codec if codec.token_group == 1 else NoCodec()
        self.roles: dict[str, tuple] = {}
        self.plain: dict[str, tuple] | None = None  # role -> (first, second) encoded, when not merged
        self.filled: torch.Tensor | None = None  # [B, H, M]

    def build(self, first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor],
              filled: torch.Tensor) -> None:
        """Merge the two layers' ``(keys, values)`` ``[B, H, M, D]``; ``filled`` ``[B, H, M]`` marks
        real tokens (the same in every head)."""
        self.filled = filled
        store_dtype = first[0].dtype
        # norms: 16-bit beside a quantizing codec (as its scales are), the model's dtype otherwise
        norm_dtype = store_dtype if isinstance(self.codec, NoCodec) else torch.float16
        for i, role in enumerate(("key", "value")):
            a, b = first[i], second[i]
            merged = self.merger.merge(a, b, filled[:, 0])
            direction = self.codec.encode(merged.direction.to(store_dtype), role, filled)
            kept = Selection.from_mask(merged.retained)
            gather = kept.indices[..., None].expand(-1, -1, -1, a.shape[-1])
            own = [self.own_codec.encode(x.gather(2, gather), role, kept.valid()) for x in (a, b)]
            index = kept.indices.to(torch.int32 if a.shape[-2] < 2**31 else torch.int64)
            self.roles[role] = (direction, merged.magnitudes.to(norm_dtype), index, kept.valid(), own)
        slots, d = first[0][..., 0].numel(), first[0].shape[-1]  # both layers' K and V apart, as stored_bytes counts
        plain_bytes = round(self._share() * 2 * slots * self.own_codec.bytes_per_token(d, store_dtype.itemsize))
        if plain_bytes <= self._merged_bytes():  # merging would not be smaller: each layer keeps its own
            self.roles = {}
            self.plain = {role: tuple(self.own_codec.encode(x[i].to(store_dtype), role, filled)
                                      for x in (first, second)) for i, role in enumerate(("key", "value"))}

    @property
    def is_merged(self) -> bool:
        """Whether the pair shares directions (False: merging would not have been smaller, so each
        layer holds its own K/V here, encoded with the codec)."""
        return self.plain is None

    def decode(self, which: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer ``which`` (0: first of the pair, 1: second): ``(keys, values, filled)``."""
        if self.plain is not None:
            return (*(self.own_codec.decode(self.plain[role][which], role, self.dtype) for role in ("key", "value")),
                    self.filled)
        out = []
        for role in ("key", "value"):
            direction, magnitudes, index, valid, own = self.roles[role]
            shared = self.codec.decode(direction, role, torch.float32)
            original = self.own_codec.decode(own[which], role, torch.float32) * valid[..., None]
            index = index.long()
            put = torch.zeros_like(shared).scatter_add_(2, index[..., None].expand_as(original), original)
            retained = torch.zeros_like(shared[..., 0]).scatter_add_(-1, index, valid.float()) > 0
            merged = Merged(direction=shared, magnitudes=magnitudes.float(), retained=retained)
            out.append(merged.restore(which, put).to(self.dtype))
        return out[0], out[1], self.filled

    def stored_bytes(self) -> int:
        """Bytes held for both layers (real tokens only, as the other stores count)."""
        if self.plain is not None:
            return round(self._share() * sum(encoded_bytes(e) for pair in self.plain.values() for e in pair))
        return self._merged_bytes()

    def _share(self) -> float:
        """Share of the pair's slots that hold real tokens (a shorter row's are padding)."""
        return float(self.filled.float().mean()) if self.filled.numel() else 0.0

    def _merged_bytes(self) -> int:
        total = 0
        share = self._share()
        for direction, magnitudes, index, valid, own in self.roles.values():
            total += share * (encoded_bytes(direction) + magnitudes.numel() * magnitudes.element_size())
            per_kept = (index.element_size() + sum(encoded_bytes(e) for e in own) / max(1, index.numel()))
            total += per_kept * int(valid.sum())
        return round(total)

    def retained_share(self) -> float:
        """Share of real tokens kept unmerged, over K and V (1 for a pair left unmerged)."""
        if self.plain is not None:
            return 1.0
        kept = sum(int(valid.sum()) for *_, valid, _ in self.roles.values())
        return kept / max(1, 2 * int(self.filled.sum()))
