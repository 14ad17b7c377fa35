"""A compressed prefix as bytes: tensors and a described header, never code.

The format is safetensors (a JSON header, then raw little-endian buffers; loading parses the header
and copies bytes, and nothing in a file can run), with kvplug's own metadata in that header:

- ``format``: ``kvplug-kv``, ``version``: :data:`VERSION` (a blob of another version is refused);
- ``facts``: a JSON object describing what the blob fits: the model shape (layers, KV heads,
  head_dim, dtype), the strategy, tokens seen; a loader compares it with what it expects and
  refuses a mismatch in one line;
- ``state``: a JSON object of the non-tensor state an adapter needs to rebuild its cache;
- ``sha256``: a digest of every tensor (name, dtype, shape, bytes, in name order) and of
  ``facts`` and ``state``, so a truncated or altered blob is refused.

Tensors in, tensors out: adapters decide what the tensors are (a codec's codes and scales,
positions, scores) and name them.
"""

from __future__ import annotations

import hashlib
import json

import torch

from kvplug.errors import SpecError

FORMAT = "kvplug-kv"
VERSION = 1


def _digest(tensors: dict[str, torch.Tensor], facts: str, state: str) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(facts.encode())
    h.update(state.encode())
    return h.hexdigest()


def dumps(tensors: dict[str, torch.Tensor], facts: dict, state: dict) -> bytes:
    """The blob of ``tensors`` (any device; stored as they are, on the CPU), ``facts`` (what the
    blob fits, compared on load) and ``state`` (JSON-able)."""
    from safetensors.torch import save

    host = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    facts_text, state_text = json.dumps(facts, sort_keys=True), json.dumps(state, sort_keys=True)
    meta = {"format": FORMAT, "version": str(VERSION), "facts": facts_text, "state": state_text,
            "sha256": _digest(host, facts_text, state_text)}
    return save(host, metadata=meta)


def loads(blob: bytes, expect: dict | None = None, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """``(tensors, facts, state)`` of a blob from :func:`dumps`; a one-line :class:`SpecError`
    for anything else (not a kvplug blob, another version, damaged, or ``facts`` that differ
    from ``expect`` in a key ``expect`` names). ``verify=False`` skips the checksum, for a blob
    this process made and kept in memory (the header is still checked; nothing can run either way)."""
    from safetensors.torch import load

    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise SpecError(f"a kvplug KV blob is bytes, got {type(blob).__name__}")
    data = bytes(blob)  # one copy for a bytearray or memoryview (none for bytes)
    try:
        meta = _metadata(data)
        tensors = load(data)
    except SpecError:
        raise
    except Exception as e:  # safetensors' own parse errors: not one of ours, or damaged
        raise SpecError(f"not a readable kvplug KV blob ({type(e).__name__}: {str(e)[:80]})") from None
    if meta.get("format") != FORMAT:
        raise SpecError(f"not a kvplug KV blob (format {meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("version") != str(VERSION):
        raise SpecError(f"kvplug KV blob version {meta.get('version')} cannot be read by this kvplug (reads "
                        f"version {VERSION})")
    if verify and _digest(tensors, meta.get("facts", ""), meta.get("state", "")) != meta.get("sha256"):
        raise SpecError("kvplug KV blob is damaged: its checksum does not match its contents")
    facts, state = json.loads(meta["facts"]), json.loads(meta["state"])
    for key, want in (expect or {}).items():
        if facts.get(key) != want:
            raise SpecError(f"kvplug KV blob was made for {key}={facts.get(key)!r}, this cache has {want!r}")
    return tensors, facts, state


def _metadata(blob: bytes) -> dict:
    """The safetensors header's ``__metadata__`` (length-prefixed JSON, read without loading)."""
    if len(blob) < 8:
        raise SpecError("not a kvplug KV blob (shorter than a header)")
    n = int.from_bytes(blob[:8], "little")
    if n > len(blob) - 8:
        raise SpecError("kvplug KV blob is damaged: truncated header")
    try:
        header = json.loads(blob[8:8 + n])
    except ValueError:
        raise SpecError("not a kvplug KV blob (its header is not JSON)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise SpecError("not a kvplug KV blob (no kvplug metadata)")
    return meta
