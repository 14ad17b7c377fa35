"""kvplug's attention backend for vLLM on the CPU platform (imports vLLM).

:class:`KVPlugCPUBackend` subclasses vLLM's CPU backend; :mod:`kvplug.adapters.vllm` routes the
platform's choice here only when a strategy is selected. With a strategy:

* the layer's KV-cache spec reports the codec's bytes per token-head (``customize_spec``), so
  vLLM sizes each page, and so the number of blocks, from the compressed size;
* the impl stores and reads that page itself (:class:`~.layout.PagedKV`, the core's PyTorch
  codecs): store = encode + scatter into the step's slots; attention = SDPA over the request's
  tokens, dequantized through its block-table row. A request's first step (no cached context)
  attends over its own uncompressed K/V, as the HF adapter does at prefill; later steps attend
  over the decoded cache, the new tokens included (as the HF adapter does while generating).
  With ``additional_config["kvplug_prefill"] = "compressed"`` the first step reads the decoded
  cache too, so output does not depend on prefix-cache hits or chunking (see ``prefill_mode``);
* with a scorer (eviction), the spec is :class:`~.manager.KVPlugEvictingSpec`, whose manager
  frees the blocks a request's eviction empties, and the impl compacts each layer's kept tokens into the
  slots that stay and reads only those (:mod:`.compaction`, :mod:`.eviction`).

On CUDA, :mod:`.cuda_backend` keeps the same page bytes (the layout is the Triton one), stores
and attends with :mod:`kvplug.triton_ops` and evicts with the same :mod:`.compaction` code (h2o
and tova run here only). Without a strategy (an engine in the same process that does not select
one) every call goes to vLLM's own CPU implementation unchanged.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from kvplug.codecs.none import NoCodec

from . import compat, layer_spec, prefill_mode, selected_strategy
from .capabilities import Engine, Support, check_head_sizes, check_layer, cpu_page, resolve_configured
from .compaction import LayerEviction, attend
from .layout import PagedKV, TokenLayout


class KVPlugCPUBackend(CPUAttentionBackend):
    """vLLM's CPU attention backend with a kvplug-compressed paged KV cache. The class that
    serves an engine is its subclass carrying the engine (:func:`.capabilities.configured`)."""

    kvplug = True
    forward_includes_kv_cache_update = True  # the impl stores in forward (also when passing through)
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]
    kvplug_support: ClassVar[Support] = Support(
        platform="CPU", page=cpu_page, replaces_on_decode=True, raw_prefill_with_context=True,
        encoder_attention=True)
    engine: ClassVar[Engine | None] = None

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # torch SDPA over the decoded K/V: any head size (the codec checks its own)

    @staticmethod
    def get_impl_cls() -> type[KVPlugCPUImpl]:
        return KVPlugCPUImpl

    @classmethod
    def _layout(cls, head_size: int) -> TokenLayout | None:
        if cls.engine is None or isinstance(cls.engine.strategy.codec, NoCodec):
            return None
        return _token_layout(cls.engine.strategy.codec, head_size, cls.engine.torch_dtype)

    @classmethod
    def customize_spec(cls, spec):
        stock = getattr(super(), "customize_spec", None)  # 0.32; 0.26 calls this from compat's hook
        spec = stock(spec) if stock is not None else spec
        if cls.engine is None:
            return spec
        layout = cls._layout(spec.head_size)
        if layout is not None:
            check_head_sizes(spec, layout.head_dim)
        return layer_spec(spec, None if layout is None else layout.token_bytes, cls.engine.evicting)

    @classmethod
    def get_kv_cache_shape(cls, num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
        """0.26 only (0.32 derives the shape from the spec)."""
        layout = cls._layout(head_size)
        if layout is None:
            return num_blocks, num_kv_heads, block_size, 2 * head_size
        return compat.kv_cache_shape(num_blocks, block_size, num_kv_heads, layout.token_bytes)


@functools.cache
def _token_layout(codec, head_size: int, dtype: torch.dtype) -> TokenLayout:
    return TokenLayout.for_codec(codec, head_size, dtype)


def __getattr__(name: str):
    """vLLM imports the configured class by name, in whichever process it needs it."""
    return resolve_configured(KVPlugCPUBackend, name)


class KVPlugCPUImpl(CPUAttentionBackendImpl):
    """Stores this step's K/V compressed, attends with torch SDPA over the decoded cache."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None, **kwargs):
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks, **kwargs)
        config = compat.current_config()
        strategy = selected_strategy(config)
        self.paged: PagedKV | None = None
        if strategy is None:
            return
        if attn_type != AttentionType.DECODER:
            return  # encoder attention keeps no KV cache: vLLM's own path
        check_layer(KVPlugCPUBackend, strategy, sliding_window=sliding_window, alibi_slopes=alibi_slopes,
                    logits_soft_cap=logits_soft_cap, sinks=sinks,
                    kv_sharing_target_layer_name=kv_sharing_target_layer_name)
        dtype = getattr(getattr(config, "model_config", None), "dtype", None) or torch.get_default_dtype()
        self.paged = PagedKV(_token_layout(strategy.codec, head_size, dtype))
        self.raw_prefill = prefill_mode(config) == "uncompressed"
        self.strategy = strategy
        self.num_layers = config.model_config.get_total_num_hidden_layers()
        self.eviction: LayerEviction | None = None  # made at the first step, when the layer's name is known

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if self.paged is None:
            return self._stock_forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                       output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("kvplug: fused output quantization is not supported")
        if attn_metadata is None:  # warm-up / profiling run
            return output
        n = attn_metadata.num_actual_tokens
        query, key, value = query[:n], key[:n], value[:n]
        self.paged.store(kv_cache, key, value, attn_metadata.slot_mapping[:n])
        starts = attn_metadata.query_start_loc.tolist()
        totals = attn_metadata.seq_lens.tolist()
        table = attn_metadata.block_table
        prompts = (compat.required_prompt_lengths(getattr(attn_metadata, compat.PROMPT_LENS, None))
                   if self.strategy.evicts else None)
        for i in range(len(starts) - 1):
            s, e = starts[i], starts[i + 1]
            if e <= s:
                continue
            context = totals[i] - (e - s)
            if prompts is not None and i < len(prompts):
                output[s:e] = self._evicting(layer, query[s:e], key[s:e], value[s:e], kv_cache, table[i],
                                             int(prompts[i]), context, totals[i])
                continue
            if context == 0 and self.raw_prefill:  # first step of the request: its own uncompressed K/V
                keys, values = key[s:e].transpose(0, 1), value[s:e].transpose(0, 1)
            else:
                keys, values = self.paged.gather(kv_cache, table[i], totals[i])
            output[s:e] = attend(query[s:e], keys, values, self.scale, context)
        return output

    def _evicting(self, layer, query, key, value, kv_cache, block_ids, prompt_len: int, context: int,
                  total: int) -> torch.Tensor:
        """One request's step with eviction (:mod:`.compaction`). The prompt's tokens attend over
        the decoded cache (``compressed``) or, its whole prompt in this step, over its raw K/V
        (``uncompressed``, the HF adapter's prefill); the chunk that ends the prompt then keeps the
        selected tokens; tokens after the prompt (a preempted request's re-run, alone or in this
        step) see what the HF adapter's decode steps saw. Later steps read the kept tokens and the
        new ones."""
        ev = self.eviction
        if ev is None:
            from vllm.model_executor.models.utils import extract_layer_index

            ev = self.eviction = LayerEviction(self.strategy, self.paged, extract_layer_index(layer.layer_name),
                                               self.num_layers)
        if context >= prompt_len:
            return ev.extend(query, kv_cache, block_ids, prompt_len, context, self.scale)
        m = min(total, prompt_len) - context
        if self.raw_prefill:
            keys, values = key[:m].transpose(0, 1), value[:m].transpose(0, 1)
        else:
            keys, values = self.paged.gather(kv_cache, block_ids, context + m)
        out = torch.empty_like(query)
        out[:m] = attend(query[:m], keys, values, self.scale, context)
        ev.finish_chunk(int(block_ids[0]), query, key, value, kv_cache, block_ids, prompt_len, context, self.scale,
                        out, self.raw_prefill, read=(keys, values))
        return out

    def _stock_forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                       output_block_scale):
        """vLLM's own CPU path (this backend stores in forward, so store first as vLLM would)."""
        if (attn_metadata is not None and key is not None and value is not None
                and self.kv_sharing_target_layer_name is None):
            n = attn_metadata.num_actual_tokens
            self.do_kv_cache_update(layer, key[:n], value[:n], kv_cache, attn_metadata.slot_mapping[:n])
        return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                               output_block_scale)
