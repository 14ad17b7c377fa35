"""kvplug's kept tokens on kvpress's prompt, compared with kvpress's (part 2 of the fidelity check).

Runs in the main venv (kvplug, transformers 5.x) after ``kvpress_fidelity.py`` (kvpress's venv)
wrote ``data/kvpress_fidelity/kvpress.json``::

    data/venv-kvpress/bin/python benchmarks/peers/kvpress_fidelity.py
    .venv/bin/python benchmarks/peers/kvpress_fidelity_kvplug.py [--detail]

Same checkpoint, same prompt token ids (read from the JSON and checked against
``kvplug.eval.inputs.memory_prompt``), float32 on the CPU. For every kvpress press and ratio it
runs kvplug's closest strategy through the real HF adapter (``kvplug.hf.cache(..., paged=False,
keep_prompt=True)``, one prefill), reads each layer's kept tokens off the cache
(``KVPlugLayer.slots.positions``: the logical position of every filled slot, ``-1`` empty) and
recomputes kvplug's scores from the prompt the cache kept (``KVPlugLayer.prompt``).

Rows named ``kvplug`` are kvplug as shipped, configured as kvpress is (kvpress's window, kernel,
sinks; budgets as kvpress's token count ``int(T * (1 - ratio))``, since a kvplug percentage rounds
up where kvpress rounds down: ``--percent`` shows that). ``kvplug (before)`` rows are SnapKV's
scoring before it followed the reference (``pool=max, span=all``), kept for contrast.

Per (layer, KV head) the kept sets are: ``=`` identical; ``t`` different only by exact ties (the
tokens only one side keeps have the same multiset of scores as those only the other keeps, in
kvpress's scores or in kvplug's: both are valid top-k sets); ``~`` the same but only within a
relative 1e-5 (float noise between the two computations); ``x`` really different. For AdaKV the
test is made over the whole layer (its budget moves across heads). Counts are over 6 layers x 2
KV heads = 12 (layer, head) pairs per row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
from kvplug.config import parse  # noqa: E402
from kvplug.scorers.base import ScoreInputs, Scorer  # noqa: E402
from kvplug.strategy import Strategy  # noqa: E402

IN = common.REPO / "data" / "kvpress_fidelity" / "kvpress.json"
RTOL = 1e-5


# -- the reference behaviours, as kvplug scorers (benchmark-local) -----------------------------------
# -- what kvplug runs for each kvpress press ---------------------------------------------------------
def variants(press: str, ratio: float, t: int, percent: bool = False) -> list[tuple[str, object]]:
    """(label, spec or Strategy) of kvplug's strategies for kvpress's ``press`` at ``ratio``; budgets
    as kvpress's token count or, ``percent``, as a kvplug percentage (which rounds up)."""
    n_kept = max(1, int(t * (1 - ratio)))  # kvpress's compute_n_kept
    keep = f"{(1 - ratio) * 100:g}%" if percent else str(n_kept)
    snap = f"snapkv(budget={keep}, window=64, kernel=5)"
    return {
        "streaming": [(f"kvplug streaming(sinks=4, window={n_kept - 4})", f"streaming(sinks=4, window={n_kept - 4})")],
        "snapkv": [(f"kvplug {snap}", snap),
                   (f"kvplug (before) {snap[:-1]}, pool=max, span=all)", f"{snap[:-1]}, pool=max, span=all)")],
        "tova": [(f"kvplug tova(budget={keep})", f"tova(budget={keep})")],
        "knorm": [(f"kvplug knorm(budget={keep})", f"knorm(budget={keep})")],
        "expected-attention": [(f"kvplug expected_attention(budget={keep})", f"expected_attention(budget={keep})")],
        "adakv-snapkv": [(f"kvplug {snap}+adakv(alpha=0.2)", f"{snap}+adakv(alpha=0.2)")],
        "adakv-knorm": [(f"kvplug knorm(budget={keep})+adakv(alpha=0.2)", f"knorm(budget={keep})+adakv(alpha=0.2)")],
        "adakv-expected-attention": [(f"kvplug expected_attention(budget={keep})+adakv(alpha=0.2)",
                                      f"expected_attention(budget={keep})+adakv(alpha=0.2)")],
        "keydiff": [(f"kvplug keydiff(budget={keep})", f"keydiff(budget={keep})")],
        "lagkv": [(f"kvplug lagkv(budget={keep})", f"lagkv(budget={keep})")],
        "chunkkv-knorm": [(f"kvplug knorm(budget={keep})+chunkkv", f"knorm(budget={keep})+chunkkv")],
        "curdkv": [(f"kvplug curdkv(budget={keep})", f"curdkv(budget={keep})")],
        "compactor-attention": [(f"kvplug compactor(budget={keep}, blending=0)", f"compactor(budget={keep}, blending=0)")],
        "criticalkv-snapkv": [(f"kvplug criticalkv(budget={keep}, window=64, kernel=5)",
                               f"criticalkv(budget={keep}, window=64, kernel=5)")],
    }[press]


