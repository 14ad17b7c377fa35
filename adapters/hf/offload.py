"""The HF cache layer of a placement part: K/V in host memory, a few tokens fetched per step (InfiniGen).

:class:`OffloadLayer` keeps every token of its layer in host memory, pinned when the model runs on
CUDA, and on the accelerator only the placement's partial keys (a few skewed columns per token)
and, transiently, the tokens fetched for one step. Two forms of the host copy:

- :class:`PagedOffload` (fp16/bf16 models, codecs the paged kernels read; the default on CUDA):
  the paged layout's token rows. :func:`kvplug.triton_ops.copy_token_rows` copies the chosen
  rows straight into small paged caches (read over the bus, no host-side gather), and the decode
  kernel reads them in place; a step's new token is quantized into those pages and written back
  from there.
- :class:`HostStore` (any per-token codec and dtype, e.g. float32 models on the CPU): the codec's
  fields, gathered by :func:`kvplug.triton_ops.gather_rows` and attended with SDPA.

Which tokens: :meth:`kvplug.placements.infinigen.InfiniGen.speculate` over the partial keys. With
``ahead`` (InfiniGen's scheme) layer ``i + 1``'s choice is made from layer ``i``'s input (the
residual stream, through layer ``i + 1``'s own norm and query projection) before layer ``i`` runs
(:meth:`ModelView.install` hooks every decoder layer; the cache's ``before_layer``), and on CUDA
the copy runs on a side stream, overlapping layer ``i``'s compute. A layer with no prediction
(``ahead=false``, or its hook did not run) chooses from its own query when it attends. Layers the
placement does not place (``dense_layers``) are ordinary kvplug layers. The prompt's own attention
is exact (the model's SDPA over the raw prompt); each step's new tokens are stored like the rest
and attended as stored. Two sets of fetch buffers are shared by all layers (layer ``i`` fills one
while layer ``i - 1`` reads the other), so the accelerator holds two layers' fetched tokens at most.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvplug.codecs.base import Codec, Encoded
from kvplug.rope import rotate_half
from kvplug.strategy import Strategy

from .contract import PromptFirstLayer
from .store import PagedStore, attend_paged_one, encoded_bytes, read_dtype, read_paged, store_paged

HOST_GROWTH = 1024  # token slots added at once to a host store (pinned allocations are slow)
DEVICE_GROWTH = 256  # token slots added at once to the partial keys
FETCH_GROWTH = 64  # the fetch buffers hold a multiple of this many tokens


def _grown(t: torch.Tensor, slots: int) -> torch.Tensor:
    """``t`` ``[B, H, S, ...]`` copied into a zeroed tensor of ``slots`` token slots."""
    out = t.new_zeros((*t.shape[:2], slots, *t.shape[3:]))
    out[:, :, :t.shape[2]] = t
    return out


class ModelView:
    """What offloading layers read from the model: each decoder layer's attention module (query
    projection, optional per-head query norm, softmax scale) and input norm, and the skews already
    computed for it. One per model (:meth:`of`), so a skew is computed once per model and reused
    by every cache."""

    _views: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, model):
        self.attention: dict[int, torch.nn.Module] = {}
        self.norm: dict[int, torch.nn.Module] = {}  # the layer's input norm (before its attention)
        self.decoder: dict[int, torch.nn.Module] = {}
        for module in model.modules():
            attn = getattr(module, "self_attn", None)
            if attn is not None and hasattr(attn, "q_proj") and isinstance(getattr(attn, "layer_idx", None), int) \
                    and hasattr(module, "input_layernorm"):
                i = attn.layer_idx
                self.attention[i], self.norm[i], self.decoder[i] = attn, module.input_layernorm, module
        self.skews: dict[tuple[int, int], torch.Tensor] = {}  # (layer, columns) -> [Hkv, D, r]
        self.hooked = False

    @classmethod
    def of(cls, model) -> ModelView:
        view = cls._views.get(model)
        if view is None:
            view = cls._views[model] = cls(model)
        return view

    def install(self) -> None:
        """Hook every decoder layer so a kvplug cache sees the layer's input (the residual stream,
        before the layer's norm) before it runs; a no-op for any other cache, and for kvplug
        caches without a placement."""
        if self.hooked:
            return
        for i, module in self.decoder.items():
            module.register_forward_pre_hook(functools.partial(_before_layer, i), with_kwargs=True)
        self.hooked = True

    def query(self, layer: int, residual: torch.Tensor, position_embeddings) -> torch.Tensor:
        """Layer ``layer``'s queries ``[B, Hq, T, D]`` (RoPE applied) for the residual stream
        ``residual`` ``[B, T, hidden]``, as the layer computes them from its own input: its norm,
        query projection, query norm (Qwen3) and RoPE."""
        module = self.attention[layer]
        b, t, _ = residual.shape
        d = module.head_dim
        q = module.q_proj(self.norm[layer](residual)).view(b, t, -1, d)
        if getattr(module, "q_norm", None) is not None:
            q = module.q_norm(q)
        q = q.transpose(1, 2)
        cos, sin = position_embeddings
        cos, sin = cos[:, None], sin[:, None]
        return q * cos + rotate_half(q) * sin


def _before_layer(layer_idx, module, args, kwargs):
    cache = kwargs.get("past_key_values")
    before = getattr(cache, "before_layer", None)
    if before is not None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        before(layer_idx, hidden, kwargs.get("position_embeddings"))


def attend_fetched(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, fetched: torch.Tensor, codec: Codec,
                   new_k: torch.Tensor, new_v: torch.Tensor, scale: float, read: torch.dtype) -> torch.Tensor:
    """Attention of a step's queries ``[B, Hq, Tq, D]`` over fetched ``keys``/``values``
    ``[B, H, S, D]`` (slots where ``fetched`` ``[B, H, S]`` is False are padding or stale: masked,
    and zeroed since a masked NaN still poisons the output) and the step's own tokens, as stored
    (through ``codec``), causal among them; all in ``read``. Returns ``[B, Tq, Hq, D]``."""
    b, hq, tq, _ = queries.shape
    h = keys.shape[1]
    new_k, new_v = (codec.decode(codec.encode(x, role), role, read) for x, role in ((new_k, "key"), (new_v, "value")))
    empty = ~fetched[..., None]
    keys = torch.cat([keys.masked_fill(empty, 0), new_k], -2)
    values = torch.cat([values.masked_fill(empty, 0), new_v], -2)
    causal = torch.ones(tq, tq, dtype=torch.bool, device=queries.device).tril()
    visible = torch.cat([fetched[:, :, None, :].expand(-1, -1, tq, -1), causal.expand(b, h, tq, tq)], -1)
    out = F.scaled_dot_product_attention(queries.to(read), keys, values, attn_mask=visible.repeat_interleave(
        hq // h, dim=1), scale=scale, enable_gqa=hq != h).to(queries.dtype)
    return out.transpose(1, 2)


class HostStore:
    """One layer's tokens encoded by ``codec`` in host memory, pinned when the accelerator is CUDA:
    per field ``[S, B, H, w]``, token-major so that appending a step's tokens is one contiguous
    (asynchronous) copy; :meth:`fetch` brings chosen rows to the accelerator."""

    def __init__(self, codec: Codec, device: torch.device):
        self.codec, self.device = codec, device
        self.pin = device.type == "cuda"
        self.fields: dict[str, Encoded] = {}
        self.count = 0  # token slots written (per row and head; padding included)

    @property
    def capacity(self) -> int:
        return next(iter(self.fields["key"].values())).shape[0] if self.fields else 0

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Encode ``[B, H, N, D]`` tokens on the accelerator and append them in host memory."""
        n = keys.shape[2]
        encoded = {role: {name: t.permute(2, 0, 1, 3).contiguous() for name, t in self.codec.encode(x, role).items()}
                   for role, x in (("key", keys), ("value", values))}
        if self.count + n > self.capacity:
            slots = self.count + n + HOST_GROWTH
            old, self.fields = self.fields, {
                role: {name: torch.empty((slots, *t.shape[1:]), dtype=t.dtype, pin_memory=self.pin)
                       for name, t in enc.items()} for role, enc in encoded.items()}
            for role, enc in old.items():
                for name, t in enc.items():
                    self.fields[role][name][:self.count].copy_(t[:self.count])
        for role, enc in encoded.items():
            for name, t in enc.items():
                self.fields[role][name][self.count:self.count + n].copy_(t, non_blocking=self.pin)
        self.count += n

    def tokens(self, role: str) -> Encoded:
        """The written slots of ``role``'s fields as ``[B, H, count, w]`` views."""
        return {name: t[:self.count].permute(1, 2, 0, 3) for name, t in self.fields[role].items()}

    def fetch(self, index: torch.Tensor, out: dict[str, Encoded]) -> dict[str, Encoded]:
        """The rows ``index`` ``[B, H, K]`` of every field, written into the accelerator buffers
        ``out`` (``[B, H, >= K, w]`` per field) and returned as views of their first ``K`` slots."""
        from kvplug import triton_ops

        b, h, k = index.shape
        flat = index.reshape(b * h, k).to(torch.int32).contiguous()
        got = {}
        for role, enc in self.fields.items():
            got[role] = {}
            for name, src in enc.items():
                buf = out[role][name]  # [B, H, slots, w], contiguous
                w = src.shape[3]
                rows = src.view(src.shape[0], b * h, w).transpose(0, 1)  # [B * H, S, w], strided
                dst = buf.view(b * h, buf.shape[2], w)[:, :k]
                if self.device.type == "cuda":  # rows read from pinned host memory by the GPU
                    triton_ops.gather_rows(rows, flat, dst)
                else:
                    dst.copy_(triton_ops.gather_rows_reference(rows, flat))
                got[role][name] = buf[:, :, :k]
        return got

    def field_shapes(self) -> dict[str, dict[str, tuple]]:
        """``(B, H, w, dtype)`` of every field, by role and name."""
        return {role: {name: (t.shape[1], t.shape[2], t.shape[3], t.dtype) for name, t in enc.items()}
                for role, enc in self.fields.items()}

    def stored_bytes(self) -> int:
        """Host bytes of the written slots (every field, K and V)."""
        if not self.fields:
            return 0
        return sum(encoded_bytes(enc) for enc in self.fields.values()) // self.capacity * self.count


