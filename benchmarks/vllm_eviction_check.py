"""vLLM's eviction on a GPU beside the HF adapter: the blocks a request holds, and its greedy tokens.

For each spec one engine (its own process, engine core in process, one request at a time,
stepped) on the reference model; prompts are its held-out text (``heldout.txt``, never trained
on but of the kind it was), so greedy decoding is decisive rather than a run of near ties:

* blocks: vLLM's free blocks after every step: a prefill holds every prompt block, later steps
  only the kept tokens' (+1 partial) once the scheduler has freed the rest (the next step, or the
  one after it under async scheduling, where a step is scheduled before the last one has run);
* tokens: vLLM's greedy tokens against the HF adapter's (``kvplug.hf.cache(model, spec)``) on the
  same weights, dtype and device: steps until the first difference. ``none`` (vLLM's own backend
  against HF's DynamicCache) is the floor that the two engines' numerics (FlashAttention vs SDPA
  in bf16) give; an eviction bug shows as parting at once, far below it.

    python benchmarks/vllm_eviction_check.py --model models/kvplug-ref \\
        --specs "none,snapkv(budget=500),snapkv(budget=25%)+int4,streaming(sinks=4, window=400)+int8" --steps 48
    python benchmarks/vllm_eviction_check.py --eager --dtype float32 --kv-bytes 200000000 \\
        --lengths 600,300 --steps 24 --specs "none,snapkv(budget=200)+int4,h2o(budget=200)"   # the CPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def prompts(model: str, lengths: list[int]) -> list[list[int]]:
    """Consecutive pieces of the model's held-out text, one prompt per length."""
    from transformers import AutoTokenizer

    from kvplug.retrieval import load_heldout_ids

    ids = load_heldout_ids(model, AutoTokenizer.from_pretrained(model))
    out, at = [], 0
    for n in lengths:
        out.append(ids[at:at + n])
        at += n
    if len(out[-1]) < lengths[-1]:
        raise SystemExit(f"the held-out text gives {len(ids)} tokens, fewer than the prompts need")
    return out


def child(job: dict) -> None:
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: its block pool is read
    from vllm import LLM, SamplingParams

    # the HF adapter's prefill (over the prompt's raw K/V), so that the tokens compare
    extra = {} if job["spec"] == "none" else {"additional_config": {"kvplug": job["spec"],
                                                                   "kvplug_prefill": "uncompressed"}}
    memory = {"kv_cache_memory_bytes": job["kv_bytes"]} if job["kv_bytes"] else {"gpu_memory_utilization": 0.3}
    llm = LLM(job["model"], dtype=job["dtype"], max_model_len=job["max_len"], seed=0, enable_prefix_caching=False,
              enable_chunked_prefill=False, skip_tokenizer_init=True, enforce_eager=job["eager"], **memory, **extra)
    greedy = SamplingParams(temperature=0, max_tokens=job["steps"], ignore_eos=True, detokenize=False)
    result = {"spec": job["spec"], **one_by_one(llm, job["prompts"], greedy)}
    Path(job["out"]).write_text(json.dumps(result))


def one_by_one(llm, prompts: list[list[int]], params) -> dict:
    """Each prompt alone, stepped (engine core in process): its tokens and vLLM's free blocks after
    every step, the pool before and after (also used by tests/test_vllm_eviction.py)."""
    engine = llm.llm_engine
    pool = engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    result = {"pool": pool.num_gpu_blocks, "block_size": engine.vllm_config.cache_config.block_size,
              "free_start": pool.get_num_free_blocks(), "tokens": [], "free": []}
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
        free, done = [], None
        while done is None:
            done = next((o for o in engine.step() if o.finished), None)
            free.append(pool.get_num_free_blocks())
        result["tokens"].append(list(done.outputs[0].token_ids))
        result["free"].append(free)
    result["free_end"] = pool.get_num_free_blocks()
    return result


def hf_tokens(model_path: str, spec: str, batch: list[list[int]], steps: int, dtype: str) -> list[list[int]]:
    """The HF adapter's greedy tokens on the same weights and dtype (on the GPU where there is one)."""
    import torch
    from transformers import LlamaForCausalLM

    import kvplug.hf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device).eval()
    out = []
    for prompt in batch:
        cache = None if spec == "none" else kvplug.hf.cache(model, spec)
        ids = torch.tensor([prompt], device=device)
        gen = model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0, past_key_values=cache)
        out.append(gen[0, len(prompt):].tolist())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child")
    ap.add_argument("--model", default=str(ROOT / "models" / "kvplug-ref"))
    ap.add_argument("--specs", default="none,snapkv(budget=500),snapkv(budget=25%)+int4")
    ap.add_argument("--lengths", default="2000,1200,700")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--hf-steps", type=int, default=0, help="compare the first N steps with the HF adapter (default: all)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="/tmp/vllm_eviction_check")
    ap.add_argument("--kv-bytes", type=int, default=0, help="KV-cache memory (the CPU); default 30%% of the GPU")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (the CPU)")
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    from kvplug.config import split_specs

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = str(Path(args.model).resolve())
    lengths = [int(n) for n in args.lengths.split(",")]
    batch = prompts(model, lengths)
    max_len = max(lengths) + args.steps + 16
    for spec in split_specs(args.specs):
        job = {"spec": spec, "model": model, "dtype": args.dtype, "max_len": max_len, "steps": args.steps,
               "prompts": batch, "kv_bytes": args.kv_bytes, "eager": args.eager,
               "out": str(out / f"{len(list(out.glob('*.json')))}.json")}
        rc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)]).returncode
        if rc:
            print(f"{spec}: engine failed (rc {rc})", flush=True)
            continue
        r = json.loads(Path(job["out"]).read_text())
        bs = r["block_size"]
        held = [tuple(r["free_start"] - f[i] for i in (0, 1, 2, -1)) for f in r["free"]]
        later = [(min(f[3:]), max(f[3:])) if len(f) > 3 else None for f in r["free"]]
        print(f"{spec}: blocks of {bs} held after the prefill / 1 and 2 steps later / the last step {held} for prompts {lengths} "
              f"(prompt blocks {[-(-n // bs) for n in lengths]}); every step from the 4th on held between "
              f"{[None if x is None else (r['free_start'] - x[1], r['free_start'] - x[0]) for x in later]} blocks; "
              f"pool back to full: {r['free_end'] == r['free_start']}", flush=True)
        hf_steps = min(args.steps, args.hf_steps or args.steps)
        theirs = hf_tokens(model, spec, batch, hf_steps, args.dtype)
        agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(y)) for x, y in zip(r["tokens"], theirs)]
        print(f"{spec}: steps agreeing with the HF adapter {agree} of {hf_steps}", flush=True)


if __name__ == "__main__":
    main()
