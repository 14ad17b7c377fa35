"""vLLM on a RAG-like workload: time to first token with kvplug's KV connector, against recompute,
vLLM's prefix caching alone and vLLM's own CPU offload connector.

A pool of ``--docs`` documents (``--doc`` random token ids each) is made, and ``--prompts``
prompts are drawn (seed printed): ``--per-prompt`` documents by a Zipf law of exponent ``--zipf``
(without repeats, in pool order, so that prompts sharing their first documents share a prefix;
with ``--combos N`` from N fixed document sets, Zipf over the sets: questions that retrieve the
same documents), then a question of ``--question`` tokens. The GPU's KV memory is fixed (``--kv-bytes``) below what
the documents take, so vLLM's prefix cache alone evicts documents that come back later. Each
prompt is sent alone with one token to generate: its wall time is its time to first token.

Configurations (each its own engine process, one after another, same settings; prefix caching and
chunked prefill at vLLM's defaults, on, except ``recompute``):

- ``recompute``: prefix caching off: every prompt prefilled in full;
- ``prefix``: vLLM's prefix caching (bf16 pages);
- ``offload``: prefix caching + vLLM's ``SimpleCPUOffloadConnector`` (``--host-bytes`` of host memory);
- ``kvplug:SPEC``: prefix caching on kvplug's compressed pages (e.g. ``kvplug:int4``);
- ``kvplug:SPEC+connector``: the same + ``KVPlugConnector`` (pages stored byte for byte);
- ``connector`` / ``connector:CODEC``: vLLM's own pages + ``KVPlugConnector``, stored as they are
  or encoded by a kvplug codec (``connector:int8``).

``--chat C,T``: a multi-turn workload instead (as a chat grounded in documents): the first C
prompts open C conversations; in each of T rounds every conversation's prompt is sent (its first
token timed), then ``--answer`` tokens are generated and a ``--question``-token user message is
appended, so the next turn's prompt extends it; conversations interleave, so the GPU pool loses
them between turns. Generated tokens' blocks are what the connector must have stored.

Reported per configuration: median and mean TTFT (the first ``--warm`` prompts not counted), the
share of prompt tokens served from a cache (``num_cached_tokens``: prefix cache and connector
together), the connector's host bytes per stored token (from its log), and the agreement of the
first generated token with ``recompute`` (a mismatch where recompute's top-2 log-probabilities are
within 0.125 nats is counted as a tie).

    python benchmarks/vllm_rag.py --model random --configs recompute,prefix,offload,kvplug:int4,kvplug:int4+connector \\
        --docs 48 --doc 2048 --per-prompt 4 --prompts 64 --kv-bytes 2e9 --out /tmp/rag
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_serving import RANDOM_LLAMA, TIE_NATS, random_model, run_child  # noqa: E402


def workload(args, vocab: int) -> list[list[int]]:
    """The prompts: Zipf-drawn documents in pool order, then a question (seed ``args.seed``)."""
    rng = random.Random(args.seed)
    docs = [[rng.randrange(3, vocab) for _ in range(args.doc)] for _ in range(args.docs)]
    weights = [1 / (i + 1) ** args.zipf for i in range(args.docs)]

    def draw() -> list[int]:
        chosen: set[int] = set()
        while len(chosen) < args.per_prompt:
            chosen.add(rng.choices(range(args.docs), weights)[0])
        return sorted(chosen)

    combos = [draw() for _ in range(args.combos)]
    combo_weights = [1 / (i + 1) ** args.zipf for i in range(args.combos)]
    out = []
    for _ in range(args.warm + args.prompts):
        chosen = rng.choices(combos, combo_weights)[0] if combos else draw()
        question = [rng.randrange(3, vocab) for _ in range(args.question)]
        out.append([t for i in chosen for t in docs[i]] + question)
    return out


def engine_kwargs(args, config: str) -> dict:
    longest = args.per_prompt * args.doc + args.question + 16
    if args.chat:  # each turn adds an answer and a user message
        longest += int(args.chat.split(",")[1]) * (args.answer + args.question)
    kw = dict(model=args.model_path, dtype="bfloat16", max_model_len=longest,
              seed=0, kv_cache_memory_bytes=int(args.kv_bytes), enforce_eager=True, max_num_seqs=16)
    if args.model == "random":
        kw.update(load_format="dummy", skip_tokenizer_init=True)
    base, _, connector = config.partition("+")
    if base == "recompute":
        kw["enable_prefix_caching"] = False
    elif base.startswith("kvplug:"):
        kw["additional_config"] = {"kvplug": base.split(":", 1)[1]}
    if base == "offload":
        kw["kv_transfer_config"] = {"kv_connector": "SimpleCPUOffloadConnector", "kv_role": "kv_both",
                                    "kv_connector_extra_config": {"cpu_bytes_to_use": int(args.host_bytes)}}
    if connector == "connector" or base.startswith("connector"):
        extra = {"host_bytes": int(args.host_bytes)}
        if base.startswith("connector:"):
            extra["codec"] = base.split(":", 1)[1]
        kw["kv_transfer_config"] = {"kv_connector": "KVPlugConnector", "kv_role": "kv_both",
                                    "kv_connector_extra_config": extra}
    return kw


def child(job: dict) -> None:
    import hashlib

    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(**job["engine"])
    result = {"config": job["config"], "start_s": time.perf_counter() - t0, "ttft_s": [], "cached": [],
              "first": [], "gap": [], "prompt_len": [], "prompt_key": []}
    first = SamplingParams(temperature=0, max_tokens=1, logprobs=2, detokenize=False)

    def timed(p: list[int]) -> None:
        t = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": p}], first, use_tqdm=False)[0]
        wall = time.perf_counter() - t
        top = sorted((lp.logprob for lp in out.outputs[0].logprobs[0].values()), reverse=True)
        result["ttft_s"].append(wall)
        result["cached"].append(out.num_cached_tokens or 0)
        result["first"].append(out.outputs[0].token_ids[0])
        result["gap"].append(top[0] - top[1] if len(top) > 1 else float("inf"))
        result["prompt_len"].append(len(p))
        result["prompt_key"].append(hashlib.sha256(repr(p).encode()).hexdigest()[:16])
        if len(result["ttft_s"]) % 16 == 0:
            print(f"[rag] {job['config']}: {len(result['ttft_s'])} prompts", flush=True)

    chat = job.get("chat")
    if not chat:
        for p in job["prompts"]:
            timed(p)
    else:  # conversations, turns interleaved: prompt, timed first token, an answer, the next user message
        answer = SamplingParams(temperature=0, max_tokens=chat["answer"], ignore_eos=True, detokenize=False)
        history = [list(p) for p in job["prompts"][:chat["conversations"]]]
        for turn in range(chat["turns"]):
            for c, p in enumerate(history):
                timed(p)
                said = list(llm.generate([{"prompt_token_ids": p}], answer, use_tqdm=False)[0].outputs[0].token_ids)
                rng = random.Random(f"{chat['seed']}/{c}/{turn}")
                history[c] = p + said + [rng.randrange(3, chat["vocab"]) for _ in range(chat["message"])]
    Path(job["out"]).write_text(json.dumps(result))


def run_one(args, config: str, prompts: list[list[int]], out: Path) -> dict:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", config)
    job = {"config": config, "engine": engine_kwargs(args, config), "prompts": prompts, "out": str(out / f"{safe}.json")}
    if args.chat:
        conversations, turns = (int(x) for x in args.chat.split(","))
        job["chat"] = {"conversations": conversations, "turns": turns, "answer": args.answer,
                       "message": args.question, "seed": args.seed, "vocab": args.vocab}
    (out / f"{safe}.job.json").write_text(json.dumps(job))
    log = out / f"{safe}.log"
    rc = run_child([sys.executable, __file__, "--child", str(out / f"{safe}.job.json")], log, args.timeout)
    text = log.read_text(errors="replace")
    result = json.loads(Path(job["out"]).read_text()) if rc == 0 and Path(job["out"]).exists() else {"config": config}
    result["rc"] = rc
    m = re.search(r"(?:GPU|CPU) KV cache size: ([\d,]+) tokens", text)
    result["capacity"] = int(m.group(1).replace(",", "")) if m else None
    kept = re.findall(r"kvplug connector: .*; (\d+) blocks of (\d+) tokens, ([\d,]+) bytes kept", text)
    if kept:  # the connector's last report of what host memory holds
        blocks, block_size, nbytes = kept[-1]
        result["block_size"] = int(block_size)
        result["host_blocks"], result["host_bytes"] = int(blocks), int(nbytes.replace(",", ""))
    result["loaded_blocks"] = sum(int(n) for n in re.findall(r"kvplug connector: (\d+) block\(s\)", text))
    if rc != 0:
        result["error"] = "\n".join(text.splitlines()[-30:])
        print(f"[rag] {config} failed (rc {rc}):\n{result['error']}", flush=True)
    return result


def summary(args, results: list[dict], prompts: list[list[int]]) -> list[str]:
    base = next((r for r in results if r["config"] == "recompute" and "ttft_s" in r), None)
    lines = ["| config | KV tokens (GPU) | median TTFT ms | mean TTFT ms | vs recompute | cached share | "
             "host B/token | blocks loaded | first token = recompute |",
             "|---|---|---|---|---|---|---|---|---|"]
    skip = args.warm
    for r in results:
        if "ttft_s" not in r:
            lines.append(f"| {r['config']} | failed (rc {r['rc']}) | | | | | | | |")
            continue
        t = r["ttft_s"][skip:]
        med, mean = statistics.median(t) * 1e3, statistics.mean(t) * 1e3
        ratio = ""
        if base is not None:
            ratio = f"{statistics.mean(base['ttft_s'][skip:]) * 1e3 / mean:.2f}x"
        share = sum(r["cached"][skip:]) / sum(r["prompt_len"][skip:])
        per_token = ""
        if r.get("host_blocks") and r.get("block_size"):
            per_token = f"{r['host_bytes'] / (r['host_blocks'] * r['block_size']):,.0f}"
        agree = ""
        if base is not None:
            pairs = [(a, b, g) for a, b, g, ka, kb in zip(r["first"][skip:], base["first"][skip:], base["gap"][skip:],
                                                          r["prompt_key"][skip:], base["prompt_key"][skip:])
                     if ka == kb]  # the same prompt (in a chat, earlier answers may differ)
            same = sum(a == b for a, b, _ in pairs)
            ties = sum(a != b and g <= TIE_NATS for a, b, g in pairs)
            agree = f"{same}/{len(pairs)}" + (f" (+{ties} ties)" if ties else "")
        lines.append(f"| {r['config']} | {r['capacity'] or 0:,} | {med:.1f} | {mean:.1f} | {ratio} | {share:.1%} | "
                     f"{per_token} | {r.get('loaded_blocks') or ''} | {agree} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child")
    ap.add_argument("--model", default="random", help="'random' (a random-weight Llama) or a checkpoint")
    ap.add_argument("--configs", default="recompute,prefix,offload,kvplug:int4,kvplug:int4+connector")
    ap.add_argument("--docs", type=int, default=48)
    ap.add_argument("--doc", type=int, default=2048, help="tokens per document")
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--question", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--warm", type=int, default=4, help="first prompts not counted")
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--combos", type=int, default=0,
                    help="draw each prompt's documents from this many fixed sets (Zipf over the sets: questions "
                         "that retrieve the same documents); 0: documents drawn per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat", default="", help="C,T: a multi-turn workload instead: C conversations (the first C "
                    "prompts), T turns each, interleaved; each turn the first token is timed, then --answer tokens "
                    "are generated and a --question-token user message follows")
    ap.add_argument("--answer", type=int, default=128, help="tokens generated per turn (--chat)")
    ap.add_argument("--kv-bytes", type=float, default=2e9, help="GPU KV-cache memory in bytes, every engine")
    ap.add_argument("--host-bytes", type=float, default=16e9, help="host memory of the offloading connectors")
    ap.add_argument("--timeout", type=int, default=500)
    ap.add_argument("--out", default="/tmp/vllm_rag")
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(Path(args.child).read_text()))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.model_path = random_model(out / "random-llama") if args.model == "random" else args.model
    vocab = RANDOM_LLAMA["vocab_size"] if args.model == "random" else \
        json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    args.vocab = vocab
    prompts = workload(args, vocab)
    if args.chat:
        print(f"[rag] chat {args.chat} (conversations, turns), {args.answer} tokens answered per turn", flush=True)
    print(f"[rag] seed {args.seed}: {args.prompts} prompts (+{args.warm} warm-up) of {args.per_prompt} x {args.doc} "
          f"+ {args.question} tokens from {args.docs} documents ({args.combos or 'free'} sets), Zipf {args.zipf}; KV memory {args.kv_bytes:.3g} B",
          flush=True)
    results = []
    for config in args.configs.split(","):
        t = time.perf_counter()
        results.append(run_one(args, config, prompts, out))
        print(f"[rag] {config}: done in {time.perf_counter() - t:.0f} s", flush=True)
        table = "\n".join(summary(args, results, prompts))
        print(table, flush=True)
        (out / "summary.md").write_text(table + "\n")  # small: it comes back even when the JSON files do not
    (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