class FetchBuffers:
    """Two sets of accelerator buffers for fetched tokens, shared by a cache's layers: layer ``i``
    uses set ``i % 2``, so one layer's prefetch never writes what the layer before it still reads."""

    def __init__(self):
        self.sets: list[dict[str, Encoded] | None] = [None, None]

    def get(self, layer_idx: int, count: int, shapes: dict, device: torch.device) -> dict[str, Encoded]:
        """Set ``layer_idx % 2``, holding at least ``count`` tokens of the host store's fields."""
        i = layer_idx % 2
        have = self.sets[i]
        slots = -(-count // FETCH_GROWTH) * FETCH_GROWTH
        fits = have is not None and all(
            tuple(t.shape[:2]) + (t.shape[3], t.dtype) == shapes[role][name] and t.shape[2] >= count
            for role, enc in have.items() for name, t in enc.items())
        if not fits:
            self.sets[i] = {role: {name: torch.empty((b, h, slots, w), dtype=dtype, device=device)
                                   for name, (b, h, w, dtype) in enc.items()} for role, enc in shapes.items()}
        return self.sets[i]

    def nbytes(self) -> int:
        return sum(encoded_bytes(enc) for s in self.sets if s is not None for enc in s.values())


class PagedOffload:
    """One layer's tokens in host memory as the paged layout's *token rows* (``[S, B, H, R]`` uint8,
    pinned on CUDA; :meth:`kvplug.triton_ops.PagedLayout.token_row_bytes`), for codecs the paged
    kernels read. A fetch copies the chosen rows straight into a small paged cache
    (:func:`kvplug.triton_ops.copy_token_rows`) that the decode kernel then reads in place; new
    tokens are quantized by the store kernel into a scratch page and written back to host memory by
    the same copy. Off CUDA the kernels' PyTorch references do the same work."""

    def __init__(self, codec: Codec, layout, device: torch.device):
        from kvplug import triton_ops

        self.ops, self.codec, self.layout, self.device = triton_ops, codec, layout, device
        self.kernels = device.type == "cuda"
        self.pin = self.kernels
        self.rows: torch.Tensor | None = None
        self.count = 0
        self._aranges: dict = {}
        self._scratch: dict = {}  # (B, H, n) -> scratch pages for a step's n new tokens

    def _arange(self, b: int, h: int, n: int) -> torch.Tensor:
        """``[B, H, n]`` int32 ``0 .. n-1`` (kept: a decode step asks for the same ones every time)."""
        key = (b, h, n)
        if key not in self._aranges:
            self._aranges[key] = torch.arange(n, dtype=torch.int32, device=self.device).expand(b, h, n).contiguous()
        return self._aranges[key]

    def _copy(self, *args, **kwargs) -> None:
        copy = self.ops.copy_token_rows if self.kernels else self.ops.copy_token_rows_reference
        copy(*args, **kwargs)

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize ``[B, H, N, D]`` tokens on the accelerator and append their rows in host memory."""
        b, h, n, _ = keys.shape
        scratch = self._scratch.get((b, h, n)) if n <= self.layout.block_size else None
        if scratch is None:  # a scratch page per row: [B, blocks] tables, per-head slots
            bs = self.layout.block_size
            blocks = -(-n // bs)
            slots = self._arange(b, h, n)
            scratch = (self.layout.allocate(b * blocks, self.device),
                       torch.arange(b * blocks, dtype=torch.int32, device=self.device).view(b, blocks),
                       torch.arange(b, device=self.device)[:, None, None] * (blocks * bs) + slots, slots)
            if n <= bs:  # kept for the decode steps
                self._scratch[(b, h, n)] = scratch
        pages, tables, flat, slots = scratch
        store_paged(self.layout, keys, values, pages, flat)
        self._reserve(b, h, n)
        self._copy(self.rows, pages, self.layout, tables, slots + self.count, slots, to_pages=False)
        self.count += n

    def _reserve(self, b: int, h: int, n: int) -> None:
        """Room for ``n`` more token rows (pinned allocations are slow: grown by ``HOST_GROWTH``)."""
        if self.rows is None or self.count + n > self.rows.shape[0]:
            grown = torch.empty((self.count + n + HOST_GROWTH, b, h, self.layout.token_row_bytes()),
                                dtype=torch.uint8, pin_memory=self.pin)
            if self.rows is not None:
                grown[:self.count].copy_(self.rows[:self.count])
            self.rows = grown

    def fetch(self, index: torch.Tensor, pages) -> Pages:
        """Copy the rows ``index`` ``[B, H, K]`` into slots ``0 .. K-1`` of ``pages`` (a
        :class:`Pages` set), per head; returns ``pages``."""
        b, h, k = index.shape
        self._copy(self.rows, pages.cache, self.layout, pages.tables, index.contiguous(), self._arange(b, h, k),
                   to_pages=True)
        return pages

    def attend(self, queries: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor, pages, lens: torch.Tensor,
               scale: float) -> torch.Tensor:
        """Attention of ``queries`` ``[B, Hq, Tq, D]`` over the first ``lens`` ``[B, H]`` slots of
        ``pages`` and the step's own tokens (causal), which are stored here (appended to the host
        rows). Returns ``[B, Tq, Hq, D]``."""
        b, tq = queries.shape[0], queries.shape[2]
        if tq == 1:  # the new token goes into the fetched pages, is written back from there, and
            # the kernel reads the pages in place
            h = lens.shape[1]
            slot = lens[..., None]
            store_paged(self.layout, new_k, new_v, pages.cache, pages.base + slot)
            self._reserve(b, h, 1)
            self._copy(self.rows, pages.cache, self.layout, pages.tables, self._arange(b, h, 1) + self.count, slot,
                       to_pages=False)
            self.count += 1
            return attend_paged_one(self.layout, queries[:, :, 0], pages.cache, pages.tables, lens + 1, scale)[:, None]
        self.write(new_k, new_v)
        keys, values = read_paged(self.layout, pages.cache, pages.tables, pages.slots, torch.float32)
        fetched = torch.arange(pages.slots, device=self.device) < lens[..., None]  # [B, H, slots]
        return attend_fetched(queries, keys, values, fetched, self.codec, new_k, new_v, scale, torch.float32)

    def stored_bytes(self) -> int:
        """Host bytes of the written rows."""
        return 0 if self.rows is None else self.count * self.rows[0].numel()


@dataclass(eq=False)
class Pages:
    """One set of fetch pages: ``cache`` of ``layout``, its ``tables`` ``[B, blocks]``, ``slots`` per
    row and ``base`` ``[B, 1, 1]``, each row's first slot."""

    layout: object
    cache: torch.Tensor
    tables: torch.Tensor
    slots: int
    base: torch.Tensor


