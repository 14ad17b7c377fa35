"""``vllm serve`` with a kvplug strategy under load, as a user runs it: hundreds of concurrent
requests through the ``openai`` client, vLLM's defaults on (chunked prefill, prefix caching),
in a KV pool small enough to preempt against one that holds them all.

    python benchmarks/vllm_serve_load.py --model models/kvplug-ref --specs int8,int4 --eager --dtype float32

Per spec, two servers one after the other (``--small-kv`` and ``--large-kv`` bytes of KV memory)
answer the same requests (``--requests`` of 20-700 random prompt tokens, 16 greedy tokens each,
``--concurrency`` at once; a quarter of them repeat an earlier request's first 256 tokens, so the
prefix cache has something to hit). Printed per spec: completions that differ between the pools
(they must not: every step attends over the stored pages, so preemption and batching change
nothing, up to a near tie: the large pool's top-2 log-probability gap is printed where a completion
first differs), failed requests, vLLM's own preemption and prefix-cache counters (``/metrics``), and the
KV usage once idle (it must be back to 0).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import re
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_serve_check import free_port, serve_command, serving  # noqa: E402


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for name in ("vllm:num_preemptions_total", "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
                 "vllm:kv_cache_usage_perc", "vllm:num_requests_running"):
        m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
        if m:
            out[name.split(":", 1)[1]] = float(m.group(1))
    return out


def _gap(top: dict | None) -> float:
    vals = sorted((top or {}).values(), reverse=True)
    return vals[0] - vals[1] if len(vals) > 1 else float("inf")


def requests(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out: list[list[int]] = []
    for i in range(n):
        p = [rng.randrange(1, vocab) for _ in range(rng.randint(20, 700))]
        if i >= 4 and rng.random() < 0.25:  # share an earlier request's first 256 tokens
            base = out[rng.randrange(len(out))]
            p = base[:256] + p[: max(0, len(p) - 256)] if len(base) >= 256 else p
        out.append(p)
    return out


def run_server(args, spec: str, kv_bytes: int, prompts: list[list[int]], log: Path) -> dict:
    port = free_port()
    cmd = serve_command(args.model) + [
        "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype, "--max-model-len", "1024",
        "--kv-cache-memory-bytes", str(kv_bytes), "--seed", "0", "--max-num-seqs", str(args.concurrency),
        "--additional-config", json.dumps({"kvplug": spec})] + (["--enforce-eager"] if args.eager else [])
    with serving(cmd, log, port, args.start_timeout):
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600, max_retries=0)

        def one(p: list[int]):
            try:
                r = client.completions.create(model=args.model, prompt=p, max_tokens=16, temperature=0, logprobs=2)
                lp = r.choices[0].logprobs
                gaps = [_gap(top) for top in (lp.top_logprobs or [])]
                return {"tokens": list(lp.tokens or []), "gaps": gaps}
            except Exception as e:  # counted, not raised: a failed request is a finding
                return e

        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            texts = list(pool.map(one, prompts))
        wall = time.perf_counter() - t
        time.sleep(2)
        metrics = _metrics(port)
    kv_log = re.search(r"KV cache size: ([\d,]+) tokens", log.read_text())
    return {"texts": texts, "wall_s": wall, "metrics": metrics,
            "capacity": int(kv_log.group(1).replace(",", "")) if kv_log else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "models" / "kvplug-ref"))
    ap.add_argument("--specs", default="int8,int4")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=48)
    ap.add_argument("--small-kv", type=int, default=3_000_000, help="KV bytes of the pool that preempts")
    ap.add_argument("--large-kv", type=int, default=200_000_000, help="KV bytes of the pool that holds all")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (the CPU)")
    ap.add_argument("--start-timeout", type=int, default=300)
    ap.add_argument("--out", default="/tmp/vllm_serve_load")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    prompts = requests(args.requests, vocab, seed=0)
    print(f"{len(prompts)} requests of {min(map(len, prompts))}-{max(map(len, prompts))} prompt tokens, "
          f"16 generated, {args.concurrency} at once; pools {args.small_kv:,} and {args.large_kv:,} bytes", flush=True)
    for spec in args.specs.split(","):
        res = {}
        for name, kv in (("small", args.small_kv), ("large", args.large_kv)):
            safe = re.sub(r"[^A-Za-z0-9]", "_", f"{spec}-{name}")
            res[name] = run_server(args, spec, kv, prompts, out / f"{safe}.log")
            r = res[name]
            failed = sum(isinstance(x, Exception) for x in r["texts"])
            print(f"{spec} {name} pool ({r['capacity']} tokens): {r['wall_s']:.0f} s, {failed} failed, "
                  f"metrics {r['metrics']}", flush=True)
        small, large = res["small"]["texts"], res["large"]["texts"]
        gaps = []  # the large pool's top-2 gap (nats) where a completion first differs
        for a, b in zip(small, large):
            if isinstance(a, dict) and isinstance(b, dict) and a["tokens"] != b["tokens"]:
                j = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), 0)
                gaps.append(round(b["gaps"][j], 4) if j < len(b["gaps"]) else None)
        print(f"{spec}: {len(gaps)} of {len(prompts)} completions differ between the pools; the large pool's "
              f"top-2 log-probability gap where each first differs: {gaps}", flush=True)
        (out / f"{re.sub(r'[^A-Za-z0-9]', '_', spec)}.json").write_text(json.dumps(
            {k: {**v, "texts": [x if isinstance(x, dict) else repr(x) for x in v["texts"]]} for k, v in res.items()}))


if __name__ == "__main__":
    main()
