"""paged_attention on the GPU: mixed varlen batches (decode rows and prefill chunks) against the
float64 reference, every layout, GQA 4; unused slots poisoned. Prints the relative error and time.
``--prefill``: prefill-heavy batches (long chunks over long contexts, vLLM's chunked prefill and
prefix-cache hits) timed against torch SDPA (FlashAttention) on the same dense fp16 K/V, side by
side, with ``--variants block_n:warps:stages,...`` of the kernel; the TFLOPS column counts the
causal FLOPs (4 * q_len * attended keys * head_dim per query head).

    python benchmarks/gpu_varlen_check.py [--prefill [--variants 32:4:2,64:4:3]]
"""

from __future__ import annotations

import torch

from kvplug.triton_ops import PagedLayout, paged_attention, paged_attention_reference, store_kv


def prefill(variants: list[tuple[int, int, int]]) -> None:
    """Prefill shapes (context, chunk) x sequences: ours per variant and layout vs SDPA, one run."""
    import triton

    dev = "cuda"
    gen = torch.Generator(device="cpu").manual_seed(0)
    print("seed 0; 32 q / 8 KV heads, d=128, block size 16")
    hkv, g, d, bs = 8, 4, 128, 16
    shapes = [("1 x 8192 fresh", [(0, 8192)]), ("4 x 2048 fresh", [(0, 2048)] * 4),
              ("2048 chunk after 6144", [(6144, 2048)]), ("8 x 512 after 4096 hit", [(4096, 512)] * 8)]
    for name, seqs in shapes:
        ctx = [c for c, _ in seqs]
        qlen = [n for _, n in seqs]
        lens = [c + n for c, n in seqs]
        flops = sum(4 * n * (c + (n + 1) / 2) * d * hkv * g for c, n in seqs)
        q = torch.randn(sum(qlen), hkv * g, d, generator=gen).to(dev, torch.float16)
        ks = [torch.randn(length, hkv, d, generator=gen).to(dev, torch.float16) for length in lens]
        vs = [torch.randn(length, hkv, d, generator=gen).to(dev, torch.float16) for length in lens]
        qsl = torch.tensor([0] + list(torch.tensor(qlen).cumsum(0)), dtype=torch.int32, device=dev)
        sl = torch.tensor(lens, dtype=torch.int32, device=dev)

        def sdpa():
            for i, (c, n) in enumerate(seqs):
                qi = q[qsl[i]:qsl[i] + n].transpose(0, 1)[None]
                ki, vi = ks[i].transpose(0, 1)[None], vs[i].transpose(0, 1)[None]
                if c == 0:
                    torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=True)
                else:  # the chunk over its context (no mask: an upper bound of the causal cost)
                    torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, enable_gqa=True)
        base = triton.testing.do_bench(sdpa, return_mode="median") * 1e3
        row = [f"{name:24s} SDPA {base:7.0f} us ({flops / base / 1e6:5.0f} TFLOPS)"]
        for bits in (16, 8, 4):
            layout = PagedLayout(bs, hkv, d, bits, torch.float16)
            mb = -(-max(lens) // bs)
            nb = len(lens) * mb + 1
            cache = layout.allocate(nb, dev)
            bt = torch.randperm(nb, generator=gen)[: len(lens) * mb].view(len(lens), mb).int().to(dev)
            for s_, length in enumerate(lens):
                t = torch.arange(length, device=dev)
                store_kv(ks[s_], vs[s_], cache, (bt[s_, t // bs].long() * bs + t % bs).int(), layout)
            out = torch.empty_like(q)
            for bn, warps, stages in variants:
                try:
                    us = triton.testing.do_bench(lambda: paged_attention(
                        q, cache, layout, bt, qsl, sl, max_query_len=max(qlen), out=out, block_n=bn,
                        num_warps=warps, num_stages=stages), return_mode="median") * 1e3
                    row.append(f"  bits {bits} {bn}:{warps}:{stages} {us:7.0f} us ({base / us:4.2f}x SDPA)")
                except Exception as e:  # a variant that does not compile: say so, go on
                    row.append(f"  bits {bits} {bn}:{warps}:{stages} failed: {type(e).__name__}")
        print("\n".join(row), flush=True)


def main() -> None:
    dev = "cuda"
    gen = torch.Generator(device="cpu").manual_seed(0)
    print("seed 0")
    hkv, g, d, bs = 8, 4, 128, 16
    ctx = [0, 1000, 17, 3000, 1, 500, 2048, 0]
    qlen = [512, 1, 200, 1, 64, 1, 300, 1]
    lens = [c + n for c, n in zip(ctx, qlen)]
    for bits in (16, 8, 4, 2):
        layout = PagedLayout(bs, hkv, d, bits, torch.float16)
        mb = -(-max(lens) // bs)
        nb = len(lens) * mb + 3
        cache = layout.allocate(nb, dev)
        if layout.quantized:
            cache.random_(0, 256)
            layout.meta(cache).fill_(float("nan"))
        else:
            cache.fill_(float("nan"))
        bt = torch.randperm(nb, generator=gen)[: len(lens) * mb].view(len(lens), mb).int().to(dev)
        for s, length in enumerate(lens):
            t = torch.arange(length, device=dev)
            k = torch.randn(length, hkv, d, generator=gen).to(dev, torch.float16)
            v = torch.randn(length, hkv, d, generator=gen).to(dev, torch.float16)
            store_kv(k, v, cache, (bt[s, t // bs].long() * bs + t % bs).int(), layout)
        q = torch.randn(sum(qlen), hkv * g, d, generator=gen).to(dev, torch.float16)
        qsl = torch.tensor([0] + list(torch.tensor(qlen).cumsum(0)), dtype=torch.int32, device=dev)
        sl = torch.tensor(lens, dtype=torch.int32, device=dev)
        out = torch.full_like(q, float("nan"))
        paged_attention(q, cache, layout, bt, qsl, sl, max_query_len=max(qlen), out=out)
        torch.cuda.synchronize()
        ref = paged_attention_reference(q, cache, layout, bt, qsl, sl, compute_dtype=torch.float64)
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        import triton
        us = triton.testing.do_bench(lambda: paged_attention(q, cache, layout, bt, qsl, sl, max_query_len=max(qlen),
                                                             out=out), return_mode="median") * 1e3
        print(f"bits {bits:2d}: all written {bool(torch.isfinite(out).all())}, rel err vs float64 {rel:.2e}, "
              f"{us:.0f} us for {sum(qlen)} query tokens over {sum(lens)} cached")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefill", action="store_true", help="time prefill-heavy batches against SDPA")
    ap.add_argument("--variants", default="32:4:2", help="block_n:warps:stages,... of the kernel (--prefill)")
    a = ap.parse_args()
    if a.prefill:
        prefill([tuple(int(x) for x in v.split(":")) for v in a.variants.split(",")])
    else:
        main()
