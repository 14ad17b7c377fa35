"""A RAG-like workload through ``kvplug.hf.DocumentStore``: time to first token with document reuse
against recomputing every prompt.

A pool of ``--pool`` documents (``--doc`` tokens of held-out text each) is built, and ``--prompts``
prompts are drawn: ``--per-prompt`` documents by a Zipf law (exponent ``--zipf``), then a
question (``--question`` tokens). Documents are sorted by their pool index, so that shared
prefixes can be reused. Each prompt is prefilled twice:

- recompute: one forward of the whole prompt into a fresh ``--spec`` cache;
- the store: the longest cached document prefix is loaded, and the rest computed.

Printed per prompt: the time of both, whether the store hit and how many tokens it reused, and
whether the next greedy token agrees. At the end: median TTFT of each, the hit rate, the stored
bytes per token and the agreement.

    python benchmarks/rag_reuse.py --pool 8 --prompts 16 --per-prompt 3 --doc 1024 --spec int8
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch


def main() -> None:
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kvplug.hf
    from kvplug.retrieval import load_heldout_ids

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "models" / "kvplug-ref"))
    ap.add_argument("--spec", default="int8")
    ap.add_argument("--pool", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--per-prompt", type=int, default=3)
    ap.add_argument("--doc", type=int, default=1024)
    ap.add_argument("--question", type=int, default=32)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--memory-mib", type=float, default=1024)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    source = load_heldout_ids(args.model, AutoTokenizer.from_pretrained(args.model))
    rng = random.Random(args.seed)
    docs = [source[i * args.doc:(i + 1) * args.doc] for i in range(args.pool)]
    weights = [1 / (k + 1) ** args.zipf for k in range(args.pool)]
    store = kvplug.hf.DocumentStore(model, args.spec, memory_bytes=int(args.memory_mib * 2**20))

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    rows = []
    for p in range(args.prompts):
        chosen = sorted(set(rng.choices(range(args.pool), weights, k=args.per_prompt)))
        start = rng.randrange(args.pool * args.doc, len(source) - args.question)
        question = source[start:start + args.question]
        prompt = [t for i in chosen for t in docs[i]] + question
        with torch.no_grad():
            sync()
            t0 = time.perf_counter()
            cache = kvplug.hf.cache(model, args.spec)
            full = model(input_ids=torch.tensor([prompt], device=args.device), past_key_values=cache,
                         logits_to_keep=1).logits[:, -1]
            sync()
            t1 = time.perf_counter()
            hits, reused = store.stats["hits"], store.stats["reused_tokens"]
            _, logits = store.prefill([docs[i] for i in chosen], question)
            sync()
            t2 = time.perf_counter()
        rows.append(dict(recompute=t1 - t0, store=t2 - t1, hit=store.stats["hits"] > hits,
                         reused=store.stats["reused_tokens"] - reused, tokens=len(prompt),
                         agree=bool(full.argmax(-1) == logits.argmax(-1))))
        r = rows[-1]
        print(f"prompt {p:2d}: docs {chosen} ({r['tokens']} tokens) recompute {r['recompute'] * 1e3:7.1f} ms, store "
              f"{r['store'] * 1e3:7.1f} ms, hit {r['hit']} (reused {r['reused']}), next token agrees {r['agree']}")
    hits = [r for r in rows if r["hit"]]
    held = store.memory_used()
    stored_tokens = sum(n.tokens for n in store._nodes() if n.blob is not None)
    print(f"\n{args.spec}, {args.device}: median TTFT recompute {statistics.median(r['recompute'] for r in rows) * 1e3:.1f} "
          f"ms, store {statistics.median(r['store'] for r in rows) * 1e3:.1f} ms; on hits "
          f"{statistics.median(r['store'] for r in hits) * 1e3 if hits else float('nan'):.1f} ms against "
          f"{statistics.median(r['recompute'] for r in hits) * 1e3 if hits else float('nan'):.1f}; hit rate "
          f"{len(hits)}/{len(rows)}; stored {held / max(stored_tokens, 1):.0f} bytes per stored token; next token "
          f"agrees {sum(r['agree'] for r in rows)}/{len(rows)}")


if __name__ == "__main__":
    main()
