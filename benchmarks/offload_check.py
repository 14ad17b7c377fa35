"""GPU checks of the offloaded (InfiniGen) cache, one call:

1. ``triton_ops.gather_rows`` reading chosen token rows straight out of pinned host memory: equal
   to the reference, and its bandwidth beside a contiguous host-to-device copy of the same bytes
   and a host-side gather followed by a copy (what the kernel saves).
2. ``infinigen(budget=100%)`` on CUDA (side stream, events, pinned host store) equals ``none``.

    python benchmarks/offload_check.py [--rows 64] [--tokens 32768] [--share 0.05]
"""

from __future__ import annotations

import argparse
import time

import torch


def timed(fn, repeat: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def gather_check(rows: int, tokens: int, width: int, share: float) -> None:
    from kvplug import triton_ops

    g = torch.Generator().manual_seed(0)
    host = torch.randn(tokens, rows, width, generator=g).half().pin_memory()  # [S, R, w] as HostStore keeps it
    src = host.view(tokens, rows, width).transpose(0, 1)
    k = max(1, int(share * tokens))
    index = torch.stack([torch.randperm(tokens, generator=g)[:k].sort().values for _ in range(rows)]).int().cuda()
    out = torch.empty(rows, k, width, dtype=torch.float16, device="cuda")
    triton_ops.gather_rows(src, index, out)
    torch.cuda.synchronize()
    want = triton_ops.gather_rows_reference(src, index.cpu())
    print(f"gather_rows from pinned host memory equals the reference: {torch.equal(out.cpu(), want)}")
    nbytes = out.numel() * out.element_size()
    t_kernel = timed(lambda: triton_ops.gather_rows(src, index, out))
    flat = torch.empty(nbytes // 2, dtype=torch.float16).pin_memory()
    dev = torch.empty_like(flat, device="cuda")
    t_copy = timed(lambda: dev.copy_(flat, non_blocking=True))
    index_cpu = index.cpu()

    def host_gather():
        staged = triton_ops.gather_rows_reference(src, index_cpu)
        out.copy_(staged)

    t_host = timed(host_gather, repeat=3)
    print(f"rows {rows} x {k} of {width * 2} B ({nbytes / 1e6:.1f} MB): kernel {t_kernel * 1e3:.2f} ms = "
          f"{nbytes / t_kernel / 1e9:.1f} GB/s; contiguous H2D copy {t_copy * 1e3:.2f} ms = "
          f"{nbytes / t_copy / 1e9:.1f} GB/s; host gather + copy {t_host * 1e3:.2f} ms = "
          f"{nbytes / t_host / 1e9:.1f} GB/s")


def equality_check() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    import kvplug.hf

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                         num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                         vocab_size=1000)).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (4, 300), device="cuda")

    def run(spec):
        cache = kvplug.hf.cache(model, spec)
        with torch.no_grad():
            out = model.generate(ids, past_key_values=cache, max_new_tokens=24, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        return out.sequences, torch.stack(out.logits)

    seq_none, logit_none = run("none")
    for spec in ("infinigen(budget=100%)", "infinigen(budget=100%, ahead=false)"):
        seq, logits = run(spec)
        same = float((seq == seq_none).float().mean())
        print(f"{spec} on CUDA vs none: tokens equal {same:.3f}, max |logit diff| "
              f"{(logits - logit_none).abs().max().item():.4f} (bf16)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64, help="sequences x KV heads")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--width", type=int, default=128, help="elements per row (head_dim)")
    p.add_argument("--share", type=float, default=0.05, help="share of the tokens gathered per row")
    args = p.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    gather_check(args.rows, args.tokens, args.width, args.share)
    equality_check()


if __name__ == "__main__":
    main()