@torch.no_grad()
def kvplug_kept(model, ids: torch.Tensor, spec) -> tuple[list, list]:
    """Per layer: kept indices per KV head (sorted) and kvplug's scores ``[H][T]``."""
    import kvplug.hf

    if isinstance(spec, Scorer):
        strategy = Strategy(scorer=spec)
    else:
        strategy = spec if isinstance(spec, Strategy) else parse(spec)
    cache = kvplug.hf.cache(model, strategy, paged=False, keep_prompt=True)
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    kept, scores = [], []
    for layer in cache.layers:
        pos = layer.slots.positions[0]  # [H, S]
        kept.append([sorted(p[p >= 0].tolist()) for p in pos])
        keys, values, queries, valid, scale = layer.prompt
        t = keys.shape[2]
        sc = strategy.scorer
        window = t if sc.needs_all_queries else min(sc.observation_window, t)
        out_proj = cache.view.attention[layer.layer_idx].o_proj.weight if sc.needs_out_proj else None
        inputs = ScoreInputs(keys=keys, values=values, queries=queries[:, :, t - window:], valid=valid, scale=scale,
                             layer_idx=layer.layer_idx, num_layers=len(cache.layers), rope=cache.rope,
                             out_proj=out_proj)
        scores.append(sc.score(inputs)[0].double())
    return kept, scores


