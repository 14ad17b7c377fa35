"""``kvplug bench``: decode speed and memory of kvplug caches in HF transformers, beside
DynamicCache, HF's offloaded DynamicCache and HF's QuantizedCache.

For each (batch, context) and each cache: prefill ``context`` random tokens (one forward,
``logits_to_keep=1``), then time single-token decode steps; report the median ms per step,
generated tokens/s, the K/V bytes the cache holds (and of them, those on the accelerator), and on
CUDA the peak memory over the weights, over the whole run and over the decode steps alone.
Random weights (``--preset``) or any checkpoint (``--model``): speed and memory do not depend on
the weights.
"""

from __future__ import annotations

import statistics
import time

import torch
from rich.table import Table

import kvplug.hf
from kvplug.config import split_paged
from kvplug.memory import device_bytes, held_bytes
from transformers import DynamicCache


PRESETS = {
    # 2 layers, GQA 4:1, head_dim 64: runs in seconds on a laptop CPU
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, vocab_size=4096),
    # the attention shape of ../shared/gpu/README.md's measurements (8 layers, 32q/8kv, d=128)
    "llama-8l": dict(hidden_size=4096, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=8192),
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_cache(name: str, model):
    """``DynamicCache``, ``OffloadedCache`` (HF's DynamicCache with ``offloading=True``: whole
    layers moved to and from host memory), ``QuantizedCache-4``/``-2`` (HF's, quanto backend), a
    kvplug spec, or ``paged:SPEC`` / ``ref:SPEC`` (that spec in the paged layout / on the
    reference path); ``graph:`` before a kvplug cache replays its decode step as a CUDA graph
    (:class:`kvplug.hf.DecodeGraph`)."""
    if name == "DynamicCache":
        return DynamicCache(config=model.config)
    if name == "OffloadedCache":
        return DynamicCache(config=model.config, offloading=True)
    if name.startswith("QuantizedCache"):
        from transformers import QuantizedCache

        bits = int(name.split("-")[1])
        return QuantizedCache(backend="quanto", config=model.config, nbits=bits, q_group_size=64, residual_length=128)
    spec, paged = split_paged(name.removeprefix("graph:"))
    return kvplug.hf.cache(model, spec, paged=paged)


def bench(model, name, batch, context, steps, device, gen) -> dict:
    """One row: prefill ``context`` random tokens for ``batch`` sequences, then time ``steps`` steps."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == "cuda" else 0
    cache = make_cache(name, model)
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        if device == "cuda":
            sync(device)
            whole_peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        # graph: the first step runs eagerly and captures; the median below skips it
        graph = kvplug.hf.DecodeGraph(model, cache, max_new_tokens=steps) if name.startswith("graph:") else None
        times = []
        for _ in range(steps):
            sync(device)
            start = time.perf_counter()
            if graph is None:
                out = model(input_ids=token, past_key_values=cache, logits_to_keep=1)
                token = out.logits[:, -1:].argmax(-1)
            else:
                token = graph(token).argmax(-1, keepdim=True)
            sync(device)
            times.append(time.perf_counter() - start)
    ms = statistics.median(times[2:] if steps > 4 else times) * 1e3
    row = dict(cache=name, batch=batch, context=context, ms_per_step=ms, tokens_per_s=batch / ms * 1e3,
               kv_bytes=held_bytes(cache), device_kv_bytes=device_bytes(cache, device))
    if device == "cuda":
        decode_peak = torch.cuda.max_memory_allocated()
        row["peak_gib_over_weights"] = (max(whole_peak, decode_peak) - base) / 2**30
        row["decode_peak_gib_over_weights"] = (decode_peak - base) / 2**30
    del cache, out, graph
    return row


def load_model(model: str | None, preset: str, device: str, dtype: torch.dtype):
    """A checkpoint (``model``) or a random Llama of ``preset``, on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if model:
        net = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    else:
        net = LlamaForCausalLM(LlamaConfig(**PRESETS[preset], max_position_embeddings=131072)).to(dtype)
    return net.to(device).eval()


def run(model, caches, batches, contexts, steps, device, console=None) -> list[dict]:
    """Rows of :func:`bench` for every combination; a failing cache becomes a row with its error."""
    if device.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN re-plans per KV length (docs/BENCHMARKS.md)
    kvplug.hf.cache(model, "none")  # switches attention to kvplug (plain SDPA for other caches)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in batches:
        for context in contexts:
            for name in caches:
                try:
                    rows.append(bench(model, name, batch, context, steps, device, gen))
                except Exception as e:  # one failing cache must not hide the others
                    rows.append(dict(cache=name, batch=batch, context=context, error=f"{type(e).__name__}: {e}"[:160]))
                if console is not None:
                    console.print(rows[-1])
    return rows


def table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in ("B", "context", "cache", "ms/step", "tokens/s", "KV MiB held", "of it on the device",
                "peak GiB over weights", "decode peak"):
        t.add_column(col)
    for r in rows:
        if "error" in r:
            t.add_row(str(r["batch"]), str(r["context"]), r["cache"], "error", r["error"][:60], "", "", "", "")
            continue
        peak, decode_peak = r.get("peak_gib_over_weights"), r.get("decode_peak_gib_over_weights")
        t.add_row(str(r["batch"]), str(r["context"]), r["cache"], f"{r['ms_per_step']:.2f}",
                  f"{r['tokens_per_s']:.0f}", f"{r['kv_bytes'] / 2**20:.1f}", f"{r['device_kv_bytes'] / 2**20:.1f}",
                  "-" if peak is None else f"{peak:.2f}", "-" if decode_peak is None else f"{decode_peak:.2f}")
    return t
