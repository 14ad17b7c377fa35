"""Which tokens NVIDIA kvpress 0.5.5 keeps, per press, ratio, layer and KV head (kvpress side).

Part 1 of the kvpress fidelity comparison (issue #21). Runs in kvpress's own venv (made by
``setup_kvpress_venv.sh``); part 2, ``kvpress_fidelity_kvplug.py``, runs kvplug in the main venv on
the same model and the same prompt tokens and prints the comparison table::

    bash benchmarks/peers/setup_kvpress_venv.sh
    data/venv-kvpress/bin/python benchmarks/peers/kvpress_fidelity.py        # -> data/kvpress_fidelity/kvpress.json
    .venv/bin/python benchmarks/peers/kvpress_fidelity_kvplug.py             # reads it, prints the table

The prompt is ``kvplug eval``'s memory prompt (``kvplug.eval.inputs.memory_prompt``: a window of
the reference model's held-out text) at ``--context`` tokens (default 512) and ``--seed`` (0);
its token ids are saved in the JSON so the kvplug side uses exactly these tokens.

For every press and ``compression_ratio`` (kvpress's share *removed*; default 0.25 and 0.5) one
prefill runs under the press. A wrapper around the press's ``compress`` records, per layer and KV
head, the kept token indices and the press's scores:

* ScorerPress subclasses physically gather the kept keys; each kept key row is matched (exact
  equality) to its row in the uncompressed keys, so the indices are what kvpress really kept,
  independent of how it ranked them.
* AdaKVPress keeps every key and records the evicted ones in ``module.masked_key_indices``
  (read by kvpress's attention patch while decoding); the kept set is the complement.

Scores are saved as the press returned them (for AdaKV also after its safeguard, which raises the
top ``int(n_kept * alpha)`` of each head to float32's max), so the comparison can tell whether a
difference is only a tie at the cut.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402

OUT = common.REPO / "data" / "kvpress_fidelity" / "kvpress.json"


def presses(ratio: float) -> dict:
    """name -> kvpress press at ``compression_ratio=ratio``, kvpress's defaults otherwise."""
    import kvpress as kp

    return {
        "streaming": kp.StreamingLLMPress(compression_ratio=ratio, n_sink=4),
        "snapkv": kp.SnapKVPress(compression_ratio=ratio),  # window_size=64, kernel_size=5 (avg)
        "tova": kp.TOVAPress(compression_ratio=ratio),
        "knorm": kp.KnormPress(compression_ratio=ratio),
        "expected-attention": kp.ExpectedAttentionPress(compression_ratio=ratio),  # 512 future, 4 sinks
        "adakv-snapkv": kp.AdaKVPress(kp.SnapKVPress(compression_ratio=ratio)),  # alpha_safeguard=0.2
        "adakv-knorm": kp.AdaKVPress(kp.KnormPress(compression_ratio=ratio)),
        "adakv-expected-attention": kp.AdaKVPress(kp.ExpectedAttentionPress(compression_ratio=ratio)),
        "keydiff": kp.KeyDiffPress(compression_ratio=ratio),
        "lagkv": kp.LagKVPress(compression_ratio=ratio),  # n_sink=4, lag_size=128
        "chunkkv-knorm": kp.ChunkKVPress(kp.KnormPress(compression_ratio=ratio)),  # chunk_length=20
        "curdkv": kp.CURPress(compression_ratio=ratio),  # 4 sinks, kv_product, windows of 16
        "criticalkv-snapkv": kp.CriticalKVPress(kp.SnapKVPress(compression_ratio=ratio)),  # eps 1e-4, stage 1 half
        # its leverage half draws a sketch from torch's global random state: only the attention half compares
        "compactor-attention": kp.CompactorPress(compression_ratio=ratio, blending=0.0),  # sinks 8 + 4, chunks of 256
    }


def describe(press) -> dict:
    import dataclasses

    out = {"class": type(press).__name__}
    for f in dataclasses.fields(press):
        v = getattr(press, f.name)
        out[f.name] = describe(v) if dataclasses.is_dataclass(v) else v
    return out


