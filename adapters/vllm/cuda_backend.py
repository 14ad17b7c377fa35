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
* prefill requests: causal attention over the cache, their own chunk included (default), or over
  the step's own uncompressed K/V as the HF adapter's prefill does (see the prefill modes below).

With a strategy that evicts (snapkv, knorm, random with uniform or pyramid budgets; streaming),
the step holding a prompt's last chunk also keeps the selected tokens and compacts them into the
last slots of the prompt (:meth:`.compaction.LayerEviction.finish_chunk`, the CPU backend's code;
streaming's stay in place; earlier chunks only keep their observation queries), the scheduler's
manager frees the blocks no layer reads (:mod:`.manager`), and decode
reads each layer's held slots only (``held`` of the decode kernel, three ints per layer and
request that do not change while it generates, written before each step from the prompt
lengths: :func:`.eviction.held_spans`).

Prefill modes (``kvplug_prefill``, :func:`kvplug.adapters.vllm.prefill_mode`): ``compressed``
(default) attends every prefill token over what the cache holds, its own chunk included (stored
first), so chunked prefill and prefix caching run, and output does not depend on chunking, cache
hits or preemption: a hit's blocks hold exactly the codes a cold run writes (the store is a
function of the token's K/V alone), so it reuses them as they are. A step's prefills read the
cache one of two ways, the same values either way: chunks of at least ``dense_from`` tokens (16)
have their sequences' K/V decoded into a packed buffer (:func:`kvplug.triton_ops.dequantize_kv`,
groups of at most ``DENSE_TOKENS`` tokens) and run vLLM's FlashAttention varlen kernel over it
(causal, bottom-right: the chunk after its context), which is 2.3x faster than reading the codes
in the attention kernel at long prompts (``benchmarks/gpu_varlen_check.py --prefill``, H200);
shorter chunks (a prefix hit's last tokens, spec-decode-like extends) read the codes in place
with :func:`kvplug.triton_ops.paged_attention`. ``uncompressed`` (the HF adapter's first tokens)
attends each prompt over its own raw K/V; a prefill with cached context (prefix-cache hit, a later
chunk of a chunked prefill) cannot be served that way, so start-up refuses prefix caching and
chunked prefill (:func:`.capabilities.check_engine`) and the builder stops on such a batch rather than attend
over part of the context. The decode path allocates nothing outside the kernels' own scratch and
never syncs, so pure-decode batches run as full CUDA graphs (``UNIFORM_SINGLE_TOKEN_DECODE``),
also for eviction without chunked prefill (h2o/tova's replace step included: ``_replacing_decodes``);
mixed batches run piecewise, attention eager.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionImpl,
                                       AttentionMetadataBuilder, AttentionType, CommonAttentionMetadata)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from kvplug import triton_ops
from kvplug.attention import step_probs
from kvplug.rotation import hadamard, rotate

from . import compat, layer_spec, prefill_mode, selected_strategy
from .capabilities import Engine, Support, check_head_sizes, check_layer, cuda_page, resolve_configured
from .compaction import LayerEviction, attend
from .eviction import READ_ALL, held_spans, largest_front, replaces
from .layout import PagedKV, TokenLayout, as_triton_cache

def token_bytes(layout) -> int:
    """Bytes of K and V of one token for one KV head in ``layout`` (vLLM's ``C``)."""
    return layout.bytes_per_token() // layout.num_kv_heads


class KVPlugCudaBackend(AttentionBackend):
    """A paged KV cache of kvplug codes on CUDA, read by :mod:`kvplug.triton_ops`. The class that
    serves an engine is its subclass carrying the engine (:func:`.capabilities.configured`)."""

    kvplug = True
    forward_includes_kv_cache_update = True  # store_kv runs in forward, before attention
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]
    kvplug_support: ClassVar[Support] = Support(
        platform="CUDA", page=cuda_page, replaces_on_decode=True, raw_prefill_with_context=False,
        encoder_attention=False)
    engine: ClassVar[Engine | None] = None

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [16, 32, 64, 128, 256, 512]  # the kernels' tiles: powers of two (PagedLayout)

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
    def _engine(cls) -> Engine:
        if cls.engine is None:
            raise RuntimeError(f"kvplug: {cls.__name__} serves no engine; vLLM is given the configured subclass "
                               f"(capabilities.configured)")
        return cls.engine

    @classmethod
    def customize_spec(cls, spec):
        """The codec's bytes per token-head as the page (0.32 calls this; 0.26 through compat's hook)."""
        engine = cls._engine()
        layout = cuda_page(engine.strategy.codec, spec.head_size, engine.torch_dtype)
        check_head_sizes(spec, layout.head_dim)
        return layer_spec(spec, token_bytes(layout), engine.evicting)

    @classmethod
    def get_kv_cache_shape(cls, num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
        engine = cls._engine()
        layout = cuda_page(engine.strategy.codec, head_size, engine.torch_dtype)
        return compat.kv_cache_shape(num_blocks, block_size, num_kv_heads, token_bytes(layout))


def __getattr__(name: str):
    """vLLM imports the configured class by name, in whichever process it needs it."""
    return resolve_configured(KVPlugCudaBackend, name)


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
    prefill_seq_lens_cpu: torch.Tensor | None = None  # [prefills], context + chunk, host
    first_prefill: int = 0  # the request (row) of the first prefill
    compressed_prefill: bool = False  # prefills attend over the stored cache
    decode_seq_lens_cpu: torch.Tensor | None = None  # [decodes], host (None where vLLM has none)
    held: torch.Tensor | None = None  # eviction: int32 [layers, rows, 3], what each reads (held_spans)
    strategy: object = None  # eviction: the strategy the spans follow
    prompt_lens: torch.Tensor | None = None  # eviction: int [requests], from the model runner
    prompt_decode_rows: tuple[int, ...] = ()  # eviction: one-token rows that are a prompt's chunk
    replace_width: int = 0  # eviction that replaces: the replace step's width (host; see the builder)
    fixed_width: int = 0  # eviction that replaces under CUDA graphs: the width every step uses (host)
    capture: bool = False  # built for a CUDA graph capture or its warm-up (no requests behind the rows)

    def attach_prompt_lens(self, lens: torch.Tensor) -> None:
        """Called (:func:`.compat.expose_prompt_lengths`) once the model runner has built this
        step's metadata: fill the decode rows' held spans in place (a copy on the step's stream,
        before the step; the buffer is the one CUDA graphs captured). A one-token row that is
        still in its prompt (a chunk of one token, vLLM counts it a decode) reads every slot; the
        forward then keeps its observation query (and compacts, if it ends the prompt)."""
        self.prompt_lens = lens
        rows = min(self.num_decodes, len(lens))
        if self.held is not None and rows:
            spans = held_spans(self.strategy, lens[:rows], self.held.shape[0])
            if self.decode_seq_lens_cpu is not None:
                in_prompt = self.decode_seq_lens_cpu[:rows] <= lens[:rows]
                if bool(in_prompt.any()):
                    spans[:, in_prompt] = torch.tensor([0, 0, READ_ALL], dtype=spans.dtype)
                    self.prompt_decode_rows = tuple(in_prompt.nonzero().flatten().tolist())
            self.held[:, :rows].copy_(spans, non_blocking=True)
            self.replace_width = self.fixed_width or int(spans[0, :, 1].max())


class KVPlugCudaMetadataBuilder(AttentionMetadataBuilder[KVPlugCudaMetadata]):
    _cudagraph_support: ClassVar = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    reorder_batch_threshold: int | None = 1

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        """Full decode graphs, except for eviction with chunked prefill: a batch of one-token rows
        may then hold any chunk of a prompt (vLLM counts a one-token chunk a decode), whose
        observation queries and compaction the forward keeps in Python, which a replayed graph
        would skip; attention then runs eagerly between vLLM's piecewise graphs. Without chunked
        prefill (and with prefix caching off, as eviction has it) the only prompt a decode batch
        can hold is one of a single token, which needs no move; a strategy that replaces while
        generating starts its running state inside the graph (``_replacing_decodes``), and its
        replace step then has one fixed width (:func:`.eviction.largest_front`)."""
        strategy = selected_strategy(vllm_config)
        sched = getattr(vllm_config, "scheduler_config", None)
        if strategy is not None and strategy.evicts and getattr(sched, "enable_chunked_prefill", False):
            return AttentionCGSupport.NEVER
        return cls._cudagraph_support

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
        self.fixed_width = 0
        mode = getattr(getattr(vllm_config, "compilation_config", None), "cudagraph_mode", None)
        graphs = mode is None or getattr(mode, "has_full_cudagraphs", lambda: True)()
        if (self.evicting is not None and replaces(self.evicting) and graphs
                and self.get_cudagraph_support(vllm_config, kv_cache_spec) != AttentionCGSupport.NEVER):
            self.fixed_width = largest_front(self.evicting, vllm_config.model_config.max_model_len)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KVPlugCudaMetadata:
        md = build_metadata(common_attn_metadata, self.compressed)
        if self.evicting is not None:
            md.held, md.strategy = self.held, self.evicting
            md.fixed_width = md.replace_width = self.fixed_width
            lens = getattr(common_attn_metadata, "rswa_prefix_lens", None)
            if lens is not None:  # the V2 model runner (compat's prepare_inputs hook); V1 attaches after build
                md.attach_prompt_lens(lens.cpu())
        return md

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> KVPlugCudaMetadata:
        """A capture's batch (and its warm-up's): rows with no request behind them, so no prompt
        lengths; the held spans are the builder's buffer, read when the graph is replayed."""
        md = self.build(0, common_attn_metadata)
        md.capture = True
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
    upper = getattr(common, "seq_lens_cpu_upper_bound", None)  # host; exact for prefill rows
    if num_prefills:
        n = common.num_reqs
        starts_cpu = common.query_start_loc_cpu[num_decodes:n + 1] - num_decode_tokens
        lens = starts_cpu[1:] - starts_cpu[:-1]
        max_len = int(lens.max())
        seq_lens_cpu = upper
        if not compressed and seq_lens_cpu is not None and bool((seq_lens_cpu[num_decodes:n] > lens[:len(seq_lens_cpu) - num_decodes]).any()):
            raise RuntimeError("kvplug in vLLM on CUDA: a prefill with cached context (prefix caching or "
                               "chunked prefill) reached the backend; start the engine with both disabled")
        starts = common.query_start_loc[num_decodes:n + 1] - num_decode_tokens
        if seq_lens_cpu is None:  # not in this version's metadata: read it (a prefill step, eager)
            seq_lens_cpu = common.seq_lens.cpu()
        prefill_lens = seq_lens_cpu[num_decodes:n]
    return KVPlugCudaMetadata(
        num_actual_tokens=common.num_actual_tokens, slot_mapping=common.slot_mapping,
        block_table=common.block_table_tensor, seq_lens=common.seq_lens,
        num_decodes=min(num_decodes, num_decode_tokens), num_decode_tokens=num_decode_tokens,
        num_prefill_tokens=num_prefill_tokens, prefill_starts=starts, prefill_starts_cpu=starts_cpu,
        max_prefill_len=max_len, prefill_seq_lens_cpu=prefill_lens if num_prefills else None,
        first_prefill=num_decodes, compressed_prefill=compressed,
        decode_seq_lens_cpu=None if upper is None else upper[:num_decodes])


DENSE_TOKENS = 1 << 16
"""Most decoded tokens (context + chunk, summed over a group of prefills) one dense prefill
attention reads at once: its buffer is ``DENSE_TOKENS * kv_heads * head_dim * 4`` bytes (K and V,
16-bit), 256 MiB at 8 KV heads of 128, freed after the layer; a longer single sequence gets its
own buffer of its length."""


class KVPlugCudaImpl(AttentionImpl):
    """Store with ``store_kv``; decode with ``decode_attention``; prefill over the cache (or the
    step's own K/V in ``uncompressed`` mode)."""

    dense_from = 16
    """Prefill chunks of at least this many tokens attend through a dense kernel over the decoded
    K/V; shorter ones read the codes in place (same values)."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None, sliding_window=None,
                 kv_cache_dtype="auto", logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None, **kwargs):
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        config = compat.current_config()
        strategy = selected_strategy(config)
        check_layer(KVPlugCudaBackend, strategy, encoder=attn_type != AttentionType.DECODER,
                    sliding_window=sliding_window, alibi_slopes=alibi_slopes, logits_soft_cap=logits_soft_cap,
                    sinks=sinks, kv_sharing_target_layer_name=kv_sharing_target_layer_name)
        dtype = getattr(getattr(config, "model_config", None), "dtype", None) or torch.get_default_dtype()
        block_size = getattr(getattr(config, "cache_config", None), "block_size", None) or 16
        self.layout = cuda_page(strategy.codec, head_size, dtype, block_size, self.num_kv_heads)
        if self.layout.rotated and torch.cuda.is_available():  # built now: a host-to-device copy cannot
            hadamard(head_size, torch.device("cuda", torch.cuda.current_device()))  # run in a graph capture
        self.strategy = strategy
        self.num_layers = config.model_config.get_total_num_hidden_layers()
        self.eviction: LayerEviction | None = None  # made at the first step, when the layer's name is known

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None, output_scale=None,
                output_block_scale=None):
        """``query``/``output`` ``[tokens, heads, head_size]``, ``key``/``value`` ``[tokens, kv_heads, head_size]``."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("kvplug: fused output quantization is not supported")
        if attn_metadata is None:  # profiling run: no cache yet
            return output
        n = attn_metadata.num_actual_tokens
        cache = as_triton_cache(kv_cache, self.layout)
        k, v = (rotate(key[:n]), rotate(value[:n])) if self.layout.rotated else (key[:n], value[:n])
        triton_ops.store_kv(k, v, cache, attn_metadata.slot_mapping[:n], self.layout)
        ev = self._layer_eviction(layer) if self.strategy.evicts else None
        nd = attn_metadata.num_decodes
        if nd and ev is not None and ev.replaces:
            self._replacing_decodes(ev, query, kv_cache, cache, attn_metadata, output)
        elif nd:
            held = None if ev is None else attn_metadata.held[ev.layer_idx, :nd]
            self._in_page_basis(lambda q, out: triton_ops.decode_attention(
                q, cache, self.layout, attn_metadata.block_table[:nd], attn_metadata.seq_lens[:nd], self.scale,
                held=held, out=out), query[:nd], output[:nd])
        if attn_metadata.num_prefill_tokens:
            p = attn_metadata.num_decode_tokens
            self._prefill(query[p:n], key[p:n], value[p:n], cache, attn_metadata, output[p:n])
        if ev is not None and (attn_metadata.num_prefill_tokens or attn_metadata.prompt_decode_rows):
            self._compress_prompts(ev, query, key, value, kv_cache, attn_metadata, output)
        return output

    def _replacing_decodes(self, ev: LayerEviction, query, kv_cache, cache, md: KVPlugCudaMetadata, output) -> None:
        """Decode rows of a strategy that replaces kept tokens while generating (h2o, tova), all
        rows at once, without a host sync and with shapes fixed by the batch's row count and the
        width (so a CUDA graph can hold the step): each new token takes its row's lowest-ranked
        unprotected slot (:meth:`.compaction.LayerEviction.admit`), the decode kernel attends over
        the held slots (the ``held`` spans: the plan's front run) and writes each slot's logit, and
        the running scores take the step's attention from those logits
        (:func:`kvplug.attention.step_probs`, :meth:`~.compaction.LayerEviction.rescore`). A row
        still in its prompt (a one-token chunk) has capacity 0 in the spans' front and reads every
        slot: :meth:`admit` leaves it; a prompt of one token starts its running state here
        (:meth:`~.compaction.LayerEviction.start_lone_prompts`), and in an eager step the forward
        compacts any prompt row after (``_compress_prompts``). Padding rows (length 0) are left."""
        nd = md.num_decodes
        if not md.capture:
            compat.required_prompt_lengths(md.prompt_lens)  # the spans below were written from them
        held, seq_lens = md.held[ev.layer_idx, :nd], md.seq_lens[:nd]
        ev.running_state(kv_cache)
        generating = (held[:, 2] == 0) & (seq_lens > 0)  # a prompt row's span reads every slot (READ_ALL)
        capacity = torch.where(generating, held[:, 1], 0)
        width = md.fixed_width or max(md.replace_width, 1)
        slots, valid = ev.admit(kv_cache, md.block_table[:nd], held[:, 0], capacity, (seq_lens - 1).clamp(min=0),
                                width)
        ev.start_lone_prompts(query[:nd], kv_cache, md.block_table[:nd], (held[:, 2] != 0) & (seq_lens == 1),
                              self.scale)
        logits = torch.empty(nd, query.shape[1], width, dtype=torch.float32, device=query.device)
        self._in_page_basis(lambda q, out: triton_ops.decode_attention(
            q, cache, self.layout, md.block_table[:nd], seq_lens, self.scale, held=held, out=out,
            logits=logits), query[:nd], output[:nd])
        # slot j of a row's front run is the kernel's held token j; unwritten logits are not valid
        ev.rescore(step_probs(logits, self.num_kv_heads, valid[:, None, :].expand(-1, self.num_kv_heads, -1)),
                   slots, valid, kv_cache)

    def _in_page_basis(self, attend, q, out) -> None:
        """``attend(q, out)``, an attention over the pages, in the pages' basis: for a rotated
        layout q goes in rotated and the result comes back into ``out`` rotated back (scores do
        not change; the Hadamard matrix is its own inverse)."""
        if not self.layout.rotated:
            attend(q, out)
            return
        rotated_out = torch.empty_like(q)
        attend(rotate(q).to(q.dtype), rotated_out)
        out.copy_(rotate(rotated_out))

    def _layer_eviction(self, layer) -> LayerEviction:
        if self.eviction is None:
            from vllm.model_executor.models.utils import extract_layer_index

            paged = PagedKV(TokenLayout.for_codec(self.strategy.codec, self.head_size, self.layout.dtype))
            self.eviction = LayerEviction(self.strategy, paged, extract_layer_index(layer.layer_name),
                                          self.num_layers)
        return self.eviction

    def _compress_prompts(self, ev: LayerEviction, query, key, value, kv_cache, md: KVPlugCudaMetadata,
                          output) -> None:
        """After the step's attention: each request holding prompt tokens keeps its observation
        queries and, at its prompt's last chunk, its selection, compacted; tokens after a prompt in
        a step of several (a preempted re-run) get :meth:`.compaction.LayerEviction.extend`'s
        outputs (eager steps only: see ``get_cudagraph_support``)."""
        prompt_lens = compat.required_prompt_lengths(md.prompt_lens)
        raw = not md.compressed_prefill
        for row in md.prompt_decode_rows:  # one-token prompt chunks, served by the decode kernel
            if row < len(prompt_lens):
                context = int(md.decode_seq_lens_cpu[row]) - 1
                ev.finish_chunk(int(md.block_table[row, 0]), query[row:row + 1], key[row:row + 1],
                                value[row:row + 1], kv_cache, md.block_table[row], int(prompt_lens[row]), context,
                                self.scale, output[row:row + 1], raw)
        if not md.num_prefill_tokens:
            return
        bounds = (md.prefill_starts_cpu + md.num_decode_tokens).tolist()
        totals = md.prefill_seq_lens_cpu.tolist()
        for j, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            row = md.first_prefill + j
            if row >= len(prompt_lens):  # warm-up and capture runs: rows with no request behind them
                break
            prompt_len, context = int(prompt_lens[row]), totals[j] - (e - s)
            if context < prompt_len:
                ev.finish_chunk(int(md.block_table[row, 0]), query[s:e], key[s:e], value[s:e], kv_cache,
                                md.block_table[row], prompt_len, context, self.scale, output[s:e], raw)
            elif e > s:
                output[s:e] = ev.extend(query[s:e], kv_cache, md.block_table[row], prompt_len, context, self.scale)

    def _prefill(self, q, k, v, cache, md: KVPlugCudaMetadata, out) -> None:
        """Causal attention of each prefill (packed, ``md.prefill_starts``): over the stored cache
        with ``compressed_prefill``, otherwise over its own raw tokens."""
        if md.compressed_prefill:
            rows = slice(md.first_prefill, md.first_prefill + len(md.prefill_starts_cpu) - 1)
            if md.max_prefill_len < self.dense_from:
                self._in_page_basis(lambda q, out: triton_ops.paged_attention(
                    q, cache, self.layout, md.block_table[rows], md.prefill_starts, md.seq_lens[rows], self.scale,
                    max_query_len=md.max_prefill_len, out=out), q, out)
            else:
                self._in_page_basis(lambda q, out: self._dense_over_cache(q, cache, md, rows, out), q, out)
            return
        _varlen_attention(q, k, v, md.prefill_starts, md.prefill_starts, md.prefill_starts_cpu.tolist(),
                          md.prefill_starts_cpu.tolist(), md.max_prefill_len, md.max_prefill_len, self.scale, out)

    def _dense_over_cache(self, q, cache, md: KVPlugCudaMetadata, rows: slice, out) -> None:
        """The prefills' sequences decoded (:func:`~kvplug.triton_ops.dequantize_kv`) in groups of
        at most :data:`DENSE_TOKENS` tokens, each group one varlen attention call (the chunk's
        queries at the end of its sequence: causal aligned bottom-right)."""
        lens = md.prefill_seq_lens_cpu.tolist()
        qstart = md.prefill_starts_cpu.tolist()
        seq_lens, tables = md.seq_lens[rows], md.block_table[rows]
        a = 0
        while a < len(lens):
            b, total = a + 1, lens[a]
            while b < len(lens) and total + lens[b] <= DENSE_TOKENS:
                total += lens[b]
                b += 1
            sl = seq_lens[a:b]
            cu_k = F.pad(sl.cumsum(0, dtype=torch.int32), (1, 0))
            keys, values = triton_ops.dequantize_kv(cache, self.layout, tables[a:b], sl, cu_k, total=total,
                                                    max_seq_len=max(lens[a:b]), dtype=q.dtype)
            q0, q1 = qstart[a], qstart[b]
            cu_q_cpu = [x - q0 for x in qstart[a:b + 1]]
            _varlen_attention(q[q0:q1], keys, values, md.prefill_starts[a:b + 1] - q0, cu_k, cu_q_cpu,
                              [0, *itertools.accumulate(lens[a:b])], max(y - x for x, y in zip(cu_q_cpu, cu_q_cpu[1:])),
                              max(lens[a:b]), self.scale, out[q0:q1])
            a = b


def _varlen_attention(q, k, v, cu_q, cu_k, cu_q_cpu: list[int], cu_k_cpu: list[int], max_q: int, max_k: int,
                      scale: float, out) -> None:
    """Causal varlen attention, each sequence's queries the last of its keys (bottom-right):
    vLLM's FlashAttention kernel on CUDA, torch SDPA per sequence where vLLM has none."""
    fa = _flash_attn() if q.is_cuda else None
    if fa is not None:
        varlen, version = fa
        varlen(q, k, v, max_seqlen_q=max_q, cu_seqlens_q=cu_q, max_seqlen_k=max_k, cu_seqlens_k=cu_k,
               softmax_scale=scale, causal=True, out=out, fa_version=version)
        return
    for s in range(len(cu_q_cpu) - 1):
        qa, qb, ka, kb = cu_q_cpu[s], cu_q_cpu[s + 1], cu_k_cpu[s], cu_k_cpu[s + 1]
        if qb > qa:  # the queries at positions (kb - ka) - (qb - qa) ..
            out[qa:qb] = attend(q[qa:qb], k[ka:kb].transpose(0, 1), v[ka:kb].transpose(0, 1), scale,
                                (kb - ka) - (qb - qa))


@functools.cache
def _flash_attn():
    """vLLM's FlashAttention varlen kernel and version, or None where vLLM has none (CPU builds)."""
    try:
        from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func, get_flash_attn_version
    except ImportError:
        return None
    return flash_attn_varlen_func, get_flash_attn_version()
