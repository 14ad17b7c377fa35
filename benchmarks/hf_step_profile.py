"""One HF decode step under torch.profiler: device time per kernel and the host gap, per cache.

    python benchmarks/hf_step_profile.py --caches "DynamicCache;paged:none;paged:int4" --batch 8 --context 32768

Same model and caches as ``kvplug bench`` (random Llama ``--preset``, bf16 on CUDA); after the
prefill, 3 warm steps, then 5 steps under the profiler. Prints the step's wall time, its summed
kernel time and the top kernels.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-8l")
    ap.add_argument("--caches", default="DynamicCache;paged:none;paged:int4")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from kvplug import bench
    dev = "cuda"
    torch.backends.cuda.enable_cudnn_sdp(False)
    model = bench.load_model(None, args.preset, dev, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    for name in args.caches.split(";"):
        cache = bench.make_cache(name, model)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.context), generator=gen).to(dev)
        with torch.no_grad():
            tok = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
            for _ in range(3):
                tok = model(input_ids=tok, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            t = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    tok = model(input_ids=tok, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
            wall = (time.perf_counter() - t) / 5 * 1e3
        rows = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(e.self_device_time_total for e in rows) / 5 / 1e3
        print(f"\n{name}: step {wall:.2f} ms under the profiler, kernels {total:.2f} ms, gap {wall - total:.2f} ms")
        for e in sorted(rows, key=lambda e: -e.self_device_time_total)[:args.top]:
            print(f"  {e.self_device_time_total / 5 / 1e3:7.3f} ms  {e.count // 5:4d}x  {e.key[:90]}")
        host = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
        print(f"  host, by self CPU time (top {args.top}):")
        for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:args.top]:
            print(f"  {e.self_cpu_time_total / 5 / 1e3:7.3f} ms  {e.count // 5:4d}x  {e.key[:90]}")
        del cache


if __name__ == "__main__":
    main()
