"""kvplug's CUDA backend for vLLM, its CPU-testable parts: the batch split, the page arithmetic,
the refusals, and one layer's forward (Triton in interpreter mode) on mixed batches against plain
PyTorch in float32 (reference store + reference attention over the dequantized cache, SDPA over
the raw K/V for prefills)."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None or importlib.util.find_spec("triton") is None,
                                reason="needs vllm and triton")

HKV, G, D, BS = 2, 2, 64, 16


@pytest.fixture
def cb(monkeypatch):
    from kvplug.adapters.vllm import compat, cuda_backend

    def config(spec):
        model = SimpleNamespace(dtype=torch.float16, get_head_size=lambda: D)
        return SimpleNamespace(model_config=model, cache_config=SimpleNamespace(block_size=BS),
                               additional_config={"kvplug": spec})

    cuda_backend.make_config = config
    monkeypatch.setattr(compat, "current_config", lambda: config(cuda_backend.SPEC))
    monkeypatch.setattr(cuda_backend, "ACTIVE", {"layout": None})
    return cuda_backend


def _impl(cb, spec):
    cb.SPEC = spec
    return cb.KVPlugCudaImpl(HKV * G, D, D ** -0.5, HKV)


def _common(query_lens, context_lens, slots, block_table):
    """A stand-in for vLLM's CommonAttentionMetadata (the fields the builder reads)."""
    ql = torch.tensor(query_lens, dtype=torch.int32)
    starts = torch.cat([torch.zeros(1, dtype=torch.int32), ql.cumsum(0, dtype=torch.int32)])
    seq = ql + torch.tensor(context_lens, dtype=torch.int32)
    return SimpleNamespace(query_start_loc=starts.clone(), query_start_loc_cpu=starts, seq_lens=seq.clone(),
                           seq_lens_cpu_upper_bound=seq, num_reqs=len(query_lens), num_actual_tokens=int(ql.sum()),
                           max_query_len=int(ql.max()), max_seq_len=int(seq.max()), block_table_tensor=block_table,
                           slot_mapping=slots, causal=True)


