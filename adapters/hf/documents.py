"""Reuse of documents' compressed KV across prompts (RAGCache's knowledge tree), in HF.

RAGCache (Jin et al., "RAGCache: Efficient Knowledge Caching for Retrieval-Augmented Generation",
arXiv 2404.12457): the KV of a retrieved document depends on the documents before it, so KV is
cached per *ordered prefix of documents* in a tree (a node per document, its path the documents
before it). A prompt made of documents and a question reuses the longest cached path and computes
only the rest. Nodes beyond the memory budget are replaced by PGDSF (prefix-aware greedy dual
size frequency: priority = clock + frequency x cost / size, leaves first, so a node outlives the
paths that need it) or LRU, and go to a disk tier when one is given.

Here each node holds the blob (:mod:`.persist`) of the cache after its path, compressed by the
store's strategy. The first document is the cache's prompt; later documents and the question
extend it as multi-token steps over the stored (compressed) K/V, so a hit and a cold run compute
the same thing. Strategies that evict are refused: what they keep depends on the whole prompt.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvplug.config import resolve
from kvplug.errors import SpecError


@dataclass(eq=False)
class _Node:
    key: tuple[int, ...]  # this document's tokens
    parent: _Node | None
    children: dict = field(default_factory=dict)
    blob: bytes | None = None  # in memory
    path: Path | None = None  # on disk
    tokens: int = 0  # the path's tokens (the recompute a hit saves)
    frequency: int = 0
    priority: float = 0.0
    last: int = 0


class DocumentStore:
    """Compressed KV of document prefixes for ``model``, under ``spec`` (a codec, no eviction),
    within ``memory_bytes`` of blobs in host memory and, past that, ``disk`` (a folder) if given.
    ``policy``: ``pgdsf`` (RAGCache's) or ``lru``."""

    def __init__(self, model, spec="int8", memory_bytes: int = 1 << 30, disk: str | Path | None = None,
                 policy: str = "pgdsf"):
        strategy = resolve(spec)
        if strategy.scorer is not None or strategy.merger is not None or strategy.placement is not None:
            raise SpecError(f"kvplug.hf.DocumentStore keeps codecs only: a document's KV must not depend on what "
                            f"follows it; got {strategy}")
        if policy not in ("pgdsf", "lru"):
            raise SpecError(f"DocumentStore: policy={policy!r}; allowed: pgdsf | lru")
        self.model, self.strategy, self.memory_bytes, self.policy = model, strategy, memory_bytes, policy
        self.disk = None if disk is None else Path(disk)
        if self.disk is not None:
            self.disk.mkdir(parents=True, exist_ok=True)
        self.root = _Node(key=(), parent=None)
        self.clock, self.tick = 0.0, 0
        self.stats = {"hits": 0, "misses": 0, "reused_tokens": 0, "computed_tokens": 0, "to_disk": 0, "dropped": 0}

    # public -----------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, documents: list[list[int]], question: list[int]):
        """Run one prompt (``documents`` then ``question``, token ids; batch 1) reusing the longest
        cached prefix of documents; returns ``(cache, logits of the last position)``. Every
        document prefix computed on the way is stored."""
        import kvplug.hf

        if not documents:
            raise SpecError("DocumentStore.prefill needs at least one document")
        node, done = self.root, 0  # the longest cached path: its last node and its length
        for doc in documents:
            child = node.children.get(tuple(doc))
            if child is None or (child.blob is None and child.path is None):
                break
            node, done = child, done + 1
        device = next(self.model.parameters()).device
        if done:  # a blob made here and kept in memory needs no checksum; one from disk does
            from_disk = node.blob is None
            cache = kvplug.hf.load(self.model, self._read(node), verify=from_disk)
            self._touch(node)
            self.stats["hits"] += 1
            self.stats["reused_tokens"] += node.tokens
        else:
            cache = kvplug.hf.cache(self.model, self.strategy)
            self.stats["misses"] += 1
        for doc in documents[done:]:  # only the last position's logits are needed, and only the question's
            ids = torch.tensor([doc], device=device)
            self.model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
            self.stats["computed_tokens"] += ids.shape[1]
            node = self._child(node, tuple(doc))
            node.tokens = cache.get_seq_length()
            node.blob, node.path = cache.to_bytes(self.model), None
            self._touch(node)
        ids = torch.tensor([question], device=device)
        logits = self.model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits[:, -1]
        self.stats["computed_tokens"] += ids.shape[1]
        self._fit()
        return cache, logits

    def memory_used(self) -> int:
        """Bytes of the blobs held in host memory."""
        return sum(len(n.blob) for n in self._nodes() if n.blob is not None)

    # bookkeeping ------------------------------------------------------------------------------
    def _child(self, node: _Node, key: tuple[int, ...]) -> _Node:
        if key not in node.children:
            node.children[key] = _Node(key=key, parent=node)
        return node.children[key]

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _touch(self, node: _Node) -> None:
        self.tick += 1
        node.frequency += 1
        node.last = self.tick
        size = len(node.blob) if node.blob is not None else max(1, node.path.stat().st_size)
        node.priority = self.clock + node.frequency * node.tokens / size  # PGDSF: cost = tokens recomputed

    def _read(self, node: _Node) -> bytes:
        if node.blob is None:  # promoted from disk
            node.blob = node.path.read_bytes()
        return node.blob

    def _fit(self) -> None:
        """Replace blobs until the memory budget holds: leaves first (a node's descendants need
        it), lowest priority (PGDSF) or least recently used first; to disk when there is one."""
        while self.memory_used() > self.memory_bytes:
            held = [n for n in self._nodes() if n.blob is not None]
            leaves = [n for n in held if not any(c.blob is not None for c in n.children.values())] or held
            victim = min(leaves, key=(lambda n: n.priority) if self.policy == "pgdsf" else (lambda n: n.last))
            if self.policy == "pgdsf":
                self.clock = victim.priority  # GDSF's aging
            if self.disk is not None:
                name = hashlib.sha256(repr(self._path_keys(victim)).encode()).hexdigest()[:32] + ".kvplug"
                victim.path = self.disk / name
                victim.path.write_bytes(victim.blob)
                self.stats["to_disk"] += 1
            else:
                self.stats["dropped"] += 1
            victim.blob = None

    def _path_keys(self, node: _Node) -> list[tuple[int, ...]]:
        keys = []
        while node.parent is not None:
            keys.append(node.key)
            node = node.parent
        return keys[::-1]
