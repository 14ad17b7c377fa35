"""Train the kvplug reference model (a small LlamaForCausalLM) on the uint16 token shard.

    python benchmarks/reference_model/train.py --out runs/ref --total-time 480          # GPU
    python benchmarks/reference_model/train.py --preset tiny --device cpu --out runs/tiny \\
        --seq-len 512 --batch 2 --max-steps 5                                            # CPU smoke

bf16 autocast with fp32 master weights, SDPA attention, AdamW, linear warm-up then cosine decay
over a planned wall-time budget (``--total-time`` seconds of training, summed over calls), so a
run can be resumed across calls: the state lives in ``OUT/ckpt.pt`` (model, optimizer, step, tokens,
elapsed time, RNG) and is written every ``--ckpt-every`` seconds and at the end; each save also
exports the model as a Hugging Face checkpoint (bf16 safetensors + config + tokenizer) to
``OUT/hf``. ``--call-time`` bounds the training time of this call.

Every row is ``--seq-len`` tokens of the training shard; a share ``--lookup-frac`` of the rows
carries one lookup episode from ``kvplug.retrieval`` (length uniform in [--lookup-min, seq-len],
training key space, followed by 0-2 extra queries of other keys of the episode) at a random
offset inside real text; the answer digits are weighted ``--answer-weight`` times in the loss.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.append(str(REPO))  # after site-packages: an installed kvplug (with kvplug.adapters) wins

from kvplug.retrieval import LookupTask  # noqa: E402

PRESETS = {
    # 5.90 M parameters, 11.8 MB in bf16
    "ref": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=8,
                num_key_value_heads=2, head_dim=64),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=16),
}


def build_config(preset: str, vocab_size: int, max_pos: int, rope_theta: float, arch: str = "llama",
                 lckv_iterations: int = 3, lckv_grad_iterations: int = 2):
    from transformers import LlamaConfig

    config_cls, extra = LlamaConfig, {}
    if arch == "lckv":  # Layer-Condensed KV (kvplug.adapters.hf.lckv): every layer attends to the top layer's K/V
        from kvplug.adapters.hf.lckv import LckvConfig

        config_cls = LckvConfig
        extra = dict(lckv_iterations=lckv_iterations, lckv_grad_iterations=lckv_grad_iterations)
    cfg = config_cls(**extra,
        vocab_size=vocab_size, max_position_embeddings=max_pos, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        attention_bias=False, mlp_bias=False, hidden_act="silu", initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        **PRESETS[preset],
    )
    return cfg


class Batcher:
    def __init__(self, tokens: np.ndarray, task: LookupTask, args, seed: int):
        self.tokens = tokens
        self.task = task
        self.args = args
        self.rng = random.Random(seed)

    def text(self, n: int) -> list[int]:
        s = self.rng.randrange(len(self.tokens) - n)
        return self.tokens[s:s + n].tolist()

    def row(self) -> tuple[list[int], list[int]]:
        """Returns (ids of length seq_len + 1, indices (into ids) of answer tokens)."""
        a = self.args
        n = a.seq_len + 1
        if self.rng.random() >= a.lookup_frac:
            return self.text(n), []
        L = self.rng.randint(min(a.lookup_min, a.seq_len), a.seq_len)
        smp = self.task.sample(self.tokens, L, self.rng.random(), self.rng, split="train",
                               n_pairs=self.rng.randint(1, a.max_pairs))
        ids = smp.prompt_ids + smp.answer_ids
        ans = list(range(len(smp.prompt_ids), len(ids)))
        others = [p for p in smp.pairs if p.key != smp.key]
        self.rng.shuffle(others)
        for p in others[: self.rng.randint(0, 2)]:
            q, v = self.task.query_ids(p.key), self.task.value_ids(p.value)
            if len(ids) + len(q) + len(v) > n:
                break
            ans.extend(range(len(ids) + len(q), len(ids) + len(q) + len(v)))
            ids = ids + q + v
        pre = self.rng.randint(0, n - len(ids))
        row = self.text(pre) + ids + self.text(n - pre - len(ids))
        ans = [i + pre for i in ans]
        return row[:n], ans

    def batch(self, device):
        rows, weights = [], []
        for _ in range(self.args.batch):
            r, ans = self.row()
            rows.append(r)
            w = np.ones(self.args.seq_len, dtype=np.float32)
            for i in ans:  # token i is predicted at position i - 1
                w[i - 1] = self.args.answer_weight
            weights.append(w)
        x = torch.tensor(rows, dtype=torch.long)
        w = torch.from_numpy(np.stack(weights))
        return (x[:, :-1].to(device, non_blocking=True), x[:, 1:].to(device, non_blocking=True),
                w.to(device, non_blocking=True))


def lr_at(step: int, frac: float, args) -> float:
    warm = min(1.0, (step + 1) / args.warmup)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return args.lr * warm * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cos)


def export_hf(model, tokenizer_dir: Path | None, out: Path) -> None:
    """Save a bf16 copy of ``model`` + tokenizer files as a Hugging Face checkpoint."""
    import shutil
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    export = copy.deepcopy(model).to(torch.bfloat16)
    export.config.dtype = torch.bfloat16
    export.save_pretrained(str(out), safe_serialization=True)
    del export
    GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0, do_sample=False).save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if tokenizer_dir is not None and (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer, LlamaForCausalLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO / "data" / "tokens"))
    ap.add_argument("--tokenizer", default=str(REPO / "models" / "kvplug-ref"))
    ap.add_argument("--out", default=str(REPO / "runs" / "ref"))
    ap.add_argument("--preset", default="ref", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", default="llama", choices=("llama", "lckv"),
                    help="lckv: Layer-Condensed KV (arXiv 2405.10637), one layer's K/V for all layers")
    ap.add_argument("--lckv-iterations", type=int, default=3, help="lckv: parallel passes per row")
    ap.add_argument("--lckv-grad-iterations", type=int, default=2, help="lckv: passes back-propagated")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--rope-theta", type=float, default=1e5)
    ap.add_argument("--lookup-frac", type=float, default=0.5)
    ap.add_argument("--lookup-min", type=int, default=256)
    ap.add_argument("--max-pairs", type=int, default=8)
    ap.add_argument("--answer-weight", type=float, default=20.0)
    ap.add_argument("--total-time", type=float, default=480.0, help="planned training seconds, all calls")
    ap.add_argument("--total-tokens", type=int, default=0,
                    help="train to this many tokens instead: the schedule follows tokens, not time (0: off)")
    ap.add_argument("--call-time", type=float, default=1e9, help="training seconds in this call")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    ap.add_argument("--ckpt-every", type=float, default=60.0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--init", default="", help="start from this HF checkpoint's weights (fresh optimizer), not at random")
    ap.add_argument("--export-dir", default="", help="where each save exports the HF checkpoint (default OUT/hf)")
    ap.add_argument("--no-export-tokenizer", action="store_true", help="do not copy the tokenizer files there")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    tokens = np.fromfile(Path(args.data) / "train.bin", dtype=np.uint16)
    vocab = len(tok)
    assert int(tokens.max()) < vocab
    torch.manual_seed(args.seed)
    cfg = build_config(args.preset, vocab, max(8192, args.seq_len), args.rope_theta, args.arch,
                       args.lckv_iterations, args.lckv_grad_iterations)
    if args.arch == "lckv":
        from kvplug.adapters.hf.lckv import LckvForCausalLM

        model = LckvForCausalLM(cfg).to(device)
    else:
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).to(device)
    ckpt = out / "ckpt.pt"
    if args.init and not ckpt.exists():
        from transformers import AutoModelForCausalLM

        model.load_state_dict(AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32).state_dict())
        print(f"weights from {args.init}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    state = {"step": 0, "tokens": 0, "elapsed": 0.0, "seed": args.seed}
    if ckpt.exists():
        st = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        state = st["state"]
        print(f"resumed from {ckpt}: step {state['step']}, {state['tokens']} tokens, {state['elapsed']:.0f}s",
              flush=True)
    batcher = Batcher(tokens, LookupTask(tok), args, seed=args.seed + 1000 * state["step"])
    log = open(out / "train_log.jsonl", "a")
    print(f"params {n_params} ({n_params * 2 / 1e6:.2f} MB bf16), train tokens {len(tokens)}, "
          f"device {device}, args {vars(args)}", flush=True)

    def save():
        tmp = out / "ckpt.pt.tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state,
                    "config": cfg.to_dict(), "args": vars(args)}, tmp)
        os.replace(tmp, ckpt)
        export_dir = Path(args.export_dir) if args.export_dir else out / "hf"
        export_hf(model, None if args.no_export_tokenizer else Path(args.tokenizer), export_dir)
        (export_dir / "training_state.json").write_text(json.dumps(state, indent=1))

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=True)
    model.train()
    t_call = time.time()
    t_last = time.time()
    t_ckpt = time.time()
    acc_loss = torch.zeros((), device=device)
    acc_text = torch.zeros((), device=device)
    acc_ans_ok = torch.zeros((), device=device)
    acc_ans_n = torch.zeros((), device=device)
    n_acc = 0
    steps_this_call = 0
    while True:
        now = time.time()
        frac = state["tokens"] / args.total_tokens if args.total_tokens else state["elapsed"] / args.total_time
        if frac >= 1 or now - t_call >= args.call_time:
            break
        if args.max_steps and steps_this_call >= args.max_steps:
            break
        lr = lr_at(state["step"], frac, args)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y, w = batcher.batch(device)
        with autocast:
            logits = model(input_ids=x).logits
        ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        wf = w.view(-1)
        loss = (ce * wf).sum() / wf.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            is_ans = wf > 1
            text_mask = ~is_ans
            acc_loss += loss.detach()
            acc_text += (ce * text_mask).sum() / text_mask.sum().clamp(min=1)
            acc_ans_ok += ((logits.view(-1, logits.size(-1)).argmax(-1) == y.reshape(-1)) & is_ans).sum()
            acc_ans_n += is_ans.sum()
            n_acc += 1
        steps_this_call += 1
        state["step"] += 1
        state["tokens"] += x.numel()
        if state["step"] % args.log_every == 0 or device.type == "cpu":
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.time()
            state["elapsed"] += now - t_last
            t_last = now
            rec = {"step": state["step"], "tokens": state["tokens"], "elapsed": round(state["elapsed"], 1),
                   "lr": lr, "loss": acc_loss.item() / n_acc, "text_ce": acc_text.item() / n_acc,
                   "answer_tok_acc": acc_ans_ok.item() / max(1.0, acc_ans_n.item())}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            acc_loss.zero_(); acc_text.zero_(); acc_ans_ok.zero_(); acc_ans_n.zero_()
            n_acc = 0
            if now - t_ckpt >= args.ckpt_every:
                save()
                t_ckpt = time.time()
                t_last = t_ckpt  # saving time is not training time
    if device.type == "cuda":
        torch.cuda.synchronize()
    state["elapsed"] += time.time() - t_last
    save()
    print(f"done: step {state['step']}, tokens {state['tokens']}, training time {state['elapsed']:.1f}s, "
          f"call wall {time.time() - t_call:.1f}s"
          + (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""),
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
