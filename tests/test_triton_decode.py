"""decode_attention (Triton, interpreter mode on CPU) against the float64 reference."""

import math

import pytest
import torch

pytest.importorskip("triton")

from kvplug.triton_ops import (decode_attention, decode_attention_reference,  # noqa: E402
                               merge_attention, store_kv_reference)
from kvplug.triton_ops.reference import gather_kv  # noqa: E402

from test_triton_store import DEV, layout_of, poisoned_cache  # noqa: E402

# relative L2 error vs unquantized attention that each format stays under (random normal K/V;
# seen over many seeds: int8 <= 0.009, int4 <= 0.15, int2 <= 0.77 -- 2 bits without rotation is coarse)
SANITY = {16: 3e-3, 8: 3e-2, 4: 0.3, 3: 0.6, 2: 1.0}


def sanity(bits):
    """The bound of the coarser role (``bits``: one width or ``(key bits, value bits)``)."""
    return SANITY[min(b for b in bits if b != "sym") if isinstance(bits, tuple) else bits]


def _case(bits, d, bs, hkv, g, lens, gen, dtype=torch.float16, v_offset=0.0):
    """A poisoned paged cache whose sequences hold lens[b][h] tokens in shuffled blocks."""
    layout = layout_of(bits, bs, hkv, d, dtype)
    b = lens.shape[0]
    lens2 = lens if lens.dim() == 2 else lens[:, None].expand(b, hkv)
    max_blocks = max(1, -(-int(lens2.max()) // bs))
    nb = b * max_blocks + 3
    cache = poisoned_cache(layout, nb, gen)
    bt = torch.randperm(nb, generator=gen)[: b * max_blocks].view(b, max_blocks).int().to(DEV)
    k = torch.randn(b, hkv, max_blocks * bs, d, generator=gen).to(DEV, dtype)
    v = (torch.randn(b, hkv, max_blocks * bs, d, generator=gen) + v_offset).to(DEV, dtype)
    for i in range(b):
        for h in range(hkv):
            n = int(lens2[i, h])
            t = torch.arange(n, device=DEV)
            slots = torch.full((n, hkv), -1, dtype=torch.int64, device=DEV)
            slots[:, h] = bt[i, t // bs].long() * bs + t % bs
            store_kv_reference(k[i, :, :n].transpose(0, 1), v[i, :, :n].transpose(0, 1), cache, slots, layout)
    q = torch.randn(b, hkv * g, d, generator=gen).to(DEV, dtype)
    return layout, cache, bt, k, v, q


def _exact_attention(q, k, v, lens, g):
    """float64 attention over the unquantized K/V ``[B, H, L, D]``."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    lens2 = lens if lens.dim() == 2 else lens[:, None].expand(b, hkv)
    s = torch.einsum("bhgd,bhld->bhgl", q.double().view(b, hkv, g, d), k.double()) * d ** -0.5
    valid = torch.arange(k.shape[2], device=q.device)[None, None] < lens2[:, :, None].to(q.device)
    p = torch.softmax(s.masked_fill(~valid[:, :, None], float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bhgl,bhld->bhgd", p, v.double()).reshape(b, hq, d)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("bits,d,bs,hkv,g,splits,per_head", [
    (16, 64, 16, 2, 1, 1, False),
    (16, 128, 32, 2, 4, 3, True),
    (8, 64, 32, 2, 8, 2, False),
    (8, 128, 16, 1, 4, 1, True),
    (4, 128, 16, 2, 4, 4, False),
    (4, 64, 64, 2, 1, 2, True),
    (2, 128, 32, 1, 8, 2, False),
    (2, 64, 16, 2, 4, 1, True),
    ((8, 4), 128, 16, 2, 4, 2, False),
    ((4, 2), 64, 32, 2, 8, 1, True),
    ((2, 8), 64, 16, 1, 4, 3, False),
    ((3, 2, "sym"), 64, 16, 2, 4, 2, True),
    ((3, 4), 128, 32, 2, 8, 1, False),
    ((3, 8, "sym"), 64, 16, 1, 1, 3, False),
    ((4, 4, "sym"), 64, 16, 2, 4, 3, False),
])
def test_decode_matches_reference(bits, d, bs, hkv, g, splits, per_head, gen):
    b = 3
    if per_head:
        lens = torch.randint(1, 90, (b, hkv), dtype=torch.int32, generator=gen)
        lens[1, 0] = 0                                  # a head that kept nothing
    else:
        lens = torch.randint(1, 90, (b,), dtype=torch.int32, generator=gen)
        lens[1] = 0                                     # an empty sequence
    lens[0] = bs                                        # exactly one full block
    layout, cache, bt, k, v, q = _case(bits, d, bs, hkv, g, lens, gen)
    lens = lens.to(DEV)
    out = torch.full_like(q, float("nan"))
    res = decode_attention(q, cache, layout, bt, lens, num_splits=splits, block_n=32, out=out)
    assert res is out and torch.isfinite(out).all(), "output not fully written"
    ref = decode_attention_reference(q, cache, layout, bt, lens, compute_dtype=torch.float64)
    # against the dequantized values: only fp16 rounding (q, p*scale, output) separates them
    assert _rel(out, ref) < 2e-3
    assert (out.double() - ref).abs().max() < 1e-2 * ref.abs().max() + 1e-3
    # empty heads / sequences give exact zeros
    lens2 = lens if lens.dim() == 2 else lens[:, None].expand(b, hkv)
    empty = (lens2 == 0).repeat_interleave(g, 1)
    assert (out[empty] == 0).all()
    # sanity: the format's error vs unquantized attention
    assert _rel(out, _exact_attention(q, k, v, lens.cpu(), g).to(DEV)) < sanity(bits)


def test_decode_bf16_default_splits(gen):
    lens = torch.tensor([70, 5], dtype=torch.int32)
    layout, cache, bt, k, v, q = _case(4, 64, 16, 2, 4, lens, gen, dtype=torch.bfloat16)
    out = decode_attention(q, cache, layout, bt, lens.to(DEV))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = decode_attention_reference(q, cache, layout, bt, lens.to(DEV), compute_dtype=torch.float64)
    assert _rel(out, ref) < 6e-3                        # bf16 output rounding


@pytest.mark.parametrize("bits,g", [(16, 1), (16, 4), (4, 1), (2, 8), (8, 4), (4, 2), (4, 16)])
def test_decode_gqa_group_sizes(bits, g, gen):
    """The G query heads of a KV head are padded inside the kernel (to the 16 rows of an mma for
    fp16, to 8 columns for the quantized kernel); the padding never reaches the output."""
    lens = torch.tensor([[40, 0], [7, 33]], dtype=torch.int32)
    layout, cache, bt, k, v, q = _case(bits, 64, 16, 2, g, lens, gen)
    lens = lens.to(DEV)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, cache, layout, bt, lens, num_splits=2, block_n=32, out=out)
    ref = decode_attention_reference(q, cache, layout, bt, lens, compute_dtype=torch.float64)
    assert torch.isfinite(out).all() and _rel(out, ref) < 2e-3
    assert (out[0, g:2 * g] == 0).all()


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_decode_long_diffuse_context(bits, gen):
    """A long context with nearly uniform attention (small q) and an offset in V: the case where
    folding V's scale into p (p * s_v in float16) underflowed and its zero-point sum cancelled
    (the kernel now folds it with centred codes and sums the zero point in float32)."""
    lens = torch.tensor([3000], dtype=torch.int32)
    layout, cache, bt, k, v, q = _case(bits, 64, 64, 1, 4, lens, gen, v_offset=4.0)
    q = q * 0.05
    lens = lens.to(DEV)
    out = decode_attention(q, cache, layout, bt, lens, num_splits=2, block_n=64)
    ref = decode_attention_reference(q, cache, layout, bt, lens, compute_dtype=torch.float64)
    assert _rel(out, ref) < 2e-3


@pytest.mark.parametrize("bits,per_head,splits", [(16, False, 1), (8, True, 2), (4, False, 3), (2, True, 1)])
def test_decode_reads_only_the_held_slots(bits, per_head, splits, gen):
    """held = (start, front, window): a (sequence, head) reads slots [start, start + front) and its
    last `window` ones; every other slot is poisoned (NaN), as evicted and freed slots would be.
    Rows: a kept run at the end (snapkv), sinks + a window with a gap (streaming), nothing left."""
    b, hkv, g, bs = 3, 2, 4, 16
    shape = (b, hkv) if per_head else (b,)
    lens = torch.randint(60, 120, shape, dtype=torch.int32, generator=gen)
    held = torch.zeros(*shape, 3, dtype=torch.int32)
    held[0, ..., 0] = (torch.rand(lens[0].shape, generator=gen) * lens[0]).int()        # snapkv: from start on
    held[0, ..., 1], held[0, ..., 2] = lens[0] - held[0, ..., 0], 1 << 30
    held[1, ..., 1] = torch.randint(1, 6, lens[1].shape, dtype=torch.int32, generator=gen)  # streaming: sinks
    held[1, ..., 2] = torch.randint(5, 40, lens[1].shape, dtype=torch.int32, generator=gen)  # + window
    held[2, ..., 0] = lens[2]                                                               # nothing held
    layout, cache, bt, k, v, q = _case(bits, 64, bs, hkv, g, lens, gen)
    lens2 = lens if per_head else lens[:, None].expand(b, hkv)
    held2 = held if per_head else held[:, None].expand(b, hkv, 3)
    pos = torch.arange(k.shape[2])
    start, front, window = (held2[..., i, None].long() for i in range(3))
    keep = (((pos >= start) & (pos < start + front)) | (pos >= torch.maximum(lens2[..., None] - window, start + front)))
    keep &= pos < lens2[..., None]
    for i in range(b):
        for h in range(hkv):
            t = torch.nonzero(~keep[i, h, :int(lens2[i, h])]).flatten()
            blk, off = bt[i, t // bs].long(), (t % bs).to(DEV)
            if layout.quantized:
                layout.meta(cache)[blk, :, h, off] = float("nan")
            else:
                cache[blk, :, h, off] = float("nan")
    lens, held = lens.to(DEV), held.to(DEV)
    out = torch.full_like(q, float("nan"))
    width = int(keep.sum(-1).max()) - 3  # the logits of held tokens 0 .. width-1 (a few are past it)
    logits = torch.full((b, hkv * g, width), float("nan"), device=DEV)
    decode_attention(q, cache, layout, bt, lens, held=held, num_splits=splits, block_n=32, out=out, logits=logits)
    assert torch.isfinite(out).all(), "a slot that is not held was read, or the output was not written"
    ref = decode_attention_reference(q, cache, layout, bt, lens, compute_dtype=torch.float64, held=held)
    assert _rel(out, ref) < 2e-3
    assert (out[2] == 0).all()
    # the logits: held token i (front run, then window) of each query head, q . k * scale over the
    # dequantized keys (float64 here); entries past a head's held count are left as they were (NaN)
    dk, _ = gather_kv(cache, layout, bt, k.shape[2], torch.float64)  # [B, H, L, D]
    for i in range(b):
        for h in range(hkv):
            pos = torch.nonzero(keep[i, h]).flatten()[:width].to(DEV)
            want = q[i, h * g:(h + 1) * g].double() @ dk[i, h, pos].T * 64 ** -0.5  # [G, n]
            got = logits[i, h * g:(h + 1) * g]
            assert torch.allclose(got[:, :len(pos)].double(), want, rtol=2e-3, atol=2e-3), (i, h)
            assert got[:, len(pos):].isnan().all(), (i, h)
    # sanity against unquantized attention over exactly the held slots
    s = torch.einsum("bhgd,bhld->bhgl", q.cpu().double().view(b, hkv, g, 64), k.cpu().double()) * 64 ** -0.5
    p = torch.softmax(s.masked_fill(~keep[:, :, None], float("-inf")), -1).nan_to_num(0.0)
    exact = torch.einsum("bhgl,bhld->bhgd", p, v.cpu().double()).reshape(b, hkv * g, 64)
    assert _rel(out.cpu(), exact) < sanity(bits)


@pytest.mark.parametrize("bits,splits", [(4, 1), (8, 3), (2, 2)])
def test_logits_of_every_slot_with_a_length_per_head(bits, splits, gen):
    """No ``held`` and a length per head (HF's paged eviction): entry i of ``logits`` is slot i's
    ``q . k * scale`` over the dequantized keys (a float64 loop), for the kernel and for its
    reference alike; entries past a head's length stay as they were (NaN)."""
    b, hkv, g, d, width = 2, 2, 4, 64, 112
    lens = torch.randint(20, 100, (b, hkv), dtype=torch.int32, generator=gen)
    layout, cache, bt, k, v, q = _case(bits, d, 16, hkv, g, lens, gen)
    lens = lens.to(DEV)
    dk, _ = gather_kv(cache, layout, bt, k.shape[2], torch.float64)
    for attend in (lambda lg: decode_attention(q, cache, layout, bt, lens, num_splits=splits, block_n=32, logits=lg),
                   lambda lg: decode_attention_reference(q, cache, layout, bt, lens, logits=lg)):
        logits = torch.full((b, hkv * g, width), float("nan"), device=DEV)
        attend(logits)
        for i in range(b):
            for h in range(hkv):
                n = int(lens[i, h])
                want = [[float(q[i, qh].double() @ dk[i, h, t]) * d ** -0.5 for t in range(n)]
                        for qh in range(h * g, (h + 1) * g)]
                got = logits[i, h * g:(h + 1) * g]
                assert torch.allclose(got[:, :n].double().cpu(), torch.tensor(want, dtype=torch.float64),
                                      rtol=2e-3, atol=2e-3), (i, h)
                assert got[:, n:].isnan().all(), (i, h)


@pytest.mark.parametrize("bits,splits,per_head", [(16, 1, False), (4, 1, True), (8, 3, False), ((8, 4), 2, True)])
def test_decode_log_sum_exp_and_its_merge_with_tokens_held_elsewhere(bits, splits, per_head, gen):
    """``lse`` is log(sum_t exp(q . k_t * scale)) over the dequantized keys (a float64 loop here;
    -inf for a head that read nothing), one split or several; merged by log-sum-exp with attention
    over a second, dense set of tokens it gives attention over both sets at once (float64)."""
    b, hkv, g, d = 3, 2, 4, 64
    lens = torch.randint(1, 90, (b, hkv) if per_head else (b,), dtype=torch.int32, generator=gen)
    lens[1] = 0                                                    # nothing in the pages
    layout, cache, bt, k, v, q = _case(bits, d, 16, hkv, g, lens, gen)
    lens = lens.to(DEV)
    # one split: a float32 output (what the HF residual window merges from); several: q's dtype
    out = torch.full(q.shape, float("nan"), dtype=torch.float32 if splits == 1 else q.dtype, device=DEV)
    lse = torch.full((b, hkv * g), float("nan"), device=DEV)
    decode_attention(q, cache, layout, bt, lens, num_splits=splits, block_n=32, out=out, lse=lse)
    dk, dv = gather_kv(cache, layout, bt, k.shape[2], torch.float64)   # [B, H, L, D]
    lens2 = (lens if per_head else lens[:, None].expand(b, hkv)).cpu()
    want = torch.empty(b, hkv * g, dtype=torch.float64)
    for i in range(b):
        for hq in range(hkv * g):
            n = int(lens2[i, hq // g])
            logits = [float(q[i, hq].double() @ dk[i, hq // g, t]) * d ** -0.5 for t in range(n)]
            top = max(logits, default=0.0)
            want[i, hq] = top + math.log(math.fsum(math.exp(x - top) for x in logits)) if n else float("-inf")
    assert bool(lse[1].cpu().eq(float("-inf")).all()) and bool(out[1].eq(0).all())
    finite = torch.isfinite(want)
    assert torch.allclose(lse.cpu().double()[finite], want[finite], rtol=0, atol=2e-3)
    ref, ref_lse = decode_attention_reference(q, cache, layout, bt, lens, compute_dtype=torch.float64, return_lse=True)
    assert torch.equal(torch.isfinite(ref_lse.cpu()), finite)
    assert torch.allclose(ref_lse.cpu()[finite], want[finite], rtol=0, atol=1e-9)
    # a second set of 5 tokens per head, dense; the merge against attention over both at once
    tk = torch.randn(b, hkv, 5, d, generator=gen, dtype=torch.float64)
    tv = torch.randn(b, hkv, 5, d, generator=gen, dtype=torch.float64)
    qd = q.cpu().double().view(b, hkv, g, d)
    st = torch.einsum("bhgd,bhld->bhgl", qd, tk) * d ** -0.5
    tail_out = torch.einsum("bhgl,bhld->bhgd", st.softmax(-1), tv).reshape(b, hkv * g, d)
    merged = merge_attention(out.cpu(), lse.cpu(), tail_out, st.logsumexp(-1).reshape(b, hkv * g))
    allk, allv = torch.cat([dk.cpu(), tk], 2), torch.cat([dv.cpu(), tv], 2)
    seen = torch.cat([torch.arange(k.shape[2])[None, None] < lens2[..., None], torch.ones(b, hkv, 5, dtype=torch.bool)], 2)
    allk, allv = allk.masked_fill(~seen[..., None], 0.0), allv.masked_fill(~seen[..., None], 0.0)  # poisoned slots
    sa = torch.einsum("bhgd,bhld->bhgl", qd, allk) * d ** -0.5
    both = torch.einsum("bhgl,bhld->bhgd", sa.masked_fill(~seen[:, :, None], float("-inf")).softmax(-1), allv)
    assert merged.dtype == torch.float32 and _rel(merged, both.reshape(b, hkv * g, d)) < 2e-3
    torch.testing.assert_close(merged[1].double(), tail_out[1], rtol=1e-5, atol=1e-5)  # empty pages: the tail alone
    with pytest.raises(ValueError, match="lse must be contiguous float32"):
        decode_attention(q, cache, layout, bt, lens, lse=torch.zeros(b, hkv * g, dtype=torch.float16, device=DEV))


@pytest.mark.parametrize("bits,splits,per_head,n", [(16, 1, False, 8), (4, 1, True, 32), (8, 3, False, 5),
                                                    ((8, 4), 2, True, 16), (2, 2, False, 1)])
def test_decode_with_a_dense_tail_attends_over_the_pages_and_the_tail(bits, splits, per_head, n, gen):
    """``tail=(keys, values, counts)``: each head's first ``counts`` dense rows join its paged
    tokens in one softmax (a residual window). Against float64 attention over both sets (the
    pages dequantized); rows past a head's count are NaN and never read; a head with no pages
    and no tail rows gives zeros and lse -inf."""
    b, hkv, g, d = 3, 2, 4, 64
    shape = (b, hkv) if per_head else (b,)
    lens = torch.randint(1, 90, shape, dtype=torch.int32, generator=gen)
    counts = torch.randint(0, n + 1, shape, dtype=torch.int32, generator=gen)
    lens[1], counts[1] = 0, n                                  # the tail alone
    lens[2], counts[2] = 0, 0                                  # nothing at all
    layout, cache, bt, k, v, q = _case(bits, d, 16, hkv, g, lens, gen)
    tk = torch.randn(b, hkv, n, d, generator=gen).to(DEV, q.dtype)
    tv = torch.randn(b, hkv, n, d, generator=gen).to(DEV, q.dtype)
    lens2 = lens if per_head else lens[:, None].expand(b, hkv)
    counts2 = counts if per_head else counts[:, None].expand(b, hkv)
    rows = torch.arange(n)[None, None] < counts2[..., None]
    tk[~rows.to(DEV)], tv[~rows.to(DEV)] = float("nan"), float("nan")
    lens, counts = lens.to(DEV), counts.to(DEV)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((b, hkv * g), float("nan"), device=DEV)
    decode_attention(q, cache, layout, bt, lens, num_splits=splits, block_n=32, out=out, lse=lse,
                     tail=(tk, tv, counts))
    dk, dv = gather_kv(cache, layout, bt, k.shape[2], torch.float64)
    seen = torch.cat([torch.arange(k.shape[2])[None, None] < lens2[..., None], rows], 2)             # [B, H, L + n]
    allk = torch.cat([dk.cpu(), tk.cpu().double()], 2).masked_fill(~seen[..., None], 0.0)
    allv = torch.cat([dv.cpu(), tv.cpu().double()], 2).masked_fill(~seen[..., None], 0.0)
    s = torch.einsum("bhgd,bhld->bhgl", q.cpu().double().view(b, hkv, g, d), allk) * d ** -0.5
    s = s.masked_fill(~seen[:, :, None], float("-inf"))
    want = torch.einsum("bhgl,bhld->bhgd", s.softmax(-1).nan_to_num(0.0), allv).reshape(b, hkv * g, d)
    want_lse = s.logsumexp(-1).reshape(b, hkv * g)
    assert torch.isfinite(out).all() and _rel(out.cpu(), want) < 2e-3
    assert bool((out[2] == 0).all()) and bool(lse[2].cpu().eq(float("-inf")).all())
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert torch.allclose(lse.cpu().double()[finite], want_lse[finite], rtol=0, atol=2e-3)
    ref, ref_lse = decode_attention_reference(q, cache, layout, bt, lens, compute_dtype=torch.float64,
                                              return_lse=True, tail=(tk, tv, counts))
    assert _rel(ref.cpu(), want) < 1e-9 and torch.allclose(ref_lse.cpu()[finite], want_lse[finite], atol=1e-9)
    with pytest.raises(ValueError, match="tail keys and values must be"):
        decode_attention(q, cache, layout, bt, lens, tail=(tk, tv[..., :32], counts))
