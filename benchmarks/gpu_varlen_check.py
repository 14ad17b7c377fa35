"""paged_attention on the GPU: mixed varlen batches (decode rows and prefill chunks) against the
float64 reference, every layout, GQA 4; unused slots poisoned. Prints the relative error and time.

    python benchmarks/gpu_varlen_check.py
"""

from __future__ import annotations

import torch

from kvplug.triton_ops import PagedLayout, paged_attention, paged_attention_reference, store_kv


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
    main()
