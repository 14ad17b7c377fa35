"""Train ``attention_gate``'s gates on the frozen reference model (only the gates learn).

    python benchmarks/reference_model/train_attention_gate.py --time 150 \\
        --out kvplug/weights/attention_gate-kvplug-ref.safetensors                      # GPU
    python benchmarks/reference_model/train_attention_gate.py --device cpu --seq-len 512 \\
        --batch 2 --cont 32 --steps 3 --out /tmp/gate.safetensors                        # CPU smoke

What is trained, as kvplug runs the gate (``kvplug/scorers/attention_gate.py``): a prompt goes
through the model with full attention, then the cache keeps part of it and the tokens after the
prompt attend only to what is kept. So each training row (the reference model's rows: text, half
of them with a lookup episode, ``train.py``'s ``Batcher``) is split at ``s``: the prompt
``[0, s)`` runs through the frozen model as usual (the teacher's forward, which also gives each
layer's K/V and the full-attention logits), and the next ``--cont`` tokens run again (the
student) with each prompt token ``j`` older than the last ``--window`` prompt tokens seen through
``log sigmoid(g_j)`` added to its attention logit, ``g`` the gate's logit for the token's key and
value in that layer and KV head (Attention-Gate's soft mask, arXiv 2410.12876). The soft mask is
sharpened while training (``--sharpness``: the bias is ``beta * log sigmoid(g)``, ``beta`` rising
linearly from 1 to its end value over the first 80% of the run), so that by the end a token the
gate does not hold is as good as dropped, as kvplug drops it; the log prints the KL of the hard
selection kvplug makes (the top ``ceil(target * s) - window`` gates per KV head) beside the
training KL. Two earlier runs (H200, 2026-12-03): the soft mask alone (beta 1) trained to a KL of
0.008 but lost +20% to +50% perplexity once hard-selected (many tokens sat at a partial weight
inference cannot give); a straight-through hard forward (``--hard 1``) learned nothing useful,
since a dropped token has no attention weight and so no gradient to come back. A lookup row splits
at its first answer token (the query is then among the window's tokens, as in ``kvplug eval``'s
retrieval: the first digit comes from the prompt's own forward), a text row at a uniform point.

Loss: KL(teacher || student) on the continuation's next-token distributions (answer digits
weighted ``--answer-weight``), plus ``--penalty * (mean sigmoid(g) - --target)^2`` over the
tokens a gate may drop, which sets the share the gates keep (Attention-Gate's eviction-ratio
term). The gate reads per-feature standardized inputs; the standardization (from the first batch)
is folded into the first layer on export, so the shipped tensors take the raw features.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from kvplug import learned  # noqa: E402
from kvplug.retrieval import LookupTask  # noqa: E402
from kvplug.scorers.attention_gate import gate_features, gate_logits  # noqa: E402
from train import Batcher  # noqa: E402


DROPPED = -1e4
"""The bias of a dropped token in the hard forward (its attention weight underflows to 0)."""


def teacher(model, x: torch.Tensor):
    """Full-attention logits ``[B, T, V]`` and each layer's (keys, values) ``[B, Hkv, T, D]``."""
    out = model(input_ids=x, use_cache=True)
    cache = out.past_key_values
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    return out.logits, kv


def student(model, x: torch.Tensor, starts: torch.Tensor, cont: int, kv, bias):
    """Logits ``[B, cont, V]`` of tokens ``x[b, s_b : s_b + cont]`` attending over the teacher's
    K/V of the prompt ``[0, s_b)`` plus ``bias[l]`` ``[B, Hkv, T]`` (0 where a token is always
    seen) and over their own K/V; every other weight is the frozen model's."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m = model.model
    b = x.shape[0]
    pos = starts[:, None] + torch.arange(cont, device=x.device)  # [B, C]
    h = m.embed_tokens(x.gather(1, pos))
    cos, sin = m.rotary_emb(h, pos)
    t = kv[0][0].shape[2]
    seen = torch.arange(t, device=x.device)[None, None, :] <= pos[:, :, None]  # [B, C, T] causal
    for li, layer in enumerate(m.layers):
        a = layer.self_attn
        hq, hkv, d = model.config.num_attention_heads, model.config.num_key_value_heads, a.head_dim
        r = layer.input_layernorm(h)
        q = a.q_proj(r).view(b, cont, hq, d).transpose(1, 2)
        k = a.k_proj(r).view(b, cont, hkv, d).transpose(1, 2)
        v = a.v_proj(r).view(b, cont, hkv, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        idx = pos[:, None, :, None].expand(b, hkv, cont, d)
        keys = kv[li][0].scatter(2, idx, k.to(kv[li][0].dtype))  # own K/V replace the teacher's
        values = kv[li][1].scatter(2, idx, v.to(kv[li][1].dtype))
        g = hq // hkv
        qg = q.reshape(b, hkv, g, cont, d)
        scores = torch.einsum("bhgcd,bhtd->bhgct", qg, keys).float() * a.scaling
        scores = scores + bias[li][:, :, None, None, :].float()
        scores = scores.masked_fill(~seen[:, None, None], float("-inf"))
        p = scores.softmax(-1).to(values.dtype)
        o = torch.einsum("bhgct,bhtd->bhgcd", p, values).reshape(b, hq, cont, d)
        h = h + a.o_proj(o.transpose(1, 2).reshape(b, cont, hq * d))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(m.norm(h))


def split_points(answers, args, rng) -> list[int]:
    """Where each row's prompt ends: a lookup row at its first answer token, a text row at random."""
    t = args.seq_len
    starts = []
    for ans in answers:
        if ans:
            s = min(ans[0], t - args.cont)
        else:
            s = rng.randint(min(args.window + 256, t - args.cont), t - args.cont)
        starts.append(s)
    return starts


