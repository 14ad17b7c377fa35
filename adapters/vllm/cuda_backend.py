"""kvplug's attention backend for vLLM on CUDA GPUs (imports vLLM; the kernels only when run).

:mod:`kvplug.adapters.vllm` routes the platform's backend choice here when a strategy with a
quantizing codec (int8/int4/int2) or eviction is selected; with ``none`` and no eviction (or no
strategy) vLLM's own backend runs unchanged. Each step, in the layer's forward:

* store: :func:`kvplug.triton_ops.store_kv` quantizes the step's K/V and writes them at vLLM's
  ``slot_mapping`` (one kernel, no other pass over the cache);
* decode requests (one query token, batched first by the builder's ``reorder_batch_threshold``):
  :func:`kvplug.triton_ops.decode_attention` over vLLM's block table and ``seq_lens``, reading the
  codes in place (vLLM's ``[blocks, heads, block_size, C]`` page is viewed as the kernels'
  :class:`~kvplug.triton_ops.PagedLayout`: same bytes, :func:`.layout.as_triton_cache`);
* prefill requests: causal attention over the step's own uncompressed K/V (vLLM's FlashAttention
  varlen kernel; torch SDPA where vLLM has none), as the HF adapter's prefill does.

With a strategy that evicts (snapkv, knorm, random with uniform or pyramid budgets; streaming),
each prefill's step also keeps the selected tokens and compacts them into the last slots of the
prompt (:meth:`.compaction.LayerEviction.after_prompt`, the CPU backend's code; streaming's stay
in place), the scheduler's manager frees the blocks no layer reads (:mod:`.manager`), and decode
reads each layer's held slots only (``held`` of the decode kernel, three ints per layer and
request that do not change while it generates, written before each step from the prompt
lengths: :func:`.eviction.held_spans`).

Prefill modes (``kvplug_prefill``, :func:`kvplug.adapters.vllm.prefill_mode`): ``uncompressed``
(default, the HF adapter's first tokens) attends each prompt over its own raw K/V as above; a
prefill with cached context (prefix-cache hit, a later chunk of a chunked prefill) cannot be
served that way, so start-up refuses prefix caching and chunked prefill (:func:`check_engine`) and
the builder stops on such a batch rather than attend over part of the context. ``compressed``
(strategies that do not evict): every prefill token attends over what the cache holds, its own
chunk included (stored first), through :func:`kvplug.triton_ops.paged_attention` in one launch for
all prefills of the step, so chunked prefill and prefix caching run, and output does not depend on
chunking, cache hits or preemption: a hit's blocks hold exactly the codes a cold run writes (the
store is a function of the token's K/V alone), so it reuses them as they are. The decode path
allocates nothing outside the kernels' own scratch and never syncs, so pure-decode batches run as
full CUDA graphs (``UNIFORM_SINGLE_TOKEN_DECODE``); mixed batches run piecewise, attention eager.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionImpl,
                                       AttentionMetadataBuilder, AttentionType, CommonAttentionMetadata)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from kvplug import triton_ops
from kvplug.errors import SpecError

from . import KEY, PREFILL_KEY, check_head_sizes, check_layer, compat, layer_spec, prefill_mode, selected_strategy
from .compaction import LayerEviction
from .eviction import held_spans, replaces
from .layout import PagedKV, TokenLayout, as_triton_cache

ACTIVE: dict = {"layout": None, "evicting": None}
"""The :class:`~kvplug.triton_ops.PagedLayout` of the model last built in this process (one engine
per worker) and, when its strategy evicts, ``(spec, num_layers)``: ``customize_spec`` and
``get_kv_cache_shape`` (class methods, no config) read them."""


def paged_layout(codec, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
    """The kernels' layout for ``codec``, or a one-line :class:`SpecError` naming what they lack."""
    if getattr(codec, "rotate", False):
        raise SpecError(f"kvplug in vLLM on CUDA: {codec} (rotate=true) has no GPU path yet; use it without "
                        "rotate")
    try:
        return triton_ops.PagedLayout.for_codec(codec, block_size, num_kv_heads, head_dim, dtype)
    except ValueError as e:
        raise SpecError(f"kvplug in vLLM on CUDA: {e}") from None


