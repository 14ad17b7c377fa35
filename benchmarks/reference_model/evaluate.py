"""Evaluate a reference-model checkpoint on held-out text.

    python benchmarks/reference_model/evaluate.py --model models/kvplug-ref --out runs/eval.json

Reports
  - held-out perplexity of the model: the held-out token stream (``--heldout``: a uint16 shard,
    default ``data/tokens/heldout.bin``; falls back to ``MODEL/heldout.txt``, the sample shipped
    with the model) cut into windows of ``--ppl-window`` tokens, every token after the first of a
    window predicted; and, on exactly the same predicted tokens, the perplexity of a unigram model
    fitted on the training shard (``--train``, add-one smoothing; when the shard is missing, the
    unigram fitted on the held-out tokens themselves, an optimistic baseline, is the only one given);
  - retrieval accuracy per context length (``kvplug.retrieval``, evaluation key space, held-out
    text, depths evenly spread over [0, 1], ``--trials`` per length): a trial counts when greedy
    decoding of ``len(answer_ids)`` tokens yields exactly the value; plus accuracy by depth bin;
  - a greedy continuation of the beginning of one held-out file (``--example-tokens``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from kvplug.retrieval import LookupTask, encode_documents  # noqa: E402


@torch.no_grad()
def perplexity(model, ids: np.ndarray, window: int, device, batch: int, train_counts: np.ndarray | None):
    vocab = model.config.vocab_size
    n_win = len(ids) // window
    wins = torch.from_numpy(ids[: n_win * window].astype(np.int64)).view(n_win, window)
    rest = ids[n_win * window:]
    total, count = 0.0, 0
    targets = []
    chunks = [wins[i:i + batch] for i in range(0, n_win, batch)]
    if len(rest) > 1:
        chunks.append(torch.from_numpy(rest.astype(np.int64))[None])
    for x in chunks:
        x = x.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=x).logits
        ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), x[:, 1:].reshape(-1), reduction="sum")
        total += ce.item()
        count += x[:, 1:].numel()
        targets.append(x[:, 1:].reshape(-1).cpu().numpy())
    tgt = np.concatenate(targets)
    out = {"tokens": int(count), "window": window, "model_ce": total / count, "model_ppl": math.exp(total / count)}
    held_counts = np.bincount(tgt, minlength=vocab).astype(np.float64)
    for name, counts in (("unigram_train", train_counts), ("unigram_heldout_oracle", held_counts)):
        if counts is None:
            continue
        p = (counts + 1.0) / (counts.sum() + vocab)
        ce_u = float(-np.log(p[tgt]).mean())
        out[f"{name}_ce"] = ce_u
        out[f"{name}_ppl"] = math.exp(ce_u)
    return out


@torch.no_grad()
def greedy(model, prompts: list[list[int]], n_new: int, device) -> list[list[int]]:
    """Greedy decoding of equal-length prompts with the KV cache."""
    x = torch.tensor(prompts, dtype=torch.long, device=device)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, min_new_tokens=n_new,
                         do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, x.size(1):].tolist()


def retrieval(model, tok, held: list[int], lengths: list[int], trials: int, device, batch_tokens: int,
              seed: int, n_pairs: int) -> dict:
    task = LookupTask(tok, n_pairs=n_pairs)
    res = {}
    for L in lengths:
        rng = random.Random(seed * 100003 + L)
        samples = [task.sample(held, L, (i + 0.5) / trials, rng, split="eval") for i in range(trials)]
        ok = []
        bs = max(1, batch_tokens // L)
        t0 = time.time()
        for i in range(0, trials, bs):
            chunk = samples[i:i + bs]
            n_new = len(chunk[0].answer_ids)
            assert all(len(s.answer_ids) == n_new and len(s.prompt_ids) == len(chunk[0].prompt_ids) for s in chunk)
            gen = greedy(model, [s.prompt_ids for s in chunk], n_new, device)
            ok.extend(g == s.answer_ids for g, s in zip(gen, chunk))
        bins = [[] for _ in range(5)]
        for s, o in zip(samples, ok):
            bins[min(4, int(s.needle_depth * 5))].append(o)
        res[str(L)] = {"trials": trials, "correct": int(sum(ok)), "accuracy": sum(ok) / trials,
                       "accuracy_by_depth_quintile": [round(sum(b) / len(b), 3) if b else None for b in bins],
                       "seconds": round(time.time() - t0, 1)}
        print(f"retrieval {L}: {sum(ok)}/{trials} = {sum(ok) / trials:.3f}  by depth {res[str(L)]['accuracy_by_depth_quintile']}",
              flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "kvplug-ref"))
    ap.add_argument("--tokenizer", default="", help="tokenizer dir (default: --model)")
    ap.add_argument("--heldout", default=str(REPO / "data" / "tokens" / "heldout.bin"))
    ap.add_argument("--train", default=str(REPO / "data" / "tokens" / "train.bin"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--n-pairs", type=int, default=6, help="pairs per prompt: the needle + distractors")
    ap.add_argument("--ppl-window", type=int, default=8192)
    ap.add_argument("--ppl-max-tokens", type=int, default=0, help="evaluate perplexity on at most this many tokens")
    ap.add_argument("--batch-tokens", type=int, default=0, help="tokens per forward batch (default: by device)")
    ap.add_argument("--example-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    batch_tokens = args.batch_tokens or (262144 if device.type == "cuda" else 8192)
    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
    model.to(device).eval()
    if Path(args.heldout).exists():
        held = np.fromfile(args.heldout, dtype=np.uint16)
        held_src = args.heldout
    else:
        sample = Path(args.tokenizer or args.model) / "heldout.txt"
        held = np.array(encode_documents(tok, sample.read_text()), dtype=np.uint16)
        held_src = str(sample)
    train_counts = None
    if Path(args.train).exists():
        train_counts = np.bincount(np.fromfile(args.train, dtype=np.uint16), minlength=len(tok)).astype(np.float64)
    ppl_ids = held[: args.ppl_max_tokens] if args.ppl_max_tokens else held
    t0 = time.time()
    ppl = perplexity(model, ppl_ids, args.ppl_window, device, max(1, batch_tokens // args.ppl_window), train_counts)
    ppl["heldout_source"] = held_src
    ppl["seconds"] = round(time.time() - t0, 1)
    print("perplexity", json.dumps(ppl), flush=True)

    lengths = [int(x) for x in args.lengths.split(",") if x]
    ret = retrieval(model, tok, held.tolist(), lengths, args.trials, device, batch_tokens, args.seed, args.n_pairs)

    # greedy continuation of the start of a held-out file
    held_list = held.tolist()
    starts = [i for i, t in enumerate(held_list) if t == 0]
    rng = random.Random(args.seed)
    example = None
    for _ in range(50):
        s = rng.choice(starts)
        doc = held_list[s + 1:s + 1 + 4 * args.example_tokens]
        if len(doc) >= 2 * args.example_tokens and 0 not in doc:
            prompt = [0] + doc[: 2 * args.example_tokens]
            gen = greedy(model, [prompt], args.example_tokens, device)[0]
            example = {"prompt": tok.decode(prompt[1:]), "greedy_continuation": tok.decode(gen),
                       "actual_continuation": tok.decode(doc[2 * args.example_tokens: 3 * args.example_tokens])}
            break
    result = {"model": args.model, "device": str(device), "perplexity": ppl, "retrieval": ret,
              "retrieval_setup": {"n_pairs": args.n_pairs, "key_space": "eval", "seed": args.seed,
                                  "depths": "evenly spread (i + 0.5) / trials"},
              "example": example}
    if example:
        print("---- prompt (end) ----\n" + example["prompt"][-400:] + "\n---- greedy ----\n" + example["greedy_continuation"],
              flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
