"""kvplug's default (compressed) prefill under vLLM's schedules, on a GPU: greedy tokens that must
not depend on how the scheduler ran a request.

    python benchmarks/vllm_schedule_check.py --model random --specs int4,snapkv(budget=25%)+int4
    python benchmarks/vllm_schedule_check.py --specs "snapkv(budget=25%)+int4" --variants graphs,v1,v2

Per spec, two engines (eager, the same weights and KV memory): ``chunked`` (vLLM's defaults on:
chunked prefill with ``max_num_batched_tokens`` 512, prefix caching) and ``whole`` (each prompt
in one chunk, prefix caching off). Each runs, one request at a time, a 2,000-token prompt and two
prompts sharing a 1,000-token prefix (the second served from the prefix cache in ``chunked``);
``chunked`` then runs 64 mixed requests (3..600 tokens) together in a pool small enough to preempt,
and each alone. Printed: the prompt chunks vLLM scheduled, the prefix-cache tokens per request
(vLLM's own count), the steps of agreement (chunked vs whole; together vs alone) and whether a
first mismatch is at a bf16 tie (vLLM's top-2 log-probabilities within 0.125 nats), the
preemptions and the free blocks after. ``--model random``: the random Llama of
``vllm_serving.py`` (``load_format=dummy``: the same weights in every engine).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_serving import TIE_NATS, _gap, random_model  # noqa: E402

CHUNKED = {"max_num_batched_tokens": 512, "enable_chunked_prefill": True, "enable_prefix_caching": True}
SCHEDULES = {"chunked": CHUNKED,
             "whole": {"max_num_batched_tokens": 8192, "enable_chunked_prefill": True, "enable_prefix_caching": False}}
"""The two schedules every spec runs (eager, the model runner vLLM picks)."""
VARIANTS = {"graphs": {"eager": False}, "v1": {"runner": "0"}, "v2": {"runner": "1"}}
"""``--variants``: the ``chunked`` schedule again with CUDA graphs (vLLM's compiled piecewise /
full-decode graphs) or with the V1 / V2 model runner forced (``VLLM_USE_V2_MODEL_RUNNER``),
each compared with ``whole`` and with itself alone."""


def _prompts(lengths, vocab, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def child(job: dict) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler in this process: chunks, preemptions
    variant = VARIANTS.get(job["schedule"], {})
    if "runner" in variant:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = variant["runner"]
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model"], dtype="bfloat16", max_model_len=4096, seed=0,
              enforce_eager=variant.get("eager", True), kv_cache_memory_bytes=job["kv_bytes"], max_num_seqs=64,
              load_format=job["load_format"], skip_tokenizer_init=True, additional_config={"kvplug": job["spec"]},
              **SCHEDULES.get(job["schedule"], CHUNKED))
    core = llm.llm_engine.engine_core.engine_core
    scheduler = core.scheduler
    try:
        runner = type(core.model_executor.driver_worker.worker.model_runner)
        runner_name = f"{runner.__module__}.{runner.__name__}"
    except AttributeError:
        runner_name = "?"
    pool = scheduler.kv_cache_manager.block_pool
    vocab = job["vocab"]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2, detokenize=False)
    shared = _prompts([1000], vocab, 9)[0]
    sequential = _prompts([2000], vocab, 10) + [shared + p for p in _prompts([200, 150], vocab, 11)]
    chunks, preempted = [0], [0]
    schedule, preempt = scheduler.schedule, scheduler._preempt_request

    def counted(*args, **kwargs):
        out = schedule(*args, **kwargs)
        chunks[-1] += any(n > 1 for n in out.num_scheduled_tokens.values())
        return out

    def counted_preempt(*args, **kwargs):
        preempted[0] += 1
        return preempt(*args, **kwargs)

    scheduler.schedule, scheduler._preempt_request = counted, counted_preempt
    res: dict = {"spec": job["spec"], "schedule": job["schedule"], "pool": pool.num_gpu_blocks, "tokens": [],
                 "gaps": [], "cached": [], "runner": runner_name}
    for p in sequential:
        o = llm.generate([{"prompt_token_ids": p}], greedy, use_tqdm=False)[0]
        res["tokens"].append(list(o.outputs[0].token_ids))
        res["gaps"].append([_gap(s) for s in o.outputs[0].logprobs])
        res["cached"].append(o.num_cached_tokens or 0)
        chunks.append(0)
    res["chunks"] = chunks[:-1]
    if job["schedule"] != "whole":
        rng = random.Random(7)
        many = [{"prompt_token_ids": p} for p in _prompts([rng.randint(3, 600) for _ in range(64)], vocab, 8)]
        short = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2, detokenize=False)
        preempted[0] = 0
        together = llm.generate(many, short, use_tqdm=False)
        res["preempted"] = preempted[0]
        alone = [llm.generate([p], short, use_tqdm=False)[0] for p in many]
        res["together"] = [list(o.outputs[0].token_ids) for o in together]
        res["alone"] = [list(o.outputs[0].token_ids) for o in alone]
        res["alone_gaps"] = [[_gap(s) for s in o.outputs[0].logprobs] for o in alone]
    res["free_end"] = pool.get_num_free_blocks()
    Path(job["out"]).write_text(json.dumps(res))


def agreement(ours: list[list[int]], ref: list[list[int]], gaps: list[list[float]]) -> tuple[int, int, int]:
    """(sequences equal, first mismatches at a tie, first mismatches not at a tie)."""
    equal = ties = other = 0
    for a, b, g in zip(ours, ref, gaps):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if k is None:
            equal += 1
        elif g[k] <= TIE_NATS:
            ties += 1
        else:
            other += 1
    return equal, ties, other


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child")
    ap.add_argument("--model", default="random")
    ap.add_argument("--specs", default="int4,snapkv(budget=25%)+int4")
    ap.add_argument("--kv-bytes", type=int, default=40 << 20, help="KV-cache memory of every engine")
    ap.add_argument("--out", default="/tmp/vllm_schedule_check")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--variants", default="", help=f"comma-separated, of {', '.join(VARIANTS)}: more chunked runs")
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model == "random":
        model, vocab, fmt = random_model(out / "random-llama"), 32000, "dummy"
    else:
        model, fmt = args.model, "auto"
        vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    print(f"model {args.model}, KV memory {args.kv_bytes} bytes, schedules {SCHEDULES}", flush=True)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"--variants: unknown {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    for spec in args.specs.split(","):
        runs = {}
        for name in [*SCHEDULES, *variants]:
            safe = "".join(c if c.isalnum() else "_" for c in f"{spec}-{name}")
            job = {"model": model, "vocab": vocab, "load_format": fmt, "spec": spec, "schedule": name,
                   "kv_bytes": args.kv_bytes, "out": str(out / f"{safe}.json")}
            t = time.perf_counter()
            with open(out / f"{safe}.log", "w") as f:
                rc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], stdout=f,
                                    stderr=subprocess.STDOUT, timeout=args.timeout).returncode
            if rc or not Path(job["out"]).exists():
                print(f"{spec} {name}: failed (rc {rc}):\n" + (out / f"{safe}.log").read_text()[-3000:], flush=True)
                break
            runs[name] = json.loads(Path(job["out"]).read_text())
            print(f"{spec} {name}: {time.perf_counter() - t:.0f} s, {runs[name]['runner']}, pool {runs[name]['pool']} "
                  f"blocks, prompt chunks {runs[name]['chunks']}, prefix-cache tokens {runs[name]['cached']}",
                  flush=True)
        if "whole" not in runs:
            continue
        w = runs["whole"]
        for name, c in runs.items():
            if name == "whole":
                continue
            eq, ties, other = agreement(c["tokens"], w["tokens"], w["gaps"])
            print(f"{spec} {name}: chunked + prefix cache vs one chunk cold: {eq}/3 equal, {ties} part at a tie, "
                  f"{other} part elsewhere", flush=True)
            eq, ties, other = agreement(c["together"], c["alone"], c["alone_gaps"])
            print(f"{spec} {name}: 64 together ({c['preempted']} preemptions) vs alone: {eq}/64 equal, {ties} part at "
                  f"a tie, {other} part elsewhere; free blocks after {c['free_end']} of {c['pool']}", flush=True)
            if name != "chunked" and "chunked" in runs:
                eq, ties, other = agreement(c["together"], runs["chunked"]["together"], runs["chunked"]["alone_gaps"])
                print(f"{spec} {name} vs chunked (eager, vLLM's runner), 64 together: {eq}/64 equal, {ties} part at "
                      f"a tie, {other} part elsewhere", flush=True)


if __name__ == "__main__":
    main()