def check_engine(vllm_config, strategy) -> None:
    """Refuse, at start-up, a codec the kernels cannot hold and the scheduling this backend cannot
    attend over (see the module doc)."""
    model = getattr(vllm_config, "model_config", None)
    head_dim = compat.head_size(vllm_config)
    if head_dim is not None:
        paged_layout(strategy.codec, 16, 1, head_dim, getattr(model, "dtype", None) or torch.bfloat16)
    if replaces(strategy):
        raise SpecError(f"kvplug in vLLM on CUDA: {strategy.scorer.name} ranks tokens by the attention of each "
                        f"generated token, which the CUDA decode kernel does not report yet; run it on the CPU "
                        f"backend or with the HF adapter")
    mode = prefill_mode(vllm_config)
    if mode == "compressed":
        if strategy.evicts:
            raise SpecError(f"kvplug in vLLM on CUDA: {PREFILL_KEY}='compressed' is for strategies that do not "
                            f"evict yet ({strategy.scorer.name} selects at the prompt's own step); drop the option")
        return
    cache = getattr(vllm_config, "cache_config", None)
    sched = getattr(vllm_config, "scheduler_config", None)
    on = [flag for flag, enabled in (
        ("--no-enable-prefix-caching / enable_prefix_caching=False", getattr(cache, "enable_prefix_caching", False)),
        ("--no-enable-chunked-prefill / enable_chunked_prefill=False",
         getattr(sched, "enable_chunked_prefill", False)),
    ) if enabled]
    if on:
        raise SpecError(f"kvplug in vLLM on CUDA attends prefills over their own tokens only in its default "
                        f"{PREFILL_KEY}='uncompressed' mode; pass {' and '.join(on)} with {KEY}, or add "
                        f"\"{PREFILL_KEY}\": \"compressed\" to the additional config")


class KVPlugCudaBackend(AttentionBackend):
    """A paged KV cache of kvplug codes on CUDA, read by :mod:`kvplug.triton_ops`."""

    kvplug = True
    forward_includes_kv_cache_update = True  # store_kv runs in forward, before attention

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[KVPlugCudaImpl]:
        return KVPlugCudaImpl

    @staticmethod
    def get_builder_cls() -> type[KVPlugCudaMetadataBuilder]:
        return KVPlugCudaMetadataBuilder

    @classmethod
    def customize_spec(cls, spec):
        """The codec's bytes per token-head as the page (0.32 calls this; 0.26 through compat's hook)."""
        layout = ACTIVE["layout"]
        if layout is None:
            return spec
        check_head_sizes(spec, layout.head_dim)
        return layer_spec(spec, token_bytes(layout), ACTIVE["evicting"])

    @staticmethod
    def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
        layout = ACTIVE["layout"]
        if layout is None:
            raise RuntimeError("kvplug: the CUDA backend's KV-cache shape was asked before its layer was built")
        return compat.kv_cache_shape(num_blocks, block_size, num_kv_heads, token_bytes(layout))


def token_bytes(layout) -> int:
    """Bytes of K and V of one token for one KV head in ``layout`` (vLLM's ``C``)."""
    return layout.bytes_per_token() // layout.num_kv_heads


@dataclass
class KVPlugCudaMetadata:
    """One step's batch: ``num_decodes`` one-token requests first, then the prefills."""

    num_actual_tokens: int
    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    num_decodes: int  # rows of the decode kernel
    num_decode_tokens: int  # where the prefills' tokens start
    num_prefill_tokens: int
    prefill_starts: torch.Tensor | None  # int32 [prefills + 1], from the first prefill token
    prefill_starts_cpu: torch.Tensor | None
    max_prefill_len: int
    first_prefill: int = 0  # the request (row) of the first prefill
    compressed_prefill: bool = False  # prefills attend over the stored cache (paged_attention)
    held: torch.Tensor | None = None  # eviction: int32 [layers, rows, 3], what each reads (held_spans)
    strategy: object = None  # eviction: the strategy the spans follow
    prompt_lens: torch.Tensor | None = None  # eviction: int [requests], from the model runner

    def attach_prompt_lens(self, lens: torch.Tensor) -> None:
        """Called (:func:`.compat.expose_prompt_lengths`) once the model runner has built this
        step's metadata: fill the decode rows' held spans in place (a copy on the step's stream,
        before the step; the buffer is the one CUDA graphs captured)."""
        self.prompt_lens = lens
        rows = min(self.num_decodes, len(lens))
        if self.held is not None and rows:
            spans = held_spans(self.strategy, lens[:rows], self.held.shape[0])
            self.held[:, :rows].copy_(spans, non_blocking=True)


