"""HF transformers' own ``QuantizedCache`` measured with ``kvplug eval``'s protocol, on its inputs.

    . .venv/bin/activate   # the main venv (README set-up), plus: pip install optimum-quanto==0.2.7
    python benchmarks/peers/quantized_cache.py --out runs/peers/hf-quantized

Strategies: ``none`` (a plain ``DynamicCache``, the baseline of deltas and agreement) and
``hf-quantized(bits=B)`` for each ``--bits`` (quanto backend; ``--backends quanto,hqq`` adds
``hf-quantized(backend=hqq, bits=B)`` where the ``hqq`` package is installed), with HF's defaults
q_group_size 64, residual_length 128, axis 0 for keys and values. The prompt goes through the
model with the cache (HF quantizes it but attends with full precision during that forward, as
kvplug's prefill does), then tokens are fed one at a time. Memory is what the cache holds: the
bytes inside quanto's packed tensors (data, scale, shift) plus the full-precision residual.
Writes ``OUT/results.json`` (schema kvplug-eval/1), validated with ``kvplug.eval.report.validate``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def methods(model, bits: list[int], backends: list[str]) -> list[common.Method]:
    from transformers import DynamicCache, QuantizedCache

    out = [common.Method("none", lambda: DynamicCache(config=model.config))]
    for backend in backends:
        for b in bits:
            name = f"hf-quantized(bits={b})" if backend == "quanto" else f"hf-quantized(backend={backend}, bits={b})"
            out.append(common.Method(name, lambda backend=backend, b=b: QuantizedCache(
                backend=backend, config=model.config, nbits=b, q_group_size=64, residual_length=128)))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p, "runs/peers/hf-quantized")
    p.add_argument("--bits", default="4,2", help="QuantizedCache nbits (quanto: 2 or 4)")
    p.add_argument("--backends", default="quanto", help="quanto and/or hqq")
    p.add_argument("--reference", help="a kvplug eval results.json: check this run's `none` perplexity against it")
    args = p.parse_args(argv)
    settings = common.settings_from(args)
    model, tokenizer, source = common.load(args.model)
    import transformers
    try:
        from importlib.metadata import version
        quanto = version("optimum-quanto")
    except Exception:
        quanto = None
    ms = methods(model, [int(b) for b in args.bits.split(",")], [b.strip() for b in args.backends.split(",")])
    results = common.run(model, tokenizer, source, ms, settings, extra={
        "peer": f"transformers {transformers.__version__} QuantizedCache (optimum-quanto {quanto})"})
    common.finish(results, args)  # validates against kvplug/eval/schema.json

if __name__ == "__main__":
    main()
