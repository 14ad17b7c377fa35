"""The replace step of h2o/tova on the CUDA backend, one layer, without vLLM: its parts timed.

What ``cuda_backend._replacing_decodes`` runs per layer and decode step, on a cache of random int4
pages shaped like a vLLM batch (rows of a 1,024-token prompt compacted to its budget, then a
generated token): :meth:`LayerEviction.admit`, the decode kernel over the held spans writing each
slot's logit, and :meth:`LayerEviction.rescore` of the step's attention from those logits
(:func:`kvplug.attention.step_probs`), side by side with the first version's second pass (the
held keys decoded by :meth:`PagedKV.read`, then :func:`kvplug.attention.step_attention`). The two
attentions must agree (within the kernel's float16 query rounding); a larger gap stops the run.

    python benchmarks/gpu_rescore_check.py --rows 256 --budget 256     # a CUDA GPU, no vLLM
    TRITON_INTERPRET=1 python benchmarks/gpu_rescore_check.py --rows 4 --budget 32 --prompt 128 --kv-heads 2 --head-dim 64 --iters 1
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--spec", default="h2o(budget={budget})+int4")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()

    from kvplug import triton_ops
    from kvplug.adapters.vllm.capabilities import cuda_page
    from kvplug.adapters.vllm.compaction import LayerEviction
    from kvplug.adapters.vllm.eviction import held_spans
    from kvplug.adapters.vllm.layout import PagedKV, TokenLayout, as_triton_cache, slots_of
    from kvplug.attention import step_attention, step_probs
    from kvplug.config import resolve

    torch.manual_seed(0)
    gpu = torch.cuda.is_available()  # else a smoke run in the Triton interpreter (TRITON_INTERPRET=1)
    dev, dtype, bs = torch.device("cuda" if gpu else "cpu"), torch.bfloat16 if gpu else torch.float16, 16
    r, h, d, hq = args.rows, args.kv_heads, args.head_dim, args.kv_heads * args.group
    strategy = resolve(args.spec.format(budget=args.budget))
    layout = cuda_page(strategy.codec, d, dtype, bs, h)
    token = TokenLayout.for_codec(strategy.codec, d, dtype)
    blocks = -(-(args.prompt + 64) // bs)
    kv_cache = torch.zeros(r * blocks + 1, h, bs, layout.bytes_per_token() // h, dtype=torch.uint8, device=dev)
    cache = as_triton_cache(kv_cache, layout)
    table = (torch.randperm(r * blocks, device=dev).view(r, blocks) + 1).int()  # block 0 left unused
    positions = torch.arange(args.prompt + 1, device=dev)
    slots = torch.stack([slots_of(table[i], positions, bs) for i in range(r)])  # [R, P + 1]
    k = torch.randn(r * (args.prompt + 1), h, d, device=dev, dtype=dtype)
    triton_ops.store_kv(k, torch.randn_like(k), cache, slots.flatten(), layout)

    ev = LayerEviction(strategy, PagedKV(token), 0, 1)
    spans = held_spans(strategy, torch.full((r,), args.prompt), 1)[0].to(dev)  # [R, 3]
    base, capacity = spans[:, 0], spans[:, 1]
    width = int(spans[:, 1].max())
    positions_state, running = ev.running_state(kv_cache)
    front = slots[:, int(base[0]):int(base[0]) + width]  # the compacted prompt's slots (base is the same for all)
    positions_state[front] = torch.arange(int(base[0]), int(base[0]) + width, device=dev).int()[None, :, None]
    running[front] = torch.rand(r, width, h, device=dev)
    position = torch.full((r,), args.prompt, device=dev)
    seq_lens = (position + 1).int()
    q = torch.randn(r, hq, d, device=dev, dtype=dtype)
    out = torch.empty_like(q)
    scale = d ** -0.5

    def admit():
        return ev.admit(kv_cache, table, base, capacity, position, width)

    held_slots, valid = admit()
    visible = valid[:, None, :].expand(-1, h, -1)
    logits = torch.empty(r, hq, width, dtype=torch.float32, device=dev)
    triton_ops.decode_attention(q, cache, layout, table, seq_lens, scale, held=spans.int(), out=out, logits=logits)
    from_kernel = step_probs(logits, h, visible)

    def second_pass():
        keys = ev.paged.read(kv_cache, held_slots.flatten())[0].unflatten(1, held_slots.shape).transpose(0, 1)
        return step_attention(q, keys, scale, visible)

    gap = (from_kernel - second_pass()).abs().max().item()
    print(f"step attention of {r} rows x {h} heads x {width} slots: from the kernel's logits vs the second pass, "
          f"max |diff| {gap:.2e}")
    if gap > 1e-3:
        raise SystemExit("the kernel's logits do not give the step's attention")

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        if not gpu:
            import time
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(args.iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / args.iters

    parts = {
        "admit": admit,
        "decode kernel (held spans)": lambda: triton_ops.decode_attention(
            q, cache, layout, table, seq_lens, scale, held=spans.int(), out=out),
        "decode kernel (held spans) + logits": lambda: triton_ops.decode_attention(
            q, cache, layout, table, seq_lens, scale, held=spans.int(), out=out, logits=logits),
        "step attention from the logits + rescore": lambda: ev.rescore(step_probs(logits, h, visible), held_slots,
                                                                       valid, kv_cache),
        "second pass: PagedKV.read + step_attention + rescore": lambda: ev.rescore(second_pass(), held_slots, valid,
                                                                                   kv_cache),
    }
    print(f"{args.spec.format(budget=args.budget)}, {r} rows, {h} KV heads x {args.group} q, d={d}, "
          f"block {bs}, {torch.cuda.get_device_name() if gpu else 'CPU (interpreter)'}: ms per layer and step (mean of {args.iters})")
    times = {name: timed(fn) for name, fn in parts.items()}
    for name, ms in times.items():
        print(f"  {ms:8.3f}  {name}")
    print(f"  {times['admit'] + times['decode kernel (held spans) + logits'] + times['step attention from the logits + rescore']:8.3f}"
          "  the step as the backend runs it")
    print(f"  {times['admit'] + times['decode kernel (held spans)'] + times['second pass: PagedKV.read + step_attention + rescore']:8.3f}"
          "  the step with the second pass (the first version)")

    if gpu:
        graphed(ev, kv_cache, lambda: step(ev, kv_cache, cache, layout, table, base, capacity, position, width, q,
                                           seq_lens, spans.int(), scale, h, out), timed)


def step(ev, kv_cache, cache, layout, table, base, capacity, position, width, q, seq_lens, held, scale, h, out):
    """The replace step as ``cuda_backend._replacing_decodes`` runs it (fixed width)."""
    from kvplug import triton_ops
    from kvplug.attention import step_probs

    slots, valid = ev.admit(kv_cache, table, base, capacity, position, width)
    logits = torch.empty(q.shape[0], q.shape[1], width, dtype=torch.float32, device=q.device)
    triton_ops.decode_attention(q, cache, layout, table, seq_lens, scale, held=held, out=out, logits=logits)
    ev.rescore(step_probs(logits, h, valid[:, None, :].expand(-1, h, -1)), slots, valid, kv_cache)


def graphed(ev, kv_cache, run, timed) -> None:
    """The step captured in a CUDA graph: one replay leaves the cache and the running state
    exactly as one eager step from the same start does; then the replay's time."""
    tensors = [kv_cache, *ev.state]
    start = [t.clone() for t in tensors]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # warm-up (Triton compiles outside the capture)
    torch.cuda.current_stream().wait_stream(side)
    for t, s0 in zip(tensors, start):
        t.copy_(s0)
    run()
    eager = [t.clone() for t in tensors]
    for t, s0 in zip(tensors, start):
        t.copy_(s0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for t, s0 in zip(tensors, start):  # capture records, it does not run
        t.copy_(s0)
    graph.replay()
    torch.cuda.synchronize()
    same = all(torch.equal(a, b) for a, b in zip(tensors, eager))
    print(f"  CUDA graph of the step: one replay {'equals' if same else 'DIFFERS from'} one eager step "
          "(cache bytes, positions, running scores)")
    print(f"  {timed(graph.replay):8.3f}  the step replayed as a CUDA graph")
    if not same:
        raise SystemExit("the graphed replace step differs from the eager one")


if __name__ == "__main__":
    main()
