"""paged_attention (Triton, interpreter mode on CPU): varlen batches of decode rows and prefill
chunks against a float64 loop over each sequence's dequantized cache."""

import pytest
import torch

pytest.importorskip("triton")

from kvplug.triton_ops import (dequantize_kv, dequantize_kv_reference, paged_attention,  # noqa: E402
                               paged_attention_reference, store_kv_reference)

from test_triton_store import DEV, layout_of, poisoned_cache  # noqa: E402


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _batch(bits, d, bs, hkv, g, ctx, qlen, gen, dtype=torch.float16):
    """A poisoned paged cache holding ``ctx[s] + qlen[s]`` tokens of each sequence in shuffled
    blocks (the chunk's own K/V stored too, as a backend stores before attending) and the
    chunks' queries, concatenated."""
    layout = layout_of(bits, bs, hkv, d, dtype)
    lens = [c + n for c, n in zip(ctx, qlen)]
    max_blocks = max(1, -(-max(lens) // bs))
    nb = len(lens) * max_blocks + 3
    cache = poisoned_cache(layout, nb, gen)
    bt = torch.randperm(nb, generator=gen)[: len(lens) * max_blocks].view(len(lens), max_blocks).int().to(DEV)
    for s, length in enumerate(lens):
        t = torch.arange(length, device=DEV)
        k = torch.randn(length, hkv, d, generator=gen).to(DEV, dtype)
        v = torch.randn(length, hkv, d, generator=gen).to(DEV, dtype)
        store_kv_reference(k, v, cache, bt[s, t // bs].long() * bs + t % bs, layout)
    q = torch.randn(sum(qlen), hkv * g, d, generator=gen).to(DEV, dtype)
    qsl = torch.tensor([0] + list(torch.tensor(qlen).cumsum(0)), dtype=torch.int32, device=DEV)
    return layout, cache, bt, q, qsl, torch.tensor(lens, dtype=torch.int32, device=DEV)


@pytest.mark.parametrize("bits,g", [(16, 4), (8, 1), (4, 4), (4, 8), (2, 4), ((8, 4), 4), ((4, 2), 1),
                                    ((3, 2, "sym"), 4), ((3, 8), 1)])
def test_mixed_batch_matches_the_float64_loop(bits, g, gen):
    """Decode rows (1 token), a fresh prompt, chunks after a context that ends inside a block,
    one longer than a query tile, in one launch; unused slots are NaN."""
    ctx = [50, 0, 17, 200, 3, 0]
    qlen = [1, 7, 33, 1, 70, 1]
    layout, cache, bt, q, qsl, lens = _batch(bits, 64, 16, 2, g, ctx, qlen, gen)
    out = torch.full_like(q, float("nan"))
    res = paged_attention(q, cache, layout, bt, qsl, lens, max_query_len=max(qlen), out=out)
    assert res is out and torch.isfinite(out).all(), "output not fully written, or a poisoned slot was read"
    ref = paged_attention_reference(q, cache, layout, bt, qsl, lens, compute_dtype=torch.float64)
    assert _rel(out, ref) < 2e-3
    for s in range(len(ctx)):                                  # every sequence, not only on average
        a, b = qsl[s].item(), qsl[s + 1].item()
        assert _rel(out[a:b], ref[a:b]) < 3e-3, f"sequence {s} (context {ctx[s]}, {qlen[s]} tokens)"


def test_chunks_give_what_one_chunk_gives(gen):
    """A 90-token prompt in one chunk, and the same prompt in chunks of 25 / 40 / 25 (each run as
    its own call over the cache that holds the tokens so far): the same outputs."""
    bits, g = 4, 4
    layout, cache, bt, q, qsl, lens = _batch(bits, 64, 16, 2, g, [0], [90], gen)
    whole = paged_attention(q, cache, layout, bt, qsl, lens, max_query_len=90)
    parts, start = [], 0
    for n in (25, 40, 25):
        qs = q[start:start + n].contiguous()
        parts.append(paged_attention(qs, cache, layout, bt, torch.tensor([0, n], dtype=torch.int32, device=DEV),
                                     torch.tensor([start + n], dtype=torch.int32, device=DEV), max_query_len=n))
        start += n
    ref = paged_attention_reference(q, cache, layout, bt, qsl, lens, compute_dtype=torch.float64)
    assert _rel(torch.cat(parts), ref) < 2e-3 and _rel(whole, ref) < 2e-3
    assert _rel(torch.cat(parts), whole) < 2e-3


def test_decode_only_batch_takes_the_decode_kernel(gen):
    """max_query_len 1 with one row per sequence: decode_attention's path, same function."""
    layout, cache, bt, q, qsl, lens = _batch(8, 64, 16, 2, 4, [40, 9, 0], [1, 1, 1], gen)
    out = paged_attention(q, cache, layout, bt, qsl, lens, max_query_len=1)
    ref = paged_attention_reference(q, cache, layout, bt, qsl, lens, compute_dtype=torch.float64)
    assert _rel(out, ref) < 2e-3


def test_bad_shapes_are_one_line_errors(gen):
    layout, cache, bt, q, qsl, lens = _batch(4, 64, 16, 2, 4, [3], [2], gen)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_attention(q, cache, layout, bt, qsl[:1], lens)
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention(q, cache, layout, bt[:, None], qsl, lens)


@pytest.mark.parametrize("bits,dtype", [(16, torch.bfloat16), (8, torch.float16), (4, torch.bfloat16),
                                        (2, torch.float16), ((8, 4), torch.bfloat16), ((2, 4), torch.float16),
                                        ((3, 2, "sym"), torch.float16), ((3, 4), torch.bfloat16)])
def test_dequantize_kv_packs_what_the_cache_holds(bits, dtype, gen):
    """Sequences of 1, 0, 40 (ending mid-block) and 70 tokens in shuffled blocks of a poisoned
    cache, packed at cu_seqlens: each value within one rounding (to ``dtype``) of the float64
    decode of the core codec; nothing unwritten read (NaN scales would show)."""
    layout, cache, bt, _, _, lens = _batch(bits, 64, 16, 2, 1, [1, 0, 40, 70], [0, 0, 0, 0], gen, dtype)
    cu = torch.tensor([0] + lens.cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    k, v = dequantize_kv(cache, layout, bt, lens, cu, total=int(lens.sum()), max_seq_len=int(lens.max()))
    rk, rv = dequantize_kv_reference(cache, layout, bt, lens, torch.float64)
    ulp = torch.finfo(dtype).eps
    for got, ref in ((k, rk), (v, rv)):
        assert got.dtype == dtype and got.shape == ref.shape == (111, 2, 64)
        assert torch.isfinite(got).all()
        assert ((got.double() - ref).abs() <= ref.abs() * ulp + 1e-30).all()


def test_dequantize_kv_bad_shapes_are_one_line_errors(gen):
    layout, cache, bt, _, _, lens = _batch(4, 64, 16, 2, 1, [5, 3], [0, 0], gen)
    with pytest.raises(ValueError, match="cu_seqlens"):
        dequantize_kv(cache, layout, bt, lens, lens, total=8, max_seq_len=5)