def matched_indices(full: torch.Tensor, kept: torch.Tensor) -> list[list[int]]:
    """For ``[1, H, T, D]`` keys and ``[1, H, K, D]`` gathered ones: each head's kept indices (sorted)."""
    out = []
    for h in range(full.shape[1]):
        eq = (kept[0, h][:, None, :] == full[0, h][None, :, :]).all(-1)  # [K, T]
        hits = eq.sum(-1)
        if not bool((hits == 1).all()):
            raise RuntimeError(f"head {h}: {int((hits != 1).sum())} kept keys do not match exactly one prompt key")
        out.append(sorted(eq.float().argmax(-1).tolist()))
    return out


def record(press, layers: dict) -> None:
    """Wrap ``press.compress`` (and its scorer's ``score``) to fill ``layers[layer_idx]``."""
    import kvpress as kp

    adakv = isinstance(press, kp.AdaKVPress)
    scorer = press.press if isinstance(press, (kp.AdaKVPress, kp.ChunkKVPress)) else press  # wrappers score inside
    compress, score = press.compress, scorer.score
    last = {}

    def score_and_keep(module, hidden_states, keys, values, attentions, kwargs):
        s = score(module, hidden_states, keys, values, attentions, kwargs)
        last["scores"], last["live"] = s.detach().clone(), s  # AdaKV raises the safeguarded ones in place
        return s

    def compress_and_record(module, hidden_states, keys, values, attentions, kwargs):
        full = keys.clone()
        k2, v2 = compress(module, hidden_states, keys, values, attentions, kwargs)
        b, h, t, _ = full.shape
        assert b == 1
        entry = {"scores": last["scores"][0].float().tolist(), "k_len": t}
        if adakv:
            _, heads, seqs = module.masked_key_indices
            keep = torch.ones(h, t, dtype=torch.bool)
            keep[heads.cpu(), seqs.cpu()] = False
            entry["kept"] = [torch.nonzero(keep[i]).flatten().tolist() for i in range(h)]
            entry["scores_after_safeguard"] = last["live"][0].float().tolist()
        else:
            entry["kept"] = matched_indices(full, k2)
        layers[module.layer_idx] = entry
        return k2, v2

    scorer.score = score_and_keep
    press.compress = compress_and_record


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(common.REFERENCE_MODEL))
    p.add_argument("--context", type=int, default=512, help="prompt tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ratios", default="0.25,0.5", help="kvpress compression_ratio values (share removed)")
    p.add_argument("--presses", default="", help="comma list (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(f"seed {args.seed}, context {args.context}, threads {args.threads}", file=sys.stderr)

    from importlib.metadata import version

    import transformers
    from transformers import DynamicCache

    model, _, source = common.load(args.model)
    ids = common.inputs.memory_prompt(source, args.seed, args.context)
    print(f"model {args.model} ({model.config._attn_implementation} attention), prompt {ids.shape[1]} tokens, "
          f"{common.fingerprint(ids[0].tolist())}", file=sys.stderr)
    results = []
    wanted = [n.strip() for n in args.presses.split(",") if n.strip()]
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for name, press in presses(ratio).items():
            if wanted and name not in wanted:
                continue
            start = time.perf_counter()
            layers: dict = {}
            record(press, layers)
            with torch.no_grad(), press(model):
                model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
            n_kept = [len(k) for e in layers.values() for k in e["kept"]]
            results.append({"press": name, "compression_ratio": ratio, "config": describe(press),
                            "n_kept_per_head": n_kept, "layers": [layers[i] for i in sorted(layers)]})
            print(f"  {name:26s} ratio {ratio:g}: kept per head {min(n_kept)}..{max(n_kept)} of {ids.shape[1]} "
                  f"({time.perf_counter() - start:.1f}s)", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "schema": "kvpress-fidelity/1",
        "model": args.model,
        "seed": args.seed,
        "context": args.context,
        "prompt": "kvplug.eval.inputs.memory_prompt(heldout, seed, context)",
        "prompt_ids": ids[0].tolist(),
        "fingerprint": common.fingerprint(ids[0].tolist()),
        "num_attention_heads": model.config.num_attention_heads,
        "num_key_value_heads": model.config.num_key_value_heads,
        "versions": {"kvpress": version("kvpress"), "transformers": transformers.__version__,
                     "torch": version("torch")},
        "results": results,
    }))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
