"""Bytes per token and quality of a saved prefix: kvplug's codecs against the CacheGen encoder.

For each context length, held-out text of the reference model (or ``--model``) is run as a prompt
into a cache. The cache is saved with ``KVPlugCache.to_bytes`` (the codec's codes, or a
full-precision cache coded by ``CacheGen``) and loaded again. The continuation's perplexity is
then measured, one token at a time. Printed: blob bytes per prompt token, the ratio to bf16 K/V,
and perplexity against the live full-precision cache.

    python benchmarks/cachegen_quality.py --contexts 1024,4096 --continuation 64 --sequences 2
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F


def main() -> None:
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kvplug.hf
    from kvplug.cachegen import CacheGen
    from kvplug.retrieval import load_heldout_ids

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "models" / "kvplug-ref"))
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--continuation", type=int, default=64)
    ap.add_argument("--sequences", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    source = load_heldout_ids(args.model, AutoTokenizer.from_pretrained(args.model))
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    bf16_per_token = text.num_hidden_layers * text.num_key_value_heads * head_dim * 2 * 2
    variants = [("none (fp32 codes)", "none", None), ("int8", "int8", None), ("int4", "int4", None),
                ("mixed", "mixed", None), ("cachegen(8/6)", "none", CacheGen()),
                ("cachegen(6/4)", "none", CacheGen(bits=6, deep_bits=4)),
                ("cachegen(5/3)", "none", CacheGen(bits=5, deep_bits=3))]
    print(f"model {args.model}: {text.num_hidden_layers} layers, {text.num_key_value_heads} KV heads, d={head_dim}; "
          f"bf16 K/V = {bf16_per_token} bytes per token")
    for context in (int(c) for c in args.contexts.split(",")):
        rows = {}
        for s in range(args.sequences):
            start = 1000 + s * (context + args.continuation + 97)
            ids = torch.tensor([source[start:start + context + args.continuation]])
            for name, spec, encoder in variants:
                t0 = time.perf_counter()
                with torch.no_grad():
                    cache = kvplug.hf.cache(model, spec, paged=False)
                    logits = model(input_ids=ids[:, :context], past_key_values=cache).logits[:, -1]
                    blob = cache.to_bytes(model, encoder)
                    loaded = kvplug.hf.load(model, blob)
                    nll = 0.0
                    for t in range(args.continuation):
                        nll += float(F.cross_entropy(logits.float(), ids[:, context + t]))
                        if t + 1 < args.continuation:
                            logits = model(input_ids=ids[:, context + t:context + t + 1],
                                           past_key_values=loaded).logits[:, -1]
                row = rows.setdefault(name, {"bytes": 0, "nll": 0.0, "s": 0.0})
                row["bytes"] += len(blob) / context
                row["nll"] += nll / args.continuation
                row["s"] += time.perf_counter() - t0
        base = rows["none (fp32 codes)"]["nll"] / args.sequences
        print(f"\ncontext {context}, {args.sequences} sequences x {args.continuation} tokens")
        print("| blob | bytes per token | vs bf16 K/V | ppl (vs live fp32) | seconds |")
        print("|---|---|---|---|---|")
        for name, row in rows.items():
            per_token = row["bytes"] / args.sequences
            nll = row["nll"] / args.sequences
            print(f"| {name} | {per_token:,.0f} | {bf16_per_token / per_token:.2f}x | {math.exp(nll):.3f} "
                  f"({math.exp(nll - base) - 1:+.2%}) | {row['s']:.1f} |")


if __name__ == "__main__":
    main()
