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
* ``block16-k2``: 2-bit keys per channel over 16 tokens;
* ``smooth50`` / ``smooth50-rot`` (any ``smoothNN``): per-token int4 keys after a fixed
  per-channel division by ``lambda = m^(NN/100)``, ``m`` each channel's largest magnitude on
  calibration text (paired channels ``i``, ``i + d/2`` share one, the RoPE pair's norm), q
  multiplied by it so that scores are unchanged: QServe's SmoothAttention (Lin et al. 2024,
  arXiv 2405.04532), which keeps the per-token paged layout; ``-rot`` rotates after smoothing.
  Calibration: ``--calibration`` (the training shard's token ids, not the held-out text).

The prompt's own attention also reads the replaced K/V here (harsher than ``kvplug eval``, whose
prompt attends over its raw K/V), so compare rows with each other, not with docs/EVALUATION.md.

    python benchmarks/key_formats.py --contexts 4096,8192          # reference model, CPU: ~10 min
    python benchmarks/key_formats.py --device cuda --sequences 64   # GPU
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FORMATS = ("int4", "int4-rot", "block16", "block32", "block64", "k8v4", "block16-k2", "smooth50", "smooth50-rot")
SMOOTH = re.compile(r"smooth(\d\d)(-rot)?$")


def key_channel_max(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer ``[kv_heads, head_dim]``: each key channel's largest magnitude over ``ids``
    (``[B, T]``) after RoPE, the pair ``(i, i + d/2)`` that RoPE mixes given their joint norm."""
    from transformers import DynamicCache

    found: dict[int, torch.Tensor] = {}

    class Grab(DynamicCache):
        def update(self, k, v, layer_idx, *rest, **kw):
            half = k.shape[-1] // 2
            pair = (k[..., :half].float() ** 2 + k[..., half:].float() ** 2).sqrt().amax(dim=(0, 2))
            found[layer_idx] = torch.cat([pair, pair], -1)
            return super().update(k, v, layer_idx, *rest, **kw)

    with torch.no_grad():
        model(ids, past_key_values=Grab(config=model.config), logits_to_keep=1)
    return [found[i] for i in sorted(found)]


def roundtrip(fmt: str, layer_idx: int = 0, channel_max: list[torch.Tensor] | None = None):
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
        smooth = SMOOTH.match(fmt)
        if smooth:
            lam = channel_max[layer_idx].clamp_min(1e-3) ** (int(smooth.group(1)) / 100)
            lam = lam.to(x.dtype)[:, None, :]          # [H, 1, D]: scores q.k = (q lam).(k / lam)
            return rt(Int4(rotate=bool(smooth.group(2))), x / lam, "key") * lam
        group, bits = int(fmt[5:7]), 2 if fmt.endswith("-k2") else 4
        t = x.shape[-2] // group * group  # whole blocks per channel; a partial last block stays as it is
        out = x.clone()
        out[..., :t, :] = rt(Kivi(bits=bits, group=group, residual=0), x[..., :t, :], "key")
        return out

    value_codec = Int4(rotate=fmt.endswith("-rot"))
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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calibration", default="data/tokens/train.bin",
                    help="uint16 token ids (tokenize_corpus.py's train.bin) for the smooth formats' channel maxima")
    ap.add_argument("--calibration-windows", type=int, default=4, help="windows of 2,048 tokens drawn from it")
    args = ap.parse_args()
    formats = args.formats.split(",")
    unknown = {f for f in formats if f not in FORMATS and not SMOOTH.match(f)}
    if unknown:
        raise SystemExit(f"unknown format(s) {sorted(unknown)}; known: {', '.join(FORMATS)}")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval().to(args.device)
    source = load_heldout_ids(args.model, tokenizer)
    channel_max = None
    if any(SMOOTH.match(f) for f in formats):
        import numpy as np

        if not Path(args.calibration).is_file():
            raise SystemExit(f"--calibration {args.calibration}: no such file (build it with "
                             "benchmarks/reference_model/tokenize_corpus.py, or pass another uint16 token file)")
        shard = np.memmap(args.calibration, dtype=np.uint16, mode="r")
        rng = np.random.default_rng(args.seed + 1)
        starts = rng.integers(0, len(shard) - 2048, args.calibration_windows)
        calib = torch.tensor(np.stack([shard[a:a + 2048] for a in starts]).astype(np.int64), device=args.device)
        channel_max = key_channel_max(model, calib)
        print(f"calibration: {args.calibration_windows} x 2048 tokens of {args.calibration} (seed {args.seed + 1})")

    class Replaced(DynamicCache):
        """A DynamicCache whose prompt K/V (any update of more than one token) are replaced."""

        def __init__(self, config, fmt):
            super().__init__(config=config)
            self.fmt = fmt

        def update(self, k, v, layer_idx, *rest, **kw):
            if k.shape[-2] > 1:
                k, v = roundtrip(self.fmt, layer_idx, channel_max)(k, v)
            return super().update(k, v, layer_idx, *rest, **kw)

    print(f"{args.model}: {args.sequences} x {args.tokens} tokens scored per context, seed {args.seed}")
    print("| format | " + " | ".join(f"ppl @{c}" for c in args.contexts.split(",")) + " |")
    print("|---|" + "---|" * len(args.contexts.split(",")))
    rows: dict[str, list[str]] = {}
    for context in (int(c) for c in args.contexts.split(",")):
        ids = inputs.perplexity_ids(source, args.seed, context, args.sequences, args.tokens, args.device)
        base = None
        for fmt in ["none"] + formats:
            cache = DynamicCache(config=model.config) if fmt == "none" else Replaced(model.config, fmt)
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