class FetchPages:
    """Small paged caches for fetched tokens, two shared by a cache's layers (set ``i % 2`` for
    layer ``i``, as :class:`FetchBuffers`)."""

    def __init__(self):
        self.sets: list[Pages | None] = [None, None]

    def get(self, layer_idx: int, count: int, layout, batch: int, device: torch.device) -> Pages:
        """Set ``layer_idx % 2``, with room for ``count`` fetched tokens and the step's own."""
        i = layer_idx % 2
        have = self.sets[i]
        need = count + 1
        if have is None or have.slots < need or have.layout != layout or have.tables.shape[0] != batch:
            slots = -(-need // FETCH_GROWTH) * FETCH_GROWTH
            blocks = -(-slots // layout.block_size)
            tables = torch.arange(batch * blocks, dtype=torch.int32, device=device).view(batch, blocks)
            have = self.sets[i] = Pages(layout, layout.allocate(batch * blocks, device), tables,
                                        blocks * layout.block_size, tables[:, :1, None].long() * layout.block_size)
        return have

    def nbytes(self) -> int:
        return sum(p.cache.numel() * p.cache.element_size() for p in self.sets if p is not None)


class OffloadLayer(PromptFirstLayer):
    """One decoder layer's K/V under a placement part: all of it in host memory, partial keys and
    the step's fetched tokens on the accelerator (see the module docstring)."""

    def __init__(self, strategy: Strategy, layer_idx: int, num_layers: int, paged: bool | None = None,
                 keep_prompt: bool = False, shared: dict | None = None):
        super().__init__()
        self.strategy, self.layer_idx, self.num_layers = strategy, layer_idx, num_layers
        self.paged = paged  # token rows in the paged layout, read by the kernels (None: on CUDA)
        self.placement = strategy.placement
        self.keep_prompt = keep_prompt
        self.shared = {} if shared is None else shared
        self.prompt: tuple | None = None
        self.seen = 0
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.host: HostStore | PagedOffload | None = None
        self.partial: torch.Tensor | None = None  # [B, H, slots, r] on the accelerator
        self.filled: torch.Tensor | None = None  # [B, H, slots] bool: a real token (not padding)
        self.skew: torch.Tensor | None = None
        self.padded = False  # whether the prompt had padding
        self.held = 0  # tokens stored before the current step
        self.query_skew: torch.Tensor | None = None  # the skew repeated per query head
        self.new: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's tokens, raw
        self.ready: tuple | None = None  # (fetched fields, their filled flags, the copy's CUDA event)
        self.chosen: torch.Tensor | None = None  # [B, H, K] the slots of the last fetch (for inspection)

    def prompt_stored(self) -> bool:
        return self.host is not None

    def reset(self) -> None:
        self.__init__(self.strategy, self.layer_idx, self.num_layers, self.paged, self.keep_prompt, self.shared)

    # prompt -----------------------------------------------------------------------------------
    @torch.no_grad()
    def compress_prompt(self, queries: torch.Tensor, valid: torch.Tensor, scale: float) -> None:
        """Move the prompt to host memory and keep its partial keys (the prompt attended exactly)."""
        keys, values = self.take_prompt(queries, valid, scale)
        b, h, t, d = keys.shape
        self.skew = self._skew(queries, valid, h, d)
        codec = self.strategy.codec
        paged = self.paged if self.paged is not None else self.device.type == "cuda"
        if paged and PagedStore.supports(codec, self.dtype, d):
            from kvplug.triton_ops import PagedLayout

            self.host = PagedOffload(codec, PagedLayout.for_codec(codec, PagedStore.BLOCK, h, d, self.dtype), self.device)
        else:
            self.host = HostStore(codec, self.device)
        self.host.write(keys, values)
        slots = t + DEVICE_GROWTH
        self.partial = keys.new_zeros(b, h, slots, self.skew.shape[-1])
        self.partial[:, :, :t] = self.placement.partial_keys(keys, self.skew)
        self.filled = torch.zeros(b, h, slots, dtype=torch.bool, device=self.device)
        self.filled[:, :, :t] = valid[:, None, :]
        self.padded = not bool(valid.all())  # once per prompt (a host sync)

    def _skew(self, queries: torch.Tensor, valid: torch.Tensor, h: int, d: int) -> torch.Tensor:
        """This layer's skew: the model's, computed from the first prompt any cache of it saw."""
        view = self.shared.get("model")
        key = (self.layer_idx, self.placement.columns(d))
        if view is not None and key in view.skews:
            return view.skews[key].to(self.device)
        skew = self.placement.skew(queries, valid, h).to(self.device)
        if view is not None:
            view.skews[key] = skew
        return skew

    # decode -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        n, held = keys.shape[2], self.host.count
        if held + n > self.partial.shape[2]:
            self.partial = _grown(self.partial, held + n + DEVICE_GROWTH)
            self.filled = _grown(self.filled, held + n + DEVICE_GROWTH)
        self.partial[:, :, held:held + n] = self.placement.partial_keys(keys, self.skew)
        self.filled[:, :, held:held + n] = True
        self.held = held  # tokens stored before this step: what its attention chooses from
        if not isinstance(self.host, PagedOffload):  # token rows are written when the step attends
            self.host.write(keys, values)
        self.new = (keys, values)

    def decoding(self) -> bool:
        """Whether the prompt is stored (later steps fetch from host memory)."""
        return self.prompt_stored() and self.pending is None

    @torch.no_grad()
    def prefetch(self, queries: torch.Tensor, scale: float, held: int) -> None:
        """Choose, from ``queries`` ``[B, Hq, T, D]`` (the layer's own, or a prediction of them),
        which of the first ``held`` stored tokens this layer's next attention reads, and start
        fetching them (on a side stream on CUDA)."""
        placement = self.placement
        count = placement.fetch_count(held)
        if self.query_skew is None or self.query_skew.shape[0] != queries.shape[1]:
            self.query_skew = self.skew.repeat_interleave(queries.shape[1] // self.skew.shape[0], dim=0)
        partial_q = placement.partial_queries(queries, self.query_skew)
        index = placement.speculate(partial_q, self.partial[:, :, :held], self.filled[:, :, :held], scale, count)
        if isinstance(self.host, PagedOffload):
            if self.padded:  # real tokens first (the kernel reads a prefix of the pages per head), padding after
                valid = self.filled[:, :, :held].gather(-1, index)
                order = (~valid).to(torch.int8).argsort(dim=-1, stable=True)
                index, valid = index.gather(-1, order), valid.sum(-1, dtype=torch.int32)
            else:
                valid = torch.full(index.shape[:2], count, dtype=torch.int32, device=self.device)
            buffers = self.shared.setdefault("fetch", FetchPages()).get(self.layer_idx, count, self.host.layout,
                                                                        index.shape[0], self.device)
        else:
            valid = self.filled[:, :, :held].gather(-1, index)
            buffers = self.shared.setdefault("fetch", FetchBuffers()).get(self.layer_idx, count,
                                                                          self.host.field_shapes(), self.device)
        done = None
        if self.device.type == "cuda":
            side = self.shared.get("stream")
            if side is None:
                side = self.shared["stream"] = torch.cuda.Stream(self.device)
            chosen = torch.cuda.current_stream(self.device).record_event()
            with torch.cuda.stream(side):
                side.wait_event(chosen)
                fetched = self.host.fetch(index, buffers)
                done = side.record_event()
            index.record_stream(side)
        else:
            fetched = self.host.fetch(index, buffers)
        # fetched: the fields (HostStore) or the pages (PagedOffload); valid: per slot, or per head a count
        self.ready = (fetched, valid, done)
        self.chosen = index

    def attend(self, queries: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of this step's queries ``[B, Hq, Tq, D]`` over the fetched tokens and the
        step's own (causal among them). Returns ``[B, Tq, Hq, D]``."""
        b, hq, tq, d = queries.shape
        if self.ready is None:  # no prediction was made ahead: choose from the layer's own queries
            self.prefetch(queries, scale, self.held)
        fields, valid, done = self.ready
        self.ready = None
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
        if isinstance(self.host, PagedOffload):
            return self.host.attend(queries, *self.new, fields, valid, scale)
        codec = self.strategy.codec
        read = read_dtype(codec, self.dtype)
        keys, values = codec.decode(fields["key"], "key", read), codec.decode(fields["value"], "value", read)
        return attend_fetched(queries, keys, values, valid, codec, *self.new, scale, read)

    # memory -----------------------------------------------------------------------------------
    def kept_tokens(self) -> int:
        """Tokens held (in host memory) over all heads of all sequences."""
        return 0 if self.host is None else int(self.filled[:, :, :self.host.count].sum())

    def host_bytes(self) -> int:
        """Bytes of K/V (codes) this layer holds in host memory."""
        return 0 if self.host is None else self.host.stored_bytes()

    def device_bytes(self) -> int:
        """Bytes of the partial keys this layer holds on the accelerator (written slots)."""
        if self.host is None:
            return 0
        p = self.partial
        return p.shape[0] * p.shape[1] * self.host.count * p.shape[3] * p.element_size()

    def stored_bytes(self) -> int:
        """K/V bytes this layer's tensors hold: host codes plus accelerator partial keys."""
        return self.host_bytes() + self.device_bytes()

    def bookkeeping_bytes(self) -> int:
        """Bytes of the per-slot flags (real token or padding) on the accelerator."""
        return 0 if self.host is None else self.filled[:, :, :self.host.count].numel()
