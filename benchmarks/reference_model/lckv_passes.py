"""How far an LCKV model's parallel passes are from its exact (token by token) computation.

A Layer-Condensed KV model (``kvplug.adapters.hf.LckvForCausalLM``, arXiv 2405.10637) runs a
prompt in ``lckv_iterations`` parallel passes and generates token by token, exactly. The two agree
only if the passes converge to the exact computation. This script prints the held-out negative
log-likelihood per token with 1, 2, ... passes over whole windows and with exact token-by-token
decoding over the same windows, so a model that learned its training pass count instead of the
fixed point shows at once (docs/EVALUATION.md, issue 24).

    python benchmarks/reference_model/lckv_passes.py --model models/kvplug-ref-lckv \\
        --heldout models/kvplug-ref/heldout.txt --length 1024 --windows 4
"""

from __future__ import annotations

import argparse
import json
import random

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import kvplug.hf  # noqa: F401  (registers kvplug_lckv)
from kvplug.retrieval import load_heldout_ids


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/kvplug-ref-lckv")
    ap.add_argument("--heldout", default="models/kvplug-ref/heldout.txt")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--passes", default="1,2,3,4,7,12")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    source = load_heldout_ids(args.model, tok, args.heldout)
    rng = random.Random(args.seed)
    starts = [rng.randrange(len(source) - args.length) for _ in range(args.windows)]
    ids = torch.tensor([source[s:s + args.length] for s in starts], device=args.device)
    target = ids[:, 1:].reshape(-1)
    trained = model.config.lckv_iterations
    out = {"model": args.model, "trained_passes": trained, "length": args.length, "windows": args.windows,
           "seed": args.seed, "device": args.device, "nll_by_passes": {}}
    for passes in [int(p) for p in args.passes.split(",")]:
        model.config.lckv_iterations = passes
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        out["nll_by_passes"][passes] = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target))
        print(f"{passes:>3} passes: nll {out['nll_by_passes'][passes]:.4f}", flush=True)
    model.config.lckv_iterations = trained
    cache, steps = DynamicCache(), []
    for t in range(args.length - 1):
        steps.append(model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1].float())
    logits = torch.stack(steps, 1)
    out["nll_exact"] = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target))
    print(f"token by token (exact): nll {out['nll_exact']:.4f}", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
