"""One decode step of the HF paged store with a residual window against the same store without one.

    PYTHONUNBUFFERED=1 python benchmarks/residual_decode.py --out $OUT                  # on the GPU
    python benchmarks/residual_decode.py --device cpu --shapes 2x256 --heads 4/2 --head-dim 64  # smoke

A residual window (``int4(residual=32)``) keeps each head's newest tokens in the model dtype
beside the pages: :meth:`kvplug.adapters.hf.store.PagedStore.attend_one` runs the paged decode kernel
over the older tokens (with its log-sum-exp output), attends densely over the window and merges
the two. This times that step against the plain codec's (``int4``: the kernel alone) and fp16
SDPA over contiguous K/V, side by side in one run, for each (batch, context): medians of
``triton.testing.do_bench`` (host launches included, as the HF adapter pays them) and of
``do_bench_cudagraph`` (the GPU time alone). Each output is checked against float64 attention
over the K/V the store holds (the window raw, older tokens dequantized) before it is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch
import torch.nn.functional as F

from kvplug import parse
from kvplug.adapters.hf.store import PagedStore


def held_attention(store: PagedStore, q: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 attention of ``q`` ``[B, Hq, D]`` over what ``store`` holds (its decoded K/V)."""
    k, v, filled = store.decode()
    b, h, _, d = k.shape
    qd = q.double().view(b, h, -1, d)  # decode() rotates a rotated layout back: the model's basis
    s = torch.einsum("bhgd,bhld->bhgl", qd, k.double()) * scale
    s = s.masked_fill(~filled[:, :, None], float("-inf"))
    return torch.einsum("bhgl,bhld->bhgd", s.softmax(-1), v.double()).reshape(q.shape)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="8x32768,64x4096,512x4096", help="BxL list (batch x context)")
    ap.add_argument("--specs", default="int4;int4(residual=32);int4(residual=128);mixed(key=8, value=4);"
                                       "mixed(key=8, value=4, residual=32)", help="';'-separated strategies")
    ap.add_argument("--heads", default="32/8", help="query heads / KV heads")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for residual_decode.json")
    args = ap.parse_args(argv)
    hq, hkv = (int(x) for x in args.heads.split("/"))
    d, dev, dtype = args.head_dim, torch.device(args.device), torch.bfloat16
    cuda = dev.type == "cuda"
    if cuda:
        from triton.testing import do_bench, do_bench_cudagraph
    print(f"seed={args.seed} device={dev} {torch.cuda.get_device_name(dev) if cuda else 'cpu'} torch {torch.__version__}")
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    scale = d ** -0.5
    rows = []
    for shape in args.shapes.split(","):
        b, length = (int(x) for x in shape.split("x"))
        k = torch.randn(b, hkv, length, d, generator=gen, device=dev, dtype=dtype)
        v = torch.randn(b, hkv, length, d, generator=gen, device=dev, dtype=dtype)
        q = torch.randn(b, hq, d, generator=gen, device=dev, dtype=dtype)
        valid = torch.ones(b, hkv, length, dtype=torch.bool, device=dev)
        positions = torch.arange(length, device=dev).expand(b, hkv, length)
        times = {}
        if cuda:
            sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)  # noqa: E731
            times["sdpa"] = (do_bench(sdpa), do_bench_cudagraph(sdpa))
        for spec in args.specs.split(";"):
            codec = parse(spec).codec
            store = PagedStore(codec, dtype, hkv, d, dev, torch.float32)
            store.init(k, v, valid, positions)
            out = store.attend_one(q, scale)
            err = rel(out, held_attention(store, q, scale)) if b * length <= 64 * 4096 else float("nan")
            step = lambda: store.attend_one(q, scale)  # noqa: E731
            t = (do_bench(step), do_bench_cudagraph(step)) if cuda else (float("nan"),) * 2
            times[spec] = t
            rows.append({"shape": shape, "spec": spec, "ms": t[0], "ms_graph": t[1], "rel_err_vs_float64": err,
                         "stored_bytes": store.stored_bytes()})
            print(f"{shape:>10} {spec:<36} {t[0] * 1e3:8.1f} us  graph {t[1] * 1e3:8.1f} us  "
                  f"rel err {err:.2e}  {store.stored_bytes() / 2**20:8.1f} MiB", flush=True)
            del store
        plain = {dataclasses.replace(parse(s).codec, residual=0): s for s in times if s != "sdpa"
                 and not parse(s).codec.residual}
        for spec, t in times.items():
            codec = None if spec == "sdpa" else parse(spec).codec
            if codec is not None and codec.residual and dataclasses.replace(codec, residual=0) in plain:
                other = plain[dataclasses.replace(codec, residual=0)]
                ref = times[other]
                print(f"{shape:>10} {spec:<36} speed vs {other}: {ref[0] / t[0]:.2f}x (launches), "
                      f"{ref[1] / t[1]:.2f}x (graph)")
        del k, v
        if cuda:
            torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "residual_decode.json"), "w") as f:
            json.dump({"rows": rows, "when": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
                       "device": torch.cuda.get_device_name(dev) if cuda else "cpu"}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