class KVPlugCudaMetadataBuilder(AttentionMetadataBuilder[KVPlugCudaMetadata]):
    _cudagraph_support: ClassVar = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    reorder_batch_threshold: int | None = 1

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):  # abstract in vLLM's base
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        strategy = selected_strategy(vllm_config)
        self.evicting = strategy if strategy is not None and strategy.evicts else None
        self.compressed = prefill_mode(vllm_config) == "compressed"
        if self.evicting is not None:
            rows = max(vllm_config.scheduler_config.max_num_seqs,
                       getattr(vllm_config.compilation_config, "max_cudagraph_capture_size", None) or 0)
            layers = vllm_config.model_config.get_total_num_hidden_layers()
            self.held = torch.zeros(layers, rows, 3, dtype=torch.int32, device=device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KVPlugCudaMetadata:
        md = build_metadata(common_attn_metadata, self.compressed)
        if self.evicting is not None:
            md.held, md.strategy = self.held, self.evicting
        return md


def build_metadata(common: CommonAttentionMetadata, compressed: bool = False) -> KVPlugCudaMetadata:
    """Split the (reordered) batch into decodes and prefills; host tensors only, no device sync.

    Decodes hold one token each (threshold 1). A padded batch (CUDA graphs) may end in requests of
    no token or in tokens of no request; the decode kernel runs over the rows that have both
    (padding rows have length 0 and slot -1: nothing read, nothing stored). ``compressed``: the
    prefills attend over the cache, so a prefill with cached context is served, not refused."""
    num_decodes, num_prefills, num_decode_tokens, num_prefill_tokens = split_decodes_and_prefills(common, 1)
    starts = starts_cpu = None
    max_len = 0
    if num_prefills:
        n = common.num_reqs
        starts_cpu = common.query_start_loc_cpu[num_decodes:n + 1] - num_decode_tokens
        lens = starts_cpu[1:] - starts_cpu[:-1]
        max_len = int(lens.max())
        seq_lens_cpu = getattr(common, "seq_lens_cpu_upper_bound", None)  # exact for prefill rows
        if not compressed and seq_lens_cpu is not None and bool((seq_lens_cpu[num_decodes:n] > lens[:len(seq_lens_cpu) - num_decodes]).any()):
            raise RuntimeError("kvplug in vLLM on CUDA: a prefill with cached context (prefix caching or "
                               "chunked prefill) reached the backend; start the engine with both disabled")
        starts = common.query_start_loc[num_decodes:n + 1] - num_decode_tokens
    return KVPlugCudaMetadata(
        num_actual_tokens=common.num_actual_tokens, slot_mapping=common.slot_mapping,
        block_table=common.block_table_tensor, seq_lens=common.seq_lens,
        num_decodes=min(num_decodes, num_decode_tokens), num_decode_tokens=num_decode_tokens,
        num_prefill_tokens=num_prefill_tokens, prefill_starts=starts, prefill_starts_cpu=starts_cpu,
        max_prefill_len=max_len, first_prefill=num_decodes, compressed_prefill=compressed)


class KVPlugCudaImpl(AttentionImpl):
    """Store with ``store_kv``; decode with ``decode_attention``; prefill over the step's own K/V."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None, sliding_window=None,
                 kv_cache_dtype="auto", logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None, **kwargs):
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        config = compat.current_config()
        strategy = selected_strategy(config)
        if attn_type != AttentionType.DECODER:
            raise SpecError(f"kvplug in vLLM on CUDA does not support encoder or cross attention yet "
                            f"(strategy {str(strategy)!r})")
        check_layer(strategy, sliding_window=sliding_window, alibi_slopes=alibi_slopes,
                    logits_soft_cap=logits_soft_cap, sinks=sinks,
                    kv_sharing_target_layer_name=kv_sharing_target_layer_name, where=" on CUDA")
        dtype = getattr(getattr(config, "model_config", None), "dtype", None) or torch.get_default_dtype()
        block_size = getattr(getattr(config, "cache_config", None), "block_size", None) or 16
        self.layout = paged_layout(strategy.codec, block_size, self.num_kv_heads, head_size, dtype)
        ACTIVE["layout"] = self.layout
        self.strategy = strategy
        self.num_layers = config.model_config.get_total_num_hidden_layers()
        self.eviction: LayerEviction | None = None  # made at the first step, when the layer's name is known
        ACTIVE["evicting"] = (str(strategy), self.num_layers) if strategy.evicts else None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None, output_scale=None,
                output_block_scale=None):
        """``query``/``output`` ``[tokens, heads, head_size]``, ``key``/``value`` ``[tokens, kv_heads, head_size]``."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("kvplug: fused output quantization is not supported")
        if attn_metadata is None:  # profiling run: no cache yet
            return output
        n = attn_metadata.num_actual_tokens
        cache = as_triton_cache(kv_cache, self.layout)
        triton_ops.store_kv(key[:n], value[:n], cache, attn_metadata.slot_mapping[:n], self.layout)
        ev = self._layer_eviction(layer) if self.strategy.evicts else None
        nd = attn_metadata.num_decodes
        if nd:
            held = None if ev is None else attn_metadata.held[ev.layer_idx, :nd]
            triton_ops.decode_attention(query[:nd], cache, self.layout, attn_metadata.block_table[:nd],
                                        attn_metadata.seq_lens[:nd], self.scale, held=held, out=output[:nd])
        if attn_metadata.num_prefill_tokens:
            p = attn_metadata.num_decode_tokens
            self._prefill(query[p:n], key[p:n], value[p:n], cache, attn_metadata, output[p:n])
            if ev is not None:
                self._compress_prompts(ev, query, key, value, kv_cache, attn_metadata, output)
        return output

    def _layer_eviction(self, layer) -> LayerEviction:
        if self.eviction is None:
            from vllm.model_executor.models.utils import extract_layer_index

            paged = PagedKV(TokenLayout.for_codec(self.strategy.codec, self.head_size, self.layout.dtype))
            self.eviction = LayerEviction(self.strategy, paged, extract_layer_index(layer.layer_name),
                                          self.num_layers)
        return self.eviction

    def _compress_prompts(self, ev: LayerEviction, query, key, value, kv_cache, md: KVPlugCudaMetadata,
                          output) -> None:
        """After the prefills' attention: each keeps its selection, compacted (eager steps only:
        a step with a prefill never runs as a full CUDA graph)."""
        prompt_lens = compat.required_prompt_lengths(md.prompt_lens)
        bounds = (md.prefill_starts_cpu + md.num_decode_tokens).tolist()
        for j, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            row = md.first_prefill + j
            if row >= len(prompt_lens):  # warm-up and capture runs: rows with no request behind them
                break
            prompt_len = int(prompt_lens[row])
            if e - s < prompt_len:
                raise RuntimeError(f"kvplug: eviction needs each prompt in one step; request {row} has {e - s} of "
                                   f"its {prompt_len} prompt tokens in this one")
            ev.after_prompt(query[s:e], key[s:e], value[s:e], kv_cache, md.block_table[row], prompt_len,
                            self.scale, output[s:e])

    def _prefill(self, q, k, v, cache, md: KVPlugCudaMetadata, out) -> None:
        """Causal attention of each prefill (packed, ``md.prefill_starts``): over the stored cache
        with ``compressed_prefill``, otherwise over its own raw tokens."""
        if md.compressed_prefill:
            rows = slice(md.first_prefill, md.first_prefill + len(md.prefill_starts_cpu) - 1)
            triton_ops.paged_attention(q, cache, self.layout, md.block_table[rows], md.prefill_starts,
                                       md.seq_lens[rows], self.scale, max_query_len=md.max_prefill_len, out=out)
            return
        fa = _flash_attn() if q.is_cuda else None
        if fa is not None:
            varlen, version = fa
            varlen(q, k, v, max_seqlen_q=md.max_prefill_len, cu_seqlens_q=md.prefill_starts,
                   max_seqlen_k=md.max_prefill_len, cu_seqlens_k=md.prefill_starts, softmax_scale=self.scale,
                   causal=True, out=out, fa_version=version)
            return
        bounds = md.prefill_starts_cpu.tolist()
        for s, e in zip(bounds[:-1], bounds[1:]):
            o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                               v[s:e].transpose(0, 1), is_causal=True, scale=self.scale,
                                               enable_gqa=self.num_heads != self.num_kv_heads)
            out[s:e] = o.transpose(0, 1)


@functools.cache
def _flash_attn():
    """vLLM's FlashAttention varlen kernel and version, or None where vLLM has none (CPU builds)."""
    try:
        from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func, get_flash_attn_version
    except ImportError:
        return None
    return flash_attn_varlen_func, get_flash_attn_version()
