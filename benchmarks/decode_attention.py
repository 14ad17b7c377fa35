"""Paged decode attention: correctness on the GPU, then timing against fp16 SDPA.

    PYTHONUNBUFFERED=1 python benchmarks/decode_attention.py --out $OUT     # on the GPU
    ... --vllm        # also vLLM's own int4_per_token_head decode and FlashAttention (bf16), where installed
    python benchmarks/decode_attention.py --shapes 512x4096 --bits 4 --block-sizes 16 \
        --variants 64:2:2:0:16,128:4:3:0:16                               # chosen variants
    TRITON_INTERPRET=1 python benchmarks/decode_attention.py --smoke        # CPU, tiny shapes

For each (B, L): fp16 SDPA (``F.scaled_dot_product_attention``, enable_gqa, contiguous K/V; cuDNN
SDPA turned off, see docs/BENCHMARKS.md) against our paged kernel with codec none (fp16) and
int8/int4/int2, over several block sizes / tiles / warps / split counts. The paged caches are
filled by ``store_kv`` from the same K/V, with blocks scattered at random. Times are medians of
``triton.testing.do_bench``; GB/s counts the bytes the kernel must read (K/V codes + scale/zero
of every valid token, block table, q) and write (output, split partials).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from kvplug.triton_ops import (DECODE_TUNING, PagedLayout, decode_attention, decode_attention_reference,
                               default_num_splits, store_kv, store_kv_reference)

HQ, HKV, D = 32, 8, 128
SHAPES = [(8, 32768), (1, 131072), (16, 8192), (64, 4096)]
NAME = {16: "fp16", 8: "int8", 4: "int4", 2: "int2"}


def parse_format(text: str) -> tuple:
    """``--bits`` entry: ``4`` (keys and values at 4 bits), ``8/4`` (8-bit keys, 4-bit values), a
    trailing ``s`` for the symmetric (scale-only) format (``3/2s``: 3-bit keys, 2-bit values)."""
    sym = text.endswith("s")
    widths = tuple(int(x) for x in text.rstrip("s").split("/"))
    if len(widths) not in (1, 2):
        raise SystemExit(f"--bits: {text!r} is not BITS or KEY/VALUE bits")
    return (widths[0], widths[-1]) + (("sym",) if sym else ())


def fmt_name(fmt) -> str:
    k, v = fmt[:2]
    return (NAME.get(k, f"int{k}") if k == v else f"k{k}v{v}") + ("s" if len(fmt) > 2 else "")


def layout(fmt, bs) -> PagedLayout:
    k, v = fmt[:2]
    return PagedLayout(bs, HKV, D, k, torch.float16, None if v == k else v, symmetric=len(fmt) > 2)


def bench(fn, dev):
    if dev == "cuda":
        import triton
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3   # us
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e6


def kv_bytes(fmt, b, length):
    return b * length * layout(fmt, 16).bytes_per_token()


def check_store(dev, log):
    """Store kernel vs the core codec on the GPU: codes/scale/zero bit-exact?"""
    res = {}
    for fmt in ((16, 16), (8, 8), (4, 4), (2, 2), (8, 4), (4, 2), (3, 2, "sym"), (3, 4), (2, 2, "sym")):
        lay = layout(fmt, 16)
        t = 4096 if dev == "cuda" else 64
        nb = t // 16 + 4
        k = (torch.randn(t, HKV, D, device=dev) * torch.rand(t, HKV, 1, device=dev) * 3).half()
        v = (torch.randn(t, HKV, D, device=dev) + torch.randn(t, HKV, 1, device=dev)).half()
        slots = torch.randperm(nb * 16, device=dev)[:t].int()
        a = lay.allocate(nb, dev).zero_()
        r = a.clone()
        store_kv(k, v, a, slots, lay)
        store_kv_reference(k, v, r, slots, lay)
        av, rv = a.view(torch.uint8), r.view(torch.uint8)
        bad = int((av != rv).sum())
        res[fmt_name(fmt)] = bad
        log(f"store {fmt_name(fmt)}: {bad} differing bytes of {av.numel()}")
        if bad and lay.quantized:
            from kvplug.quant import unpack
            for role in (0, 1):
                ca, cr = lay.role_codes(a, role), lay.role_codes(r, role)
                ua, ur = unpack(ca, lay.role_bits(role)).int(), unpack(cr, lay.role_bits(role)).int()
                log(f"  role {role}: codes differing: {int((ua != ur).sum())}, max |diff| "
                    f"{int((ua - ur).abs().max())}; meta differing: "
                    f"{int((lay.role_meta(a, role) != lay.role_meta(r, role)).sum())}; bytes {int((ca != cr).sum())}")
    return res


def build(fmt, bs, k_tok, v_tok, b, length, dev):
    """A paged cache of B sequences of `length` tokens, blocks scattered, filled by store_kv."""
    lay = layout(fmt, bs)
    nblk = length // bs
    cache = lay.allocate(b * nblk, dev)
    bt = torch.randperm(b * nblk, device=dev).view(b, nblk).int()
    t = torch.arange(length, device=dev)
    for i in range(b):
        slots = (bt[i, t // bs].long() * bs + t % bs).int()
        store_kv(k_tok[i], v_tok[i], cache, slots, lay)
    return lay, cache, bt


def vllm_rows(q, k_tok, v_tok, o_sdpa, t_sdpa, b, length, dev, log):
    """vLLM's own decode kernels at the same shape, where vLLM (a CUDA build) is installed:
    ``int4_per_token_head`` (its Triton kernel, with the rotation of q and the output it applies,
    the 3D split below 128 // kv_heads sequences as its builder sets it) and FlashAttention over a
    bf16 paged cache. Layouts and arguments: docs/VLLM_INTERNALS.md section 6. Checked against fp16
    SDPA on the raw K/V (their format's error included); rows ``vllm-int4`` and ``vllm-fa-bf16``."""
    rows = []
    try:
        cases = _vllm_cases(q, k_tok, v_tok, b, length, dev)
    except Exception as e:  # noqa: BLE001  (not installed, a CPU build, or an API that moved)
        log(f"vLLM's kernels not run: {type(e).__name__}: {str(e)[:300]}")
        return rows
    for name, fn, res, nbytes in cases:
        try:
            res.fill_(float("nan"))
            fn()
            rel = ((res.float() - o_sdpa).norm() / o_sdpa.norm()).item()
            us = bench(fn, dev)
        except Exception as e:  # noqa: BLE001
            log(f"  {name}: failed {type(e).__name__}: {str(e)[:300]}")
            continue
        rows.append(dict(B=b, L=length, kernel=name, us=us, gbs=nbytes / us / 1e3, speedup=t_sdpa / us,
                         rel_err_sdpa=rel, finite=bool(torch.isfinite(res).all())))
        log(f"  {name}: {us:8.1f} us {nbytes / us / 1e3:6.0f} GB/s x{t_sdpa / us:.2f} vs SDPA, rel err vs fp16 SDPA "
            f"{rel:.2e}, all written {rows[-1]['finite']}")
    return rows


def _vllm_cases(q, k_tok, v_tok, b, length, dev):
    """vLLM's int4 cache and bf16 pages filled from the same K/V: ``(name, run, output, bytes read)``."""
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func, get_flash_attn_version
    from vllm.v1.attention.ops.int4_per_token_head import reshape_and_cache_int4, unified_attention_int4

    bs = 16
    nblk = length // bs
    bt = torch.randperm(b * nblk, device=dev).view(b, nblk).int()
    t = torch.arange(length, device=dev)
    cu = torch.arange(b + 1, dtype=torch.int32, device=dev)
    used = torch.full((b,), length, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    # int4_per_token_head: [blocks, heads, slot, 2 * (D/2 + 4)] bytes; K and V views [blocks, slot, heads, D/2 + 4]
    kv = torch.zeros(b * nblk, HKV, bs, 2 * (D // 2 + 4), dtype=torch.uint8, device=dev)
    kc, vc = kv.transpose(1, 2).split(D // 2 + 4, dim=-1)
    ks = torch.empty(b * nblk, bs, HKV, dtype=torch.float32, device=dev)
    vs = torch.empty_like(ks)
    for i in range(b):
        slots = bt[i, t // bs].long() * bs + t % bs
        reshape_and_cache_int4(k_tok[i], v_tok[i], kc, vc, slots, k_scale_cache=ks, v_scale_cache=vs)
    thr, segs = 128 // HKV, 16
    segm = (torch.empty(thr, HQ, segs, D, dtype=torch.float32, device=dev),
            torch.empty(thr, HQ, segs, dtype=torch.float32, device=dev),
            torch.empty(thr, HQ, segs, dtype=torch.float32, device=dev))

    def int4():
        unified_attention_int4(
            q, kc, vc, out, cu_seqlens_q=cu, max_seqlen_q=1, seqused_k=used, max_seqlen_k=length,
            softmax_scale=D ** -0.5, window_size=(-1, -1), block_table=bt, softcap=0.0, sinks=None,
            alibi_slopes=None, use_alibi_sqrt=False, qq_bias=None, output_scale=None, mm_prefix_range=None,
            k_scale_cache=ks, v_scale_cache=vs, seq_threshold_3D=thr, num_par_softmax_segments=segs,
            softmax_segm_output=segm[0], softmax_segm_max=segm[1], softmax_segm_expsum=segm[2])

    # FlashAttention over bf16 pages [blocks, slot, heads, D]
    kb = torch.empty(b * nblk, bs, HKV, D, dtype=torch.bfloat16, device=dev)
    vb = torch.empty_like(kb)
    for i in range(b):
        kb[bt[i, t // bs].long(), t % bs] = k_tok[i].bfloat16()
        vb[bt[i, t // bs].long(), t % bs] = v_tok[i].bfloat16()
    qb = q.bfloat16()
    outb = torch.empty_like(qb)
    version = get_flash_attn_version()

    def fa():
        flash_attn_varlen_func(qb, kb, vb, max_seqlen_q=1, cu_seqlens_q=cu, max_seqlen_k=length, seqused_k=used,
                               softmax_scale=D ** -0.5, causal=True, block_table=bt, out=outb, fa_version=version)

    return (("vllm-int4", int4, out, b * length * HKV * 2 * (D // 2 + 4)),
            ("vllm-fa-bf16", fa, outb, b * length * HKV * 2 * D * 2))


def parse_variant(v):
    nums = v.split(":")
    if len(nums) not in (4, 5) or not all(x.lstrip("-").isdigit() for x in nums):
        raise SystemExit(f"--variants: {v!r} is not block_n:warps:stages:splits[:maxnreg]")
    bn, nw, ns, sp, *mr = (int(x) for x in nums)
    mr = mr[0] if mr else 0
    return bn, nw, ns, sp, None if mr == -1 else mr


def variants(fmt, bs, quick):
    """The built-in sweep around the tuned defaults (0 = the layout's default, splits -N = N x
    the default's)."""
    if fmt[0] == 16:
        return [(0, 0, 0, 0, 0)] + ([] if quick else [(32, 4, 2, 0, 0), (64, 8, 2, 0, 0)])
    base = [(0, 0, 0, 0, 0)]
    if quick or bs != 16:
        return base
    return base + [(32, 1, 2, -2, 0), (64, 1, 2, 0, None), (64, 2, 2, 0, 0), (128, 2, 3, 0, 0), (32, 1, 3, 0, 0),
                   (32, 1, 2, 0, 96), (16, 1, 2, 0, 96)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/decode_attention"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (interpreter)")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds; later variants are skipped")
    ap.add_argument("--shapes", default="", help="e.g. 8x32768,1x131072")
    ap.add_argument("--quick", action="store_true", help="a few variants, block size 16 only")
    ap.add_argument("--bits", default="16,8,4,2", help="formats to run (16 = fp16; 8/4 = 8-bit keys, 4-bit values)")
    ap.add_argument("--block-sizes", default="16,32")
    ap.add_argument("--variants", default="",
                    help="instead of the built-in list: block_n:warps:stages:splits[:maxnreg],... (0 = the layout's "
                         "default; splits -N = N times the default; maxnreg -1 = no limit)")
    ap.add_argument("--vllm", action="store_true", help="also time vLLM's own int4_per_token_head decode and "
                    "FlashAttention (bf16, paged) at each shape, where vLLM is installed")
    ap.add_argument("--rounds", type=int, default=1, help="time every variant this many times, "
                    "alternating the order (median reported, with the spread)")
    ap.add_argument("--sm90-report", action="store_true",
                    help="no GPU needed: compile for sm_90 and report registers / loop instruction mix")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "decode_attention.log"), "w")
    t_start = time.time()

    def log(*a):
        s = " ".join(str(x) for x in a)
        print(s, flush=True)
        logf.write(s + "\n")
        logf.flush()

    if args.sm90_report:
        os.environ.pop("TRITON_INTERPRET", None)
        sm90_report(args.out, log)
        return
    shapes = SHAPES if not args.smoke else [(2, 256), (1, 512)]
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    if dev == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
        import triton
        p = torch.cuda.get_device_properties(0)
        log(f"device {p.name}, {p.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}; "
            f"cuDNN SDPA disabled")
        # copy bandwidth (read + write), for reference
        x = torch.empty(2 << 30, dtype=torch.uint8, device=dev)
        y = torch.empty_like(x)
        us = bench(lambda: y.copy_(x), dev)
        log(f"copy 2 GiB: {us:.0f} us = {2 * x.numel() / us / 1e3:.0f} GB/s (read + write)")
        del x, y
    results = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "rows": [],
               "store_bitexact": check_store(dev, log)}
    torch.manual_seed(0)

    for (b, length) in shapes:
        q = torch.randn(b, HQ, D, device=dev).half()
        k = torch.randn(b, HKV, length, D, device=dev).half()
        v = torch.randn(b, HKV, length, D, device=dev).half()
        qs = q[:, :, None, :]
        sdpa = lambda: F.scaled_dot_product_attention(qs, k, v, enable_gqa=True)  # noqa: E731
        o_sdpa = sdpa()[:, :, 0].float()
        t_sdpa = bench(sdpa, dev)
        by_sdpa = 2 * b * HKV * length * D * 2
        log(f"\n== B={b} L={length}: SDPA fp16 {t_sdpa:.1f} us, {by_sdpa / t_sdpa / 1e3:.0f} GB/s")
        results["rows"].append(dict(B=b, L=length, kernel="sdpa-fp16", us=t_sdpa, gbs=by_sdpa / t_sdpa / 1e3))
        k_tok = k.transpose(1, 2).contiguous()      # [B, L, H, D]
        v_tok = v.transpose(1, 2).contiguous()      # k, v stay: SDPA is timed again in every round
        if args.vllm:
            results["rows"] += vllm_rows(q, k_tok, v_tok, o_sdpa, t_sdpa, b, length, dev, log)
        lens = torch.full((b,), length, dtype=torch.int32, device=dev)
        for fmt in [parse_format(x) for x in args.bits.split(",")]:
            name_f, tune = fmt_name(fmt), DECODE_TUNING[min(fmt[:2])]  # as decode_attention picks
            for bs in ([int(x) for x in args.block_sizes.split(",")] if not args.smoke else (16,)):
                if time.time() - t_start > args.budget:
                    log(f"budget reached, skipping {name_f} bs={bs}")
                    continue
                try:
                    lay, cache, bt = build(fmt, bs, k_tok, v_tok, b, length, dev)
                except Exception as e:  # noqa: BLE001
                    log(f"{name_f} bs={bs}: build failed: {type(e).__name__}: {e}")
                    continue
                # correctness against the dequantized reference (and the unquantized SDPA)
                out = torch.full_like(q, float("nan"))
                try:
                    decode_attention(q, cache, lay, bt, lens, out=out)
                except Exception as e:  # noqa: BLE001
                    log(f"{name_f} bs={bs}: kernel failed: {type(e).__name__}: {str(e)[:2000]}")
                    del cache
                    continue
                ref = decode_attention_reference(q, cache, lay, bt, lens)
                rel = ((out.float() - ref).norm() / ref.norm()).item()
                rel_sdpa = ((out.float() - o_sdpa).norm() / o_sdpa.norm()).item()
                finite = bool(torch.isfinite(out).all())
                log(f"{name_f} bs={bs}: rel err vs dequant ref {rel:.2e}, vs fp16 SDPA {rel_sdpa:.2e}, "
                    f"all written {finite}")
                nbytes = kv_bytes(fmt, b, length) + bt.numel() * 4 + q.numel() * 2 * 2
                # (block_n, warps, stages, splits, maxnreg): 0 = the layout's default; splits -N = N x the default
                configs = variants(fmt, bs, args.quick)
                if args.variants:
                    configs = [parse_variant(v) for v in args.variants.split(",")]
                if args.smoke:
                    configs = configs[:3]
                ready = []
                for bn, nw, ns, sp, mr in configs:
                    if time.time() - t_start > args.budget:
                        break
                    auto = default_num_splits(b, HKV, length, bn or tune[0], torch.cuda.get_device_properties(0)
                                              .multi_processor_count if dev == "cuda" else 4, tune[4])
                    splits = auto if sp == 0 else (auto * -sp if sp < 0 else sp)
                    fn = (lambda bn=bn, nw=nw, ns=ns, splits=splits, mr=mr:  # noqa: E731
                          decode_attention(q, cache, lay, bt, lens, block_n=bn or None, num_warps=nw or None,
                                           num_stages=ns or None, num_splits=splits, maxnreg=mr, out=out))
                    t = tune
                    cfg = (bn or t[0], nw or t[1], ns or t[2], splits, t[3] if mr == 0 else mr)
                    name = "bn={} w={} st={} sp={} maxnreg={}".format(*cfg)
                    try:
                        out.fill_(float("nan"))
                        fn()
                        ok = torch.isfinite(out).all().item()
                        rel_v = ((out.float() - ref).norm() / ref.norm()).item()
                    except Exception as e:  # noqa: BLE001
                        log(f"  {name}: failed {type(e).__name__}: {str(e)[:300]}")
                        continue
                    extra = b * HQ * splits * (D + 2) * 4 * 2 if splits > 1 else 0
                    bits = fmt_name(fmt)
                    row = dict(B=b, L=length, kernel=f"paged-{name_f}", bits=bits, block_size=bs,
                               block_n=cfg[0], warps=cfg[1], stages=cfg[2], splits=splits, maxnreg=cfg[4],
                               rel_err_ref=rel_v, rel_err_sdpa=rel_sdpa, finite=ok, nbytes=nbytes + extra)
                    ready.append((name, fn, row))
                # time in rounds, alternating the order, SDPA in every round: the spread says what is noise
                times = {i: [] for i in range(len(ready))}
                sdpa_t = []
                for rnd in range(args.rounds):
                    sdpa_t.append(bench(sdpa, dev))
                    order = range(len(ready)) if rnd % 2 == 0 else reversed(range(len(ready)))
                    for i in order:
                        times[i].append(bench(ready[i][1], dev))
                t_ref = sorted(sdpa_t)[len(sdpa_t) // 2]
                for i, (name, fn, row) in enumerate(ready):
                    ts = sorted(times[i])
                    us = ts[len(ts) // 2]
                    row.update(us=us, us_rounds=ts, gbs=row["nbytes"] / us / 1e3, sdpa_us=t_ref,
                               speedup=t_ref / us)
                    results["rows"].append(row)
                    spread = f" (rounds {min(ts):.1f}-{max(ts):.1f})" if len(ts) > 1 else ""
                    log(f"  bs={bs} {name}: {us:8.1f} us{spread} {row['gbs']:6.0f} GB/s "
                        f"x{t_ref / us:.2f} vs SDPA  err {row['rel_err_ref']:.1e}{'' if row['finite'] else ' NOT WRITTEN'}")
                if len(sdpa_t) > 1:
                    log(f"  SDPA in the same rounds: {', '.join(f'{t:.1f}' for t in sdpa_t)} us")
                del cache, ref
        del k_tok, v_tok, k, v
        if dev == "cuda":
            torch.cuda.empty_cache()

    # summary: best config per (shape, kernel)
    best = {}
    for r in results["rows"]:
        key = (r["B"], r["L"], r["kernel"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    lines = ["| B | L | kernel | best config (block size, block_n, warps, stages, splits, maxnreg) | us | GB/s | vs SDPA "
             "| rel. err vs ref |", "|---|---|---|---|---|---|---|---|"]
    for (b, length, kern), r in best.items():
        ours = kern.startswith("paged")
        cfg = (f"{r['block_size']}, {r['block_n']}, {r['warps']}, {r['stages']}, {r['splits']}, {r['maxnreg'] or '-'}"
               if ours else "-")
        sp = "1.00" if kern.startswith("sdpa") else f"{r['speedup']:.2f}x"
        if ours:
            err = f"{r['rel_err_ref']:.1e}" + ("" if r["rel_err_ref"] < 2e-3 else " (!)")
        else:       # vLLM's kernels: against fp16 SDPA on the raw K/V (their own format's error included)
            err = f"{r['rel_err_sdpa']:.1e} vs SDPA" if "rel_err_sdpa" in r else "-"
        lines.append(f"| {b} | {length} | {kern} | {cfg} | {r['us']:.1f} | {r['gbs']:.0f} | {sp} | {err} |")
    table = "\n".join(lines)
    log("\n" + table)
    with open(os.path.join(args.out, "decode_attention.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "decode_attention.md"), "w") as f:
        f.write(table + "\n")
    log(f"total {time.time() - t_start:.0f} s")


# ---- offline compiler report (no GPU needed: Triton compiles for sm_90 with its own ptxas) ----
_CATS = {"unpack": "LOP3 PRMT HADD2 HFMA2 HMUL2 SHF".split(), "smem": "STS LDS LDSM BAR STSM".split(), "mma": ["HMMA"],
         "float": "FADD FMUL FFMA FMNMX MUFU FSEL F2FP SHFL FSETP".split(),
         "int/addr": "IMAD IADD3 LEA ISETP SEL VIADD UIADD3 ULEA USHF LDG LDGSTS".split(), "mov": ["MOV"]}


def sm90_report(out_dir, log):
    """Compile the decode kernels at their tuned settings (and a few others) for sm_90 and read
    registers, spills, shared memory and the instruction mix of the main loop (the body of the
    first backward branch) from the SASS, with the cuobjdump bundled in Triton's package."""
    import re
    import subprocess
    import tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    kern = importlib_kernels()
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump = os.path.join(tools, "cuobjdump") if os.path.exists(os.path.join(tools, "cuobjdump")) else "cuobjdump"
    log(f"triton {triton.__version__}, sm_90, 32 q / 8 KV heads, d={D}, block size 16")
    rows = ["| codec | block_n | warps | stages | maxnreg | regs | spill bytes | smem | loop SASS instr/thread "
            "| warp-instr/token | mix (unpack, mov, float, smem, int/addr, mma) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for bits in (16, 8, 4, 2):
        t, name_f = DECODE_TUNING[bits], NAME[bits]
        for bn, nw, ns, mr in {t[:4], (t[0], t[1], t[2], None), (64, 2, 2, t[3])}:
            fn = kern._decode_planes_kernel if bits != 16 else kern._decode_kernel
            const = dict(HKV=HKV, G=HQ // HKV, G_PAD=max(8 if bits != 16 else 16, HQ // HKV), D=D, BS=16,
                         BLOCK_N=bn, SPLIT=True, HELD=False, LOGITS=False)
            if bits != 16:
                const.update(KBITS=bits, KCB=D * bits // 8, VBITS=bits, VCB=D * bits // 8, ASM=True)
            types = dict(q_ptr="*fp16", cache_ptr="*u8" if bits != 16 else "*fp16", meta_ptr="*fp16", bt_ptr="*i32",
                         lens_ptr="*i32", held_ptr="*i32", out_ptr="*fp16", po_ptr="*fp32", pml_ptr="*fp32",
                         lg_ptr="*fp32", sm_scale="fp32")
            sig = {n: ("constexpr" if n in const else types.get(n, "i32")) for n in fn.arg_names}
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                     if n.endswith("_ptr") or n.startswith("stride_c") or n in ("stride_qb", "stride_qh")}
            opts = dict(num_warps=nw, num_stages=ns, **({"maxnreg": mr} if mr else {}))
            try:
                k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                                   target=GPUTarget("cuda", 90, 32), options=opts)
                with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
                    f.write(k.asm["cubin"])
                res = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
                sass = subprocess.run([cuobjdump, "--dump-sass", f.name], capture_output=True, text=True).stdout
            except Exception as e:  # noqa: BLE001
                log(f"sm90 report {name_f} bn={bn} w={nw}: {type(e).__name__}: {str(e)[:300]}")
                continue
            lines = [ln for ln in sass.splitlines() if re.search(r"^\s+/\*[0-9a-f]{4}\*/", ln)]
            addr = [int(re.search(r"/\*([0-9a-f]{4})\*/", ln).group(1), 16) for ln in lines]
            loop = None
            for i, ln in enumerate(lines):
                m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", ln)
                if m and m.group(1) and int(m.group(1), 16) < addr[i] and int(m.group(1), 16) in addr:
                    loop = lines[addr.index(int(m.group(1), 16)):i + 1]
                    break
            if loop is None:
                log(f"sm90 report {name_f} bn={bn} w={nw}: no loop found")
                continue
            cnt = {c: 0 for c in _CATS}
            for ln in loop:
                m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?", ln)
                if not m:
                    continue
                op = "MOV" if m.group(1) == "IMAD" and (m.group(2) or "").startswith(".MOV") else m.group(1)
                for c, ops in _CATS.items():
                    if op in ops:
                        cnt[c] += 1
                        break
            mix = ", ".join(str(cnt[c]) for c in ("unpack", "mov", "float", "smem", "int/addr", "mma"))
            regs, spill = re.search(r"REG:(\d+)", res).group(1), re.search(r"LOCAL:(\d+)", res).group(1)
            rows.append(f"| {name_f} | {bn} | {nw} | {ns} | {mr or '-'} | {regs} | {spill} | {k.metadata.shared} "
                        f"| {len(loop)} | {len(loop) * nw / bn:.1f} | {mix} |")
            log(rows[-1])
    with open(os.path.join(out_dir, "sm90_report.md"), "w") as f:
        f.write("\n".join(rows) + "\n")


def importlib_kernels():
    import importlib
    return importlib.import_module("kvplug.triton_ops.kernels")


if __name__ == "__main__":
    main()
