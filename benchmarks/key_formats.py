"""Which 4-bit key format keeps quality: a study before a paged format is built (issue #19).

Perplexity of the ``kvplug eval`` windows (same tokens, same seed) when the *prompt's* K/V are
replaced by what a format gives back, the scored continuation's own K/V left in full precision
(what a paged per-block format holds while its newest block is open: an upper bound on it).
Formats, all with 4-bit per-token values unless named otherwise:

* ``int4``: keys per token (one scale/zero per token and head), the paged ``int4`` of today;
* ``int4-rot``: the same after the Hadamard rotation (``int4(rotate=true)``);
* ``block16`` / ``block32`` / ``block64``: keys per channel over blocks of 16/32/64 tokens
  (``kivi(bits=4, group=N, residual=0)``'s keys: KIVI's observation made block-local, the
  candidate paged format), values per token;
* ``k8v4``: 8-bit keys per token (``mixed``);
* ``block16-k2``: 2-bit keys per channel over 16 tokens.

The prompt's own attention also reads the replaced K/V here (harsher than ``kvplug eval``, whose
prompt attends over its raw K/V), so compare rows with each other, not with docs/EVALUATION.md.

    python benchmarks/key_formats.py --contexts 4096,8192          # reference model, CPU: ~10 min
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FORMATS = ("int4", "int4-rot", "block16", "block32", "block64", "k8v4", "block16-k2")


def roundtrip(fmt: str):
    """``(keys, values) -> (keys, values)`` as ``fmt`` stores and returns them ([B, H, T, D])."""
    from kvplug.codecs.integer import Int4, Int8
    from kvplug.codecs.kivi import Kivi

    def rt(codec, x, role):
        return codec.decode(codec.encode(x, role), role, x.dtype)

    def keys(x):
        if fmt == "int4":
            return rt(Int4(), x, "key")
        if fmt == "int4-rot":
            return rt(Int4(rotate=True), x, "key")
        if fmt == "k8v4":
            return rt(Int8(), x, "key")
        group, bits = int(fmt[5:7]), 2 if fmt.endswith("-k2") else 4
        t = x.shape[-2] // group * group  # whole blocks per channel; a partial last block stays as it is
        out = x.clone()
        out[..., :t, :] = rt(Kivi(bits=bits, group=group, residual=0), x[..., :t, :], "key")
        return out

    value_codec = Int4(rotate=fmt == "int4-rot")
    return lambda k, v: (keys(k), rt(value_codec, v, "value"))


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from kvplug.eval import inputs
    from kvplug.eval.runner import REFERENCE_MODEL
    from kvplug.retrieval import load_heldout_ids

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REFERENCE_MODEL))
    ap.add_argument("--contexts", default="4096,8192")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    formats = args.formats.split(",")
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise SystemExit(f"unknown format(s) {sorted(unknown)}; known: {', '.join(FORMATS)}")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    source = load_heldout_ids(args.model, tokenizer)

    class Replaced(DynamicCache):
        """A DynamicCache whose prompt K/V (any update of more than one token) are replaced."""

        def __init__(self, config, fn):
            super().__init__(config=config)
            self.fn = fn

        def update(self, k, v, layer_idx, *rest, **kw):
            if k.shape[-2] > 1:
                k, v = self.fn(k, v)
            return super().update(k, v, layer_idx, *rest, **kw)

    print(f"{args.model}: {args.sequences} x {args.tokens} tokens scored per context, seed {args.seed}")
    print("| format | " + " | ".join(f"ppl @{c}" for c in args.contexts.split(",")) + " |")
    print("|---|" + "---|" * len(args.contexts.split(",")))
    rows: dict[str, list[str]] = {}
    for context in (int(c) for c in args.contexts.split(",")):
        ids = inputs.perplexity_ids(source, args.seed, context, args.sequences, args.tokens)
        base = None
        for fmt in ["none"] + formats:
            cache = DynamicCache(config=model.config) if fmt == "none" else Replaced(model.config, roundtrip(fmt))
            with torch.no_grad():
                logits = model(ids[:, :context], past_key_values=cache, logits_to_keep=1).logits[:, -1]
                nll = 0.0
                for t in range(args.tokens):
                    nll += float(F.cross_entropy(logits.float(), ids[:, context + t], reduction="sum"))
                    if t + 1 < args.tokens:
                        logits = model(ids[:, context + t:context + t + 1], past_key_values=cache).logits[:, -1]
            nll /= args.sequences * args.tokens
            base = nll if fmt == "none" else base
            cell = f"{math.exp(nll):.3f} ({100 * (math.exp(nll - base) - 1):+.2f}%)"
            rows.setdefault(fmt, []).append(cell)
            print(f"  {context} {fmt}: {cell}", file=sys.stderr, flush=True)
    for fmt, cells in rows.items():
        print(f"| {fmt} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
