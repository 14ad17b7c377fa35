"""Decode speed and memory of kvplug caches in HF transformers, beside DynamicCache and HF's QuantizedCache.

For each (batch, context) and each cache: prefill ``context`` random tokens (one forward,
``logits_to_keep=1``), then time ``--steps`` single-token decode steps; report the median ms per
step, generated tokens/s, the K/V bytes the cache holds, and on CUDA the peak memory over the
weights. Random weights: speed and memory do not depend on them.

    python benchmarks/hf_decode.py --preset tiny --device cpu --batch 1 --contexts 1024,4096
    python benchmarks/hf_decode.py --preset llama-8l --device cuda --batch 1,8 --contexts 8192,32768
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvplug.hf

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
    if name == "DynamicCache":
        return DynamicCache(config=model.config)
    if name.startswith("QuantizedCache"):
        from transformers import QuantizedCache

        bits = int(name.split("-")[1])
        return QuantizedCache(backend="quanto", config=model.config, nbits=bits, q_group_size=64, residual_length=128)
    return kvplug.hf.cache(model, name)


def tensor_bytes(t) -> int:
    """Bytes of a tensor, looking inside tensor subclasses (quanto's packed QTensors)."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def held_bytes(cache) -> int:
    if hasattr(cache, "stored_bytes"):
        return cache.stored_bytes()
    total = 0
    for layer in cache.layers:
        for attr in ("keys", "values", "_quantized_keys", "_quantized_values"):
            t = getattr(layer, attr, None)
            if isinstance(t, torch.Tensor):
                total += tensor_bytes(t)
    return total


def bench(model, name, batch, context, steps, device, gen) -> dict:
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
        times = []
        for _ in range(steps):
            sync(device)
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            sync(device)
            times.append(time.perf_counter() - start)
    ms = statistics.median(times[2:] if steps > 4 else times) * 1e3
    row = dict(cache=name, batch=batch, context=context, ms_per_step=ms, tokens_per_s=batch / ms * 1e3,
               kv_bytes=held_bytes(cache))
    if device == "cuda":
        row["peak_gib_over_weights"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    del cache, out
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", default="1")
    parser.add_argument("--contexts", default="1024,4096")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--caches", default="DynamicCache;QuantizedCache-4;QuantizedCache-2;none;int4;kivi(bits=2);"
                                            "snapkv(budget=25%)+int4",
                        help="';'-separated: DynamicCache, QuantizedCache-4/-2 (needs optimum-quanto), kvplug specs")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN re-plans per KV length (see docs/BENCHMARKS.md)
    torch.manual_seed(0)
    config = LlamaConfig(**PRESETS[args.preset], max_position_embeddings=131072)
    model = LlamaForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    kvplug.hf.cache(model, "none")  # switches attention to kvplug (plain SDPA for other caches)
    gen = torch.Generator().manual_seed(0)
    console = Console()
    rows = []
    for batch in map(int, args.batch.split(",")):
        for context in map(int, args.contexts.split(",")):
            for name in args.caches.split(";"):
                try:
                    rows.append(bench(model, name, batch, context, args.steps, args.device, gen))
                except Exception as e:  # one failing cache must not hide the others
                    rows.append(dict(cache=name, batch=batch, context=context, error=f"{type(e).__name__}: {e}"[:120]))
                console.print(rows[-1])
    table = Table(title=f"HF decode, {args.preset}, {args.dtype}, {args.device}")
    for col in ("B", "context", "cache", "ms/step", "tokens/s", "KV MiB held", "peak GiB over weights"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row(str(r["batch"]), str(r["context"]), r["cache"], "error", r["error"], "", "")
            continue
        table.add_row(str(r["batch"]), str(r["context"]), r["cache"], f"{r['ms_per_step']:.2f}",
                      f"{r['tokens_per_s']:.0f}", f"{r['kv_bytes'] / 2**20:.1f}",
                      f"{r.get('peak_gib_over_weights', float('nan')):.2f}")
    console.print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