@pytest.mark.parametrize("spec", ["int8", "int4", "int2"])
def test_forward_mixed_batches_match_float32_reference(cb, spec, gen):
    from kvplug import triton_ops

    impl = _impl(cb, spec)
    layout = impl.layout
    assert cb.ACTIVE["layout"] is layout
    nb = 12
    c = cb.token_bytes(layout)
    shape = cb.KVPlugCudaBackend.get_kv_cache_shape(nb, BS, HKV, D)
    assert shape == (nb, HKV, BS, c)
    kv_cache = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)  # poisoned page
    ref_cache = layout.allocate(nb)
    ref_cache.zero_()
    tables = torch.randperm(nb, generator=gen)[:9].view(3, 3).int()
    lengths = [0, 0, 0]

    def step(reqs):
        """reqs: (request, new tokens) with decodes (1 token) first; returns (output, expected)."""
        qlens, ctx, slot_list = [], [], []
        for r, t in reqs:
            pos = torch.arange(lengths[r], lengths[r] + t)
            slot_list.append(tables[r, pos // BS].long() * BS + pos % BS)
            qlens.append(t)
            ctx.append(lengths[r])
        slots = torch.cat(slot_list)
        n = len(slots)
        q = torch.randn(n, HKV * G, D, generator=gen).half()
        k = torch.randn(n, HKV, D, generator=gen).half()
        v = torch.randn(n, HKV, D, generator=gen).half()
        md = cb.build_metadata(_common(qlens, ctx, slots, tables[[r for r, _ in reqs]]))
        out = torch.full_like(q, float("nan"))
        impl.forward(None, q, k, v, kv_cache, md, output=out)
        triton_ops.store_kv_reference(k, v, ref_cache, slots, layout)
        expected = torch.empty(n, HKV * G, D)
        start = 0
        for (r, t), context in zip(reqs, ctx):
            lengths[r] += t
            if context == 0:  # prefill: over its own raw K/V
                o = F.scaled_dot_product_attention(q[start:start + t].float().transpose(0, 1),
                                                   k[start:start + t].float().transpose(0, 1),
                                                   v[start:start + t].float().transpose(0, 1), is_causal=True,
                                                   enable_gqa=True)
                expected[start:start + t] = o.transpose(0, 1)
            else:
                expected[start] = triton_ops.decode_attention_reference(
                    q[start:start + 1], ref_cache, layout, tables[r:r + 1], torch.tensor([lengths[r]]))[0]
            start += t
        return out, expected

    for reqs in ([(0, 5), (1, 19)], [(0, 1), (1, 1), (2, 7)], [(0, 1), (1, 1), (2, 1)]):
        out, expected = step(reqs)
        assert not out.isnan().any()
        err = (out.float() - expected).norm() / expected.norm()
        assert err < 1e-2, (reqs, err)
    # the forward wrote what the reference store wrote: same codes, scales and zeros at every slot
    pos = [torch.arange(n) for n in lengths]
    blk = torch.cat([tables[r, p // BS].long() for r, p in enumerate(pos)])
    off = torch.cat([p % BS for p in pos])
    mine = kv_cache.view(layout.shape(nb))
    torch.testing.assert_close(layout.codes(mine)[blk, :, :, off], layout.codes(ref_cache)[blk, :, :, off])
    torch.testing.assert_close(layout.meta(mine)[blk, :, :, off], layout.meta(ref_cache)[blk, :, :, off])

def test_builder_splits_decodes_first_and_refuses_cached_prefill(cb):
    tables = torch.arange(8, dtype=torch.int32).view(4, 2)
    md = cb.build_metadata(_common([1, 1, 4, 3], [9, 2, 0, 0], torch.arange(9), tables))
    assert (md.num_decodes, md.num_prefill_tokens, md.max_prefill_len) == (2, 7, 4)
    assert md.prefill_starts.tolist() == [0, 4, 7] == md.prefill_starts_cpu.tolist()
    with pytest.raises(RuntimeError, match="cached context"):
        cb.build_metadata(_common([1, 4], [3, 5], torch.arange(5), tables[:2]))


def test_spec_and_shape_report_the_codec_page(cb):
    from kvplug.adapters.vllm import compat
    from kvplug.adapters.vllm.layout import TokenLayout
    from kvplug.config import resolve

    impl = _impl(cb, "int4")
    spec = SimpleNamespace(head_size=D, head_size_v=D)
    seen = {}
    cb_compat = compat.compressed_spec
    try:
        compat.compressed_spec = lambda s, c: seen.setdefault("bytes", c) and s
        cb.KVPlugCudaBackend.customize_spec(spec)
    finally:
        compat.compressed_spec = cb_compat
    # the same bytes per token-head as the CPU backend's page (one layout, two engines' paths)
    assert seen["bytes"] == TokenLayout.for_codec(resolve("int4").codec, D, torch.float16).token_bytes
    assert seen["bytes"] == 2 * (D // 2 + 4) == cb.token_bytes(impl.layout)
    with pytest.raises(Exception, match="head sizes"):
        cb.KVPlugCudaBackend.customize_spec(SimpleNamespace(head_size=128, head_size_v=128))


def test_refusals_are_one_line(cb):
    from kvplug.config import resolve
    from kvplug.errors import SpecError

    config = cb.make_config("int4")
    config.cache_config.enable_prefix_caching = True
    config.scheduler_config = SimpleNamespace(enable_chunked_prefill=True)
    with pytest.raises(SpecError, match="no-enable-prefix-caching.*no-enable-chunked-prefill") as e:
        cb.check_engine(config, resolve("int4"))
    assert "\n" not in str(e.value)
    config.cache_config.enable_prefix_caching = False
    config.scheduler_config.enable_chunked_prefill = False
    cb.check_engine(config, resolve("int4"))
    with pytest.raises(SpecError, match="rotate"):
        cb.check_engine(config, resolve("int4(rotate=true)"))
    with pytest.raises(SpecError, match="group"):
        cb.check_engine(config, resolve("int4(group=32)"))
    with pytest.raises(SpecError, match="sliding-window"):
        cb.SPEC = "int4"
        cb.KVPlugCudaImpl(HKV * G, D, 1.0, HKV, sliding_window=128)


def test_cuda_platform_routes_compressed_codecs_only(cb, monkeypatch):
    import kvplug.adapters.vllm as adapter
    from kvplug.adapters.vllm import compat

    monkeypatch.setattr(compat, "platform", lambda: SimpleNamespace(is_cuda=lambda: True, is_cpu=lambda: False,
                                                                     device_name="H100"))
    stock = "vllm.v1.attention.backends.flash_attn.FlashAttentionBackend"
    for spec, expected in (("int4", adapter.CUDA_BACKEND), ("int2", adapter.CUDA_BACKEND), ("none", None)):
        cb.SPEC = spec
        assert adapter._pick_backend(stock) == expected