def eligible(starts: torch.Tensor, t: int, window: int) -> torch.Tensor:
    """``[B, T]``: prompt tokens a gate may hide (older than the window's last prompt tokens)."""
    return torch.arange(t, device=starts.device)[None, :] < (starts[:, None] - window)


def init_gate(layers: int, heads: int, feats: int, hidden: int, device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = {"w1": torch.randn(layers, heads, feats, hidden, generator=gen) / math.sqrt(feats),
         "b1": torch.zeros(layers, heads, hidden),
         "w2": torch.randn(layers, heads, hidden, generator=gen) / math.sqrt(hidden),
         "b2": torch.zeros(layers, heads)}
    return {k: v.to(device).requires_grad_(True) for k, v in w.items()}


def fold(w: dict, mu: torch.Tensor, sd: torch.Tensor) -> dict:
    """Gate tensors that take raw features, from ones trained on ``(f - mu) / sd`` (``[L, Hkv, F]``)."""
    w1 = w["w1"].detach().float() / sd[..., None]
    b1 = w["b1"].detach().float() - torch.einsum("lhf,lhfm->lhm", mu, w1)
    return {"w1": w1, "b1": b1, "w2": w["w2"].detach().float(), "b2": w["b2"].detach().float()}


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "kvplug-ref"))
    ap.add_argument("--data", default=str(REPO / "data" / "tokens"))
    ap.add_argument("--out", required=True, help="the gate weights (.safetensors)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cont", type=int, default=256, help="continuation tokens per row (the student's)")
    ap.add_argument("--window", type=int, default=32, help="last prompt tokens always seen")
    ap.add_argument("--target", type=float, default=0.25, help="share of droppable tokens the gates keep")
    ap.add_argument("--penalty", type=float, default=20.0)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--sharpness", type=float, default=12.0, help="end value of beta (the soft mask's scale)")
    ap.add_argument("--hard", type=int, default=0,
                    help="1: the student sees the hard top-k kvplug keeps (straight-through gradient of the "
                         "soft mask); 0: the soft mask alone")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--time", type=float, default=150.0, help="training seconds")
    ap.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: by --time)")
    ap.add_argument("--answer-weight", type=float, default=20.0)
    ap.add_argument("--lookup-frac", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--trained-for", default="kvplug-ref")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    print(f"seed {args.seed}", flush=True)
    tok = AutoTokenizer.from_pretrained(args.model)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.config
    layers, heads, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    tokens = np.fromfile(Path(args.data) / "train.bin", dtype=np.uint16)
    bargs = SimpleNamespace(seq_len=args.seq_len, lookup_frac=args.lookup_frac, lookup_min=256, max_pairs=8,
                            batch=args.batch, answer_weight=args.answer_weight)
    batcher = Batcher(tokens, LookupTask(tok), bargs, seed=args.seed)
    rng = batcher.rng
    feats = d // 2 + d
    w = init_gate(layers, heads, feats, args.hidden, device, args.seed)
    opt = torch.optim.AdamW(list(w.values()), lr=args.lr, weight_decay=0.0)
    mu = sd = None
    t0 = time.time()
    step = 0
    log = []
    while True:
        if (args.steps and step >= args.steps) or (not args.steps and time.time() - t0 >= args.time):
            break
        rows, answers = zip(*(batcher.row() for _ in range(args.batch)))
        starts_l = split_points(answers, args, rng)
        x = torch.tensor(rows, dtype=torch.long, device=device)
        starts = torch.tensor(starts_l, device=device)
        weight = torch.ones(args.batch, args.cont, device=device)
        for bi, (s, ans) in enumerate(zip(starts_l, answers)):
            for i in ans:  # token i is predicted at position i - 1
                if s <= i - 1 < s + args.cont:
                    weight[bi, i - 1 - s] = args.answer_weight
        with torch.no_grad():
            logits_t, kv = teacher(model, x[:, :args.seq_len])
            pos = starts[:, None] + torch.arange(args.cont, device=device)
            ref = logits_t.gather(1, pos[..., None].expand(-1, -1, logits_t.shape[-1])).float().log_softmax(-1)
            del logits_t
            f = [gate_features(k, v) for k, v in kv]  # [B, Hkv, T, F] per layer
            if mu is None:
                mu = torch.stack([fi.mean((0, 2)) for fi in f])  # [L, Hkv, F]
                sd = torch.stack([fi.std((0, 2)) for fi in f]).clamp(min=1e-3)
        frac = (step / args.steps) if args.steps else (time.time() - t0) / args.time
        beta = 1.0 + (args.sharpness - 1.0) * min(1.0, frac / 0.8)
        hide = eligible(starts, args.seq_len, args.window)  # [B, T]
        # what kvplug keeps of each prompt: ceil(target * s) tokens, the window's among them
        n_keep = (torch.ceil(args.target * starts.double()).long() - args.window).clamp(min=0)  # [B]
        bias, shares, hard_bias = [], [], []
        for li in range(layers):
            g = gate_logits((f[li] - mu[li][None, :, None]) / sd[li][None, :, None], w, li)  # [B, Hkv, T]
            with torch.no_grad():  # kvplug's selection: the top n_keep gates per KV head, the rest dropped
                rank = g.masked_fill(~hide[:, None, :], float("-inf")).argsort(-1, descending=True).argsort(-1)
                hard = torch.where(hide[:, None, :] & (rank >= n_keep[:, None, None]), DROPPED, 0.0)
            hard_bias.append(hard)
            soft = beta * F.logsigmoid(g)
            if args.hard:  # forward: the hard selection; backward: the soft mask (straight-through)
                soft = soft + (hard - soft).detach()
            bias.append(torch.where(hide[:, None, :], soft, 0.0))
            shares.append(torch.sigmoid(g)[hide[:, None, :].expand_as(g)])
        share = torch.cat(shares).mean()
        out = student(model, x, starts, args.cont, kv, bias).float().log_softmax(-1)
        kl = (ref.exp() * (ref - out)).sum(-1)  # [B, C]
        loss_kl = (kl * weight).sum() / weight.sum()
        loss = loss_kl + args.penalty * (share - args.target) ** 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 25 == 0 or step == 1 or device.type == "cpu":
            with torch.no_grad():
                out_h = student(model, x, starts, args.cont, kv, hard_bias).float().log_softmax(-1)
                kl_hard = ((ref.exp() * (ref - out_h)).sum(-1) * weight).sum() / weight.sum()
            ans_pos = weight > 1
            ok = (out_h.argmax(-1) == ref.argmax(-1))[ans_pos].float().mean().item() if ans_pos.any() else float("nan")
            rec = {"step": step, "s": round(time.time() - t0, 1), "beta": round(beta, 2), "kl": round(loss_kl.item(), 5),
                   "kl_hard": round(kl_hard.item(), 5),
                   "share": round(share.item(), 4), "answer_agree_hard": round(ok, 4)}
            log.append(rec)
            print(json.dumps(rec), flush=True)
    folded = fold(w, mu, sd)
    with torch.no_grad():  # the folded gate on raw features equals the trained one on standardized ones
        li = layers - 1
        a = gate_logits(f[li].float(), folded, li)
        b = gate_logits(((f[li] - mu[li][None, :, None]) / sd[li][None, :, None]).float(),
                        {k: v.float() for k, v in w.items()}, li)
        err = (a - b).abs().max().item()
        print(f"fold check: max |raw - standardized| logit {err:.2e}", flush=True)
        assert err < 1e-2 * (1 + b.abs().max().item()), err
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    learned.save(args.out, "attention_gate", folded, num_layers=layers, num_kv_heads=heads, head_dim=d,
                 trained_for=args.trained_for, target=args.target, window=args.window, steps=step,
                 seed=args.seed, seconds=round(time.time() - t0, 1), rope_pairs="half")
    Path(args.out + ".log.json").write_text(json.dumps({"args": vars(args), "log": log}, indent=1))
    print(f"done: {step} steps, {time.time() - t0:.1f} s, {Path(args.out).stat().st_size} bytes -> {args.out}",
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
