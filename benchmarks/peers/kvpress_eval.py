"""NVIDIA kvpress's presses measured with ``kvplug eval``'s protocol, on its inputs.

kvpress 0.5.5 requires transformers < 5.3, so this runs in its own venv (made by
``setup_kvpress_venv.sh``) and imports no kvplug module that needs transformers 5: only
``kvplug/eval/inputs.py`` (loaded by path) and ``kvplug.retrieval``, through ``common.py``.

    bash benchmarks/peers/setup_kvpress_venv.sh
    data/venv-kvpress/bin/python benchmarks/peers/kvpress_eval.py --out runs/peers/kvpress \\
        --reference runs/peers/kvplug/results.json

Strategies: ``none`` (a plain ``DynamicCache``: the baseline of deltas and agreement, and the
check that this environment computes what kvplug's does: ``--reference``), then each press of
``--presses`` at ``--fraction`` of the prompt kept (kvpress's ``compression_ratio = 1 - fraction``),
named ``kvpress-NAME(25%)``. A press compresses the cache once, at the end of the prompt's forward
(kvpress's forward hooks, its own mechanism); then tokens are fed one at a time through the
compressed cache with explicit position ids (as kvpress's pipeline does). kvpress's presses do not
evict while decoding: the cache grows by one token per step after the prompt.
Writes ``OUT/results.json`` (schema kvplug-eval/1, validated against kvplug's schema.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

# name -> (kvpress class, extra keyword arguments); kvpress's defaults otherwise
PRESSES = {
    "streaming": ("StreamingLLMPress", {"n_sink": 4}),
    "snapkv": ("SnapKVPress", {}),
    "tova": ("TOVAPress", {}),
    "knorm": ("KnormPress", {}),
    "expected-attention": ("ExpectedAttentionPress", {}),
    "keydiff": ("KeyDiffPress", {}),
    "lagkv": ("LagKVPress", {}),
    "curdkv": ("CURPress", {}),
    "criticalkv-snapkv": ("CriticalKVPress", {"press": ("SnapKVPress", {})}),  # wraps a press
    "compactor": ("CompactorPress", {}),  # its sketch comes from torch's global random state
}


def parse_fraction(text: str) -> float:
    text = text.strip()
    f = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0 < f < 1:
        raise SystemExit(f"--fraction {text}: expected a share in (0, 1) or a percentage in (0%, 100%)")
    return f


def methods(model, names: list[str], fraction: float) -> list[common.Method]:
    import kvpress
    from transformers import DynamicCache

    out = [common.Method("none", DynamicCache)]
    for name in names:
        if name not in PRESSES:
            raise SystemExit(f"unknown press {name!r}; presses: {', '.join(PRESSES)}")
        cls, kw = PRESSES[name]
        if "press" in kw:  # a wrapper: the inner press takes the ratio
            inner, inner_kw = kw["press"]
            press = getattr(kvpress, cls)(getattr(kvpress, inner)(compression_ratio=1 - fraction, **inner_kw),
                                          **{k: v for k, v in kw.items() if k != "press"})
        else:
            press = getattr(kvpress, cls)(compression_ratio=1 - fraction, **kw)
        out.append(common.Method(f"kvpress-{name}({fraction * 100:g}%)", DynamicCache,
                                 lambda press=press: press(model)))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p, "runs/peers/kvpress")
    p.add_argument("--presses", default=",".join(PRESSES), help=f"comma list of {', '.join(PRESSES)}")
    p.add_argument("--fraction", default="25%", help="share of the prompt's tokens kept (as kvplug's budget=25%%)")
    p.add_argument("--reference", help="a kvplug eval results.json: check this run's `none` perplexity against it")
    args = p.parse_args(argv)
    settings = common.settings_from(args)
    model, tokenizer, source = common.load(args.model)
    import transformers
    from importlib.metadata import version

    ms = methods(model, [n.strip() for n in args.presses.split(",") if n.strip()], parse_fraction(args.fraction))
    results = common.run(model, tokenizer, source, ms, settings, extra={
        "peer": f"kvpress {version('kvpress')}, transformers {transformers.__version__}, torch {version('torch')}"})
    common.finish(results, args)  # validates against kvplug/eval/schema.json

if __name__ == "__main__":
    main()