def _same_scores(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    if a.numel() != b.numel():
        return False
    a, b = a.sort().values, b.sort().values
    if rtol == 0:
        return bool((a == b).all())
    scale = torch.maximum(a.abs(), b.abs()).clamp(min=1e-30)
    return bool((((a - b).abs() <= rtol * scale) | (a == b)).all())


def classify(ref_kept, our_kept, ref_scores, our_scores, layerwise: bool) -> list[str]:
    """One code per KV head of a layer: '=', 't' (exact tie), '~' (tie within RTOL) or 'xN'."""
    h = len(ref_kept)
    only_ref = [sorted(set(ref_kept[i]) - set(our_kept[i])) for i in range(h)]
    only_our = [sorted(set(our_kept[i]) - set(ref_kept[i])) for i in range(h)]

    def tie(heads, rtol):
        for scores in (ref_scores, our_scores):
            a = torch.cat([scores[i][only_ref[i]] for i in heads]) if heads else torch.zeros(0)
            b = torch.cat([scores[i][only_our[i]] for i in heads]) if heads else torch.zeros(0)
            if torch.isfinite(a).all() and torch.isfinite(b).all() and _same_scores(a, b, rtol):
                return True
        return False

    codes = []
    differ = [i for i in range(h) if only_ref[i] or only_our[i]]
    for i in range(h):
        if i not in differ:
            codes.append("=")
            continue
        heads = differ if layerwise else [i]
        n = max(len(only_ref[i]), len(only_our[i]))
        codes.append("t" if tie(heads, 0.0) else "~" if tie(heads, RTOL) else f"x{n}")
    return codes


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kvpress", default=str(IN), help="the JSON kvpress_fidelity.py wrote")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--percent", action="store_true",
                   help="budgets as a kvplug percentage (rounds up) instead of kvpress's token count int(T * (1 - ratio))")
    p.add_argument("--detail", action="store_true", help="list the differing tokens of each differing head")
    p.add_argument("--out", default=str(IN.parent / "comparison.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ref = json.loads(Path(args.kvpress).read_text())
    model, _, source = common.load(ref["model"])
    ids = torch.tensor([ref["prompt_ids"]])
    again = common.inputs.memory_prompt(source, ref["seed"], ref["context"])
    assert torch.equal(ids, again), "the prompt tokens differ from kvplug's memory_prompt in this venv"
    t = ids.shape[1]
    print(f"model {ref['model']}, prompt {t} tokens ({ref['fingerprint']}, seed {ref['seed']}), "
          f"kvpress {ref['versions']['kvpress']} / transformers {ref['versions']['transformers']} vs kvplug "
          f"on transformers {__import__('transformers').__version__}")
    rows = []
    for entry in ref["results"]:
        press, ratio = entry["press"], entry["compression_ratio"]
        layerwise = press.startswith("adakv")
        for label, spec in variants(press, ratio, t, args.percent):
            kept, scores = kvplug_kept(model, ids, spec)
            per_layer, details = [], []
            for li, (rl, ok, os_) in enumerate(zip(entry["layers"], kept, scores)):
                key = "scores_after_safeguard" if layerwise else "scores"
                rs = [torch.tensor(s, dtype=torch.float64) for s in rl[key]]
                codes = classify(rl["kept"], ok, rs, os_, layerwise)
                per_layer.append(codes)
                for hi, c in enumerate(codes):
                    if c.startswith("x") and args.detail:
                        a = sorted(set(rl["kept"][hi]) - set(ok[hi]))
                        b = sorted(set(ok[hi]) - set(rl["kept"][hi]))
                        details.append(f"    L{li} H{hi}: kvpress only {a[:12]}{'...' if len(a) > 12 else ''} "
                                       f"({len(a)}), kvplug only {b[:12]}{'...' if len(b) > 12 else ''} ({len(b)})")
            flat = [c for layer in per_layer for c in layer]
            row = {"press": press, "ratio": ratio, "kvplug": label, "pairs": len(flat),
                   "identical": flat.count("="), "ties": flat.count("t"), "near_ties": flat.count("~"),
                   "differing": sum(c.startswith("x") for c in flat),
                   "tokens_differing": sum(int(c[1:]) for c in flat if c.startswith("x")),
                   "kept_kvpress": sum(entry["n_kept_per_head"]),
                   "kept_kvplug": sum(len(k) for layer in kept for k in layer),
                   "per_layer": per_layer}
            rows.append(row)
            print(f"{press:25s} {ratio:<4g} {label:62s} = {row['identical']:2d}  t {row['ties']:2d}  "
                  f"~ {row['near_ties']:2d}  x {row['differing']:2d}  ({row['tokens_differing']:4d} tok)  "
                  + " ".join(f"L{i}[{' '.join(c)}]" for i, c in enumerate(per_layer)), flush=True)
            for line in details:
                print(line)
    Path(args.out).write_text(json.dumps({"kvpress": args.kvpress, "rows": rows}, indent=1))
    print("\n| press | ratio | kvplug | identical | ties only | float near-ties | differing | tokens differing |"
          " kept (kvpress / kvplug) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['press']} | {r['ratio']:g} | `{r['kvplug']}` | {r['identical']}/{r['pairs']} | {r['ties']} | "
              f"{r['near_ties']} | {r['differing']} | {r['tokens_differing']} | "
              f"{r['kept_kvpress']} / {r['kept_kvplug']} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
