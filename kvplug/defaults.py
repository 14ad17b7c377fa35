"""Defaults shared by ``kvplug eval``/``kvplug bench`` and their Python APIs (no engine imports)."""

EVAL_STRATEGIES = ("none", "int8", "int4", "kivi(bits=2)", "snapkv(budget=25%)", "streaming(sinks=4, window=25%)")
EVAL_TASKS = ("perplexity", "retrieval", "agreement", "memory")
BENCH_CACHES = ("DynamicCache", "QuantizedCache-4", "QuantizedCache-2", "none", "int4", "kivi(bits=2)",
                "snapkv(budget=25%)+int4")
