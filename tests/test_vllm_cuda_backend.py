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

from kvplug import parse

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None or importlib.util.find_spec("triton") is None,
                                reason="needs vllm and triton")

HKV, G, D, BS, LAYERS = 2, 2, 64, 16, 2


SELECTED = {"spec": "int4", "extra": {}}
"""The strategy (and other additional-config keys) the stand-in config of :func:`_config` selects
(set by each test)."""


def _config(spec, extra=None):
    """A stand-in for the worker's VllmConfig (the fields the backend reads)."""
    model = SimpleNamespace(dtype=torch.float16, get_head_size=lambda: D, get_total_num_hidden_layers=lambda: LAYERS,
                            max_model_len=256)
    return SimpleNamespace(model_config=model, cache_config=SimpleNamespace(block_size=BS, enable_prefix_caching=False),
                           scheduler_config=SimpleNamespace(enable_chunked_prefill=False, max_num_seqs=4,
                                                            max_num_batched_tokens=256, long_prefill_token_threshold=0),
                           compilation_config=SimpleNamespace(max_cudagraph_capture_size=8),
                           speculative_config=None, kv_transfer_config=None,
                           additional_config={"kvplug": spec, **(SELECTED["extra"] if extra is None else extra)})


@pytest.fixture
def cb(monkeypatch):
    from kvplug.adapters.vllm import compat, cuda_backend

    monkeypatch.setattr(compat, "current_config", lambda: _config(SELECTED["spec"]))
    SELECTED["extra"] = {}
    yield cuda_backend
    SELECTED["extra"] = {}


def _impl(cb, spec):
    SELECTED["spec"] = spec
    return cb.KVPlugCudaImpl(HKV * G, D, D ** -0.5, HKV)


def _backend(cb, spec):
    """The backend class vLLM is given for an engine of ``spec`` (the stand-in config's dtype and layers)."""
    from kvplug.adapters.vllm.capabilities import Engine, configured
    from kvplug.config import resolve

    return configured(cb.KVPlugCudaBackend, Engine.of(_config(spec), resolve(spec)))


def _common(query_lens, context_lens, slots, block_table):
    """A stand-in for vLLM's CommonAttentionMetadata (the fields the builder reads)."""
    ql = torch.tensor(query_lens, dtype=torch.int32)
    starts = torch.cat([torch.zeros(1, dtype=torch.int32), ql.cumsum(0, dtype=torch.int32)])
    seq = ql + torch.tensor(context_lens, dtype=torch.int32)
    return SimpleNamespace(query_start_loc=starts.clone(), query_start_loc_cpu=starts, seq_lens=seq.clone(),
                           seq_lens_cpu_upper_bound=seq, num_reqs=len(query_lens), num_actual_tokens=int(ql.sum()),
                           max_query_len=int(ql.max()), max_seq_len=int(seq.max()), block_table_tensor=block_table,
                           slot_mapping=slots, causal=True)


def _step_inputs(reqs, lengths, tables, gen):
    """One step's batch: ``reqs`` = (request, new tokens), each continuing at ``lengths[request]``;
    its query lengths, contexts, slots and fresh q, k, v (float16)."""
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
    return qlens, ctx, slots, q, k, v


@pytest.mark.parametrize("spec", ["int8", "int4", "int2", "int4(rotate=true)", "mixed",
                                  "mixed(key=4, value=2, rotate=true)",
                                  "mixed(key=3, value=2, symmetric=true, rotate=true, key_clip=0.85)"])
def test_forward_mixed_batches_match_float32_reference(cb, spec, gen):
    """Decode rows against float32 attention over each request's K/V as the core codec returns
    them (encode, decode: its own rotation, its own widths), prefills against SDPA over their raw
    K/V; the page bytes against the CPU backend's writer (the core codec, bit for bit)."""
    from kvplug.adapters.vllm.layout import PagedKV, TokenLayout
    from kvplug.config import resolve

    impl = _impl(cb, spec)
    layout = impl.layout
    codec = resolve(spec).codec
    nb = 12
    c = cb.token_bytes(layout)
    shape = _backend(cb, spec).get_kv_cache_shape(nb, BS, HKV, D)
    assert shape == (nb, HKV, BS, c)
    kv_cache = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)  # poisoned page
    cpu_cache = torch.zeros_like(kv_cache)
    cpu_writer = PagedKV(TokenLayout.for_codec(codec, D, torch.float16))
    tables = torch.randperm(nb, generator=gen)[:9].view(3, 3).int()
    lengths = [0, 0, 0]
    history = [([], []) for _ in range(3)]

    def step(reqs):
        """reqs: (request, new tokens) with decodes (1 token) first; returns (output, expected)."""
        qlens, ctx, slots, q, k, v = _step_inputs(reqs, lengths, tables, gen)
        n = len(slots)
        md = cb.build_metadata(_common(qlens, ctx, slots, tables[[r for r, _ in reqs]]))
        out = torch.full_like(q, float("nan"))
        impl.forward(None, q, k, v, kv_cache, md, output=out)
        cpu_writer.store(cpu_cache, k, v, slots)
        expected = torch.empty(n, HKV * G, D)
        start = 0
        for (r, t), context in zip(reqs, ctx):
            lengths[r] += t
            history[r][0].append(k[start:start + t])
            history[r][1].append(v[start:start + t])
            if context == 0:  # prefill: over its own raw K/V
                o = F.scaled_dot_product_attention(q[start:start + t].float().transpose(0, 1),
                                                   k[start:start + t].float().transpose(0, 1),
                                                   v[start:start + t].float().transpose(0, 1), is_causal=True,
                                                   enable_gqa=True)
                expected[start:start + t] = o.transpose(0, 1)
            else:  # over what the codec gives back of every token so far
                keys, values = (codec.decode(codec.encode(torch.cat(x).transpose(0, 1), role), role, torch.float32)
                                for x, role in zip(history[r], ("key", "value")))
                o = F.scaled_dot_product_attention(q[start:start + 1].float().transpose(0, 1), keys, values,
                                                   enable_gqa=True)
                expected[start] = o.transpose(0, 1)[0]
            start += t
        return out, expected

    for reqs in ([(0, 5), (1, 19)], [(0, 1), (1, 1), (2, 7)], [(0, 1), (1, 1), (2, 1)]):
        out, expected = step(reqs)
        assert not out.isnan().any()
        err = (out.float() - expected).norm() / expected.norm()
        assert err < 1e-2, (reqs, err)
    # the forward wrote what the CPU backend's writer wrote: same bytes at every slot it wrote
    pos = [torch.arange(n) for n in lengths]
    slots = torch.cat([tables[r, p // BS].long() * BS + p % BS for r, p in enumerate(pos)])
    for mine, theirs in zip(cpu_writer.pages(kv_cache), cpu_writer.pages(cpu_cache)):
        for a, b in zip(mine, theirs):
            assert torch.equal(a[slots // BS, :, slots % BS], b[slots // BS, :, slots % BS])


@pytest.mark.parametrize("spec", ["int8", "int4", "int2", "mixed(key=4, value=2)", "mixed(rotate=true)",
                                  "mixed(key=3, value=2, symmetric=true)"])
def test_compressed_prefill_serves_chunks_and_cached_context(cb, spec, gen):
    """kvplug_prefill=compressed: a prompt in chunks (its second chunk after 7 cached tokens, a
    context ending inside a block), a prefix-cache-like hit (a fresh request whose first step
    starts after 16 cached tokens), decode rows beside them; every row against a float64 loop
    over the reference store's cache, the chunk's own tokens included. Unwritten slots hold
    random bytes. A rotated codec: the reference stores the rotated K/V and attends with the
    rotated q, its output rotated back (H is orthonormal and its own inverse)."""
    from kvplug import triton_ops
    from kvplug.rotation import rotate

    SELECTED["extra"] = {"kvplug_prefill": "compressed"}
    impl = _impl(cb, spec)
    layout = impl.layout
    nb = 16
    shape = _backend(cb, spec).get_kv_cache_shape(nb, BS, HKV, D)
    kv_cache = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    ref_cache = layout.allocate(nb).zero_()
    tables = torch.randperm(nb, generator=gen)[:12].view(3, 4).int()
    lengths = [0, 0, 16]           # request 2's first 16 tokens are "cached": stored by an earlier request
    pos = torch.arange(16)
    k0, v0 = torch.randn(16, HKV, D, generator=gen).half(), torch.randn(16, HKV, D, generator=gen).half()
    shared = tables[2, pos // BS].long() * BS + pos % BS
    turn = rotate if layout.rotated else (lambda x: x)
    triton_ops.store_kv_reference(turn(k0), turn(v0), ref_cache, shared, layout)
    kv_view = kv_cache.view(layout.shape(nb))
    kv_view[tables[2, :1].long()] = ref_cache[tables[2, :1].long()]       # the hit's block, as stored
    for reqs in ([(0, 20), (1, 7)], [(0, 1), (1, 12), (2, 9)], [(0, 1), (1, 1), (2, 1)]):
        qlens, ctx, slots, q, k, v = _step_inputs(reqs, lengths, tables, gen)
        common = _common(qlens, ctx, slots, tables[[r for r, _ in reqs]])
        md = cb.build_metadata(common, compressed=True)   # what the builder builds in this mode
        out = torch.full_like(q, float("nan"))
        impl.forward(None, q, k, v, kv_cache, md, output=out)
        triton_ops.store_kv_reference(turn(k), turn(v), ref_cache, slots, layout)
        for r, t in reqs:
            lengths[r] += t
        expected = turn(triton_ops.paged_attention_reference(turn(q), ref_cache, layout, common.block_table_tensor,
                                                             common.query_start_loc, common.seq_lens,
                                                             compute_dtype=torch.float64)).double()
        assert not out.isnan().any()
        err = ((out.double() - expected).norm() / expected.norm()).item()
        assert err < 3e-3, (reqs, err)


def test_dense_prefill_over_a_long_context_matches_float64(cb, gen):
    """The way long chunks go on CUDA (their sequences' pages decoded by ``dequantize_kv``, then a
    dense varlen kernel: SDPA here, vLLM's FlashAttention on a GPU): a 512-token chunk after 2,500
    cached tokens and a fresh 300-token prompt beside a decode row over 1,000, in one step, against
    a float64 loop over the reference store's cache. Unwritten slots hold random bytes."""
    from kvplug import triton_ops

    impl = _impl(cb, "int4")
    layout = impl.layout
    tables = torch.randperm(600, generator=gen).view(3, 200).int()  # 3,200 tokens each at most
    shape = _backend(cb, "int4").get_kv_cache_shape(601, BS, HKV, D)
    kv_cache = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    ref_cache = layout.allocate(601).zero_()
    lengths = [1000, 2500, 0]
    for r, n in enumerate(lengths):  # the cached context, as earlier steps stored it
        pos = torch.arange(n)
        slots = tables[r, pos // BS].long() * BS + pos % BS
        k, v = torch.randn(n, HKV, D, generator=gen).half(), torch.randn(n, HKV, D, generator=gen).half()
        for cache in (kv_cache.view(layout.shape(601)), ref_cache):
            triton_ops.store_kv_reference(k, v, cache, slots, layout)
    reqs = [(0, 1), (1, 512), (2, 300)]
    qlens, ctx, slots, q, k, v = _step_inputs(reqs, lengths, tables, gen)
    common = _common(qlens, ctx, slots, tables)
    md = cb.build_metadata(common, compressed=True)
    assert md.max_prefill_len >= impl.dense_from
    out = torch.full_like(q, float("nan"))
    impl.forward(None, q, k, v, kv_cache, md, output=out)
    triton_ops.store_kv_reference(k, v, ref_cache, slots, layout)
    expected = triton_ops.paged_attention_reference(q, ref_cache, layout, tables, common.query_start_loc,
                                                    common.seq_lens, compute_dtype=torch.float64)
    assert not out.isnan().any()
    for (a, b) in ((0, 1), (1, 513), (513, 813)):
        err = ((out[a:b].double() - expected[a:b]).norm() / expected[a:b].norm()).item()
        assert err < 3e-3, (a, b, err)


def test_builder_splits_decodes_first_and_refuses_cached_prefill(cb):
    tables = torch.arange(8, dtype=torch.int32).view(4, 2)
    md = cb.build_metadata(_common([1, 1, 4, 3], [9, 2, 0, 0], torch.arange(9), tables))
    assert (md.num_decodes, md.num_prefill_tokens, md.max_prefill_len) == (2, 7, 4)
    assert md.prefill_starts.tolist() == [0, 4, 7] == md.prefill_starts_cpu.tolist()
    # a CUDA-graph batch padded with requests of no token: the kernel's rows are the real decodes
    md = cb.build_metadata(_common([1, 1, 0, 0], [5, 6, 0, 0], torch.arange(2), tables))
    assert (md.num_decodes, md.num_decode_tokens, md.num_prefill_tokens) == (2, 2, 0)
    with pytest.raises(RuntimeError, match="cached context"):
        cb.build_metadata(_common([1, 4], [3, 5], torch.arange(5), tables[:2]))
    md = cb.build_metadata(_common([1, 4], [3, 5], torch.arange(5), tables[:2]), compressed=True)
    assert md.compressed_prefill and (md.num_decodes, md.num_prefill_tokens, md.first_prefill) == (1, 4, 1)


@pytest.mark.parametrize("spec,bits", [("int8", 8), ("int4", 4), ("int2", 2)])
def test_spec_reports_the_codec_page(cb, spec, bits):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from kvplug.adapters.vllm.layout import TokenLayout
    from kvplug.config import resolve

    impl = _impl(cb, spec)
    stock = FullAttentionSpec(block_size=BS, num_kv_heads=HKV, head_size=D, dtype=torch.float16)
    backend = _backend(cb, spec)
    page = backend.customize_spec(stock).page_size_bytes
    # codes + float16 scale and zero, for K and V of each head; the CPU backend's page is the same
    assert page == BS * HKV * 2 * (D * bits // 8 + 4) == impl.layout.page_bytes()
    assert page == BS * HKV * TokenLayout.for_codec(resolve(spec).codec, D, torch.float16).token_bytes
    with pytest.raises(Exception, match="head sizes"):  # K and V of one size per page
        backend.customize_spec(FullAttentionSpec(block_size=BS, num_kv_heads=HKV, head_size=D, head_size_v=2 * D,
                                                 dtype=torch.float16))


def test_refusals_are_one_line(cb):
    """Every refusal comes from what the backend class declares (:mod:`.capabilities`)."""
    from kvplug.adapters.vllm.capabilities import check_backend, check_engine
    from kvplug.config import resolve
    from kvplug.errors import SpecError

    backend = cb.KVPlugCudaBackend
    config = _config("int4", {"kvplug_prefill": "uncompressed"})
    config.cache_config.enable_prefix_caching = True
    config.scheduler_config = SimpleNamespace(enable_chunked_prefill=True)
    with pytest.raises(SpecError, match="no-enable-prefix-caching.*no-enable-chunked-prefill.*drop kvplug_prefill") as e:
        check_engine(config, resolve("int4"), backend)
    assert "\n" not in str(e.value)
    default = _config("int4", {})
    default.cache_config.enable_prefix_caching = default.scheduler_config.enable_chunked_prefill = True
    check_engine(default, resolve("int4"), backend)                       # both features on: served (compressed)
    check_engine(default, resolve("snapkv(budget=64)+int4"), backend)
    config.cache_config.enable_prefix_caching = False
    config.scheduler_config.enable_chunked_prefill = False
    check_engine(config, resolve("int4"), backend)
    config.cache_config.cache_dtype = "fp8"
    with pytest.raises(SpecError, match="keep --kv-cache-dtype auto"):
        check_engine(config, resolve("int4"), backend)
    for spec, kwargs, message in (("fp8", {}, "no paged kernel layout"), ("int4(group=32)", {}, "no paged kernel layout"),
                                  ("int4", {"dtype": torch.float32}, "runs models in float16, bfloat16"),
                                  ("int4", {"head_dim": 80}, "head size 80 is not supported")):
        with pytest.raises(SpecError, match=message) as e:
            check_backend(backend, resolve(spec), **{"head_dim": D, "dtype": torch.float16, **kwargs})
        assert "\n" not in str(e.value)
    check_backend(backend, resolve("int2"), D, torch.bfloat16)
    with pytest.raises(SpecError, match="sliding-window"):
        SELECTED["spec"] = "int4"
        cb.KVPlugCudaImpl(HKV * G, D, 1.0, HKV, sliding_window=128)
    with pytest.raises(SpecError, match="on CUDA does not support encoder or cross attention"):
        cb.KVPlugCudaImpl(HKV * G, D, 1.0, HKV, attn_type="encoder_only")


def test_each_engine_gets_its_own_backend_class_importable_by_name(cb):
    """Two engines in one process (different strategies, dtypes) get two classes with their own
    pages; the name vLLM is given resolves in a fresh process too (the module rebuilds it)."""
    import importlib

    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from kvplug.adapters.vllm.capabilities import Engine, configured, path

    a, b = _backend(cb, "int4"), _backend(cb, "int8")
    assert a is not b and a is _backend(cb, "int4") and issubclass(a, cb.KVPlugCudaBackend)
    stock = FullAttentionSpec(block_size=BS, num_kv_heads=HKV, head_size=D, dtype=torch.float16)
    assert a.customize_spec(stock).page_size_bytes == BS * HKV * 2 * (D // 2 + 4)
    assert b.customize_spec(stock).page_size_bytes == BS * HKV * 2 * (D + 4)
    module, _, name = path(a).rpartition(".")
    assert module == "kvplug.adapters.vllm.cuda_backend"
    delattr(cb, name)  # as in a process that never configured it
    rebuilt = getattr(importlib.import_module(module), name)
    assert rebuilt.engine == a.engine == Engine(str(parse("int4")), "float16", LAYERS)
    assert configured(cb.KVPlugCudaBackend, rebuilt.engine) is rebuilt
    with pytest.raises(AttributeError):
        getattr(cb, "KVPlugCudaBackend__NOT-A-TOKEN")
    with pytest.raises(RuntimeError, match="serves no engine"):
        cb.KVPlugCudaBackend.customize_spec(stock)


def test_cuda_platform_routes_compressed_codecs_only(cb, monkeypatch):
    import kvplug.adapters.vllm as adapter
    from kvplug.adapters.vllm import compat

    monkeypatch.setattr(compat, "platform", lambda: SimpleNamespace(is_cuda=lambda: True, is_cpu=lambda: False,
                                                                     device_name="H100"))
    stock = "vllm.v1.attention.backends.flash_attn.FlashAttentionBackend"
    for spec, ours in (("int4", True), ("int2", True), ("none", False)):
        SELECTED["spec"] = spec
        chosen = adapter._pick_backend(stock)
        assert chosen == (f"{adapter.CUDA_BACKEND}__{_backend(cb, spec).engine.token()}" if ours else None)


def test_cuda_routes_eviction(cb, monkeypatch):
    import kvplug.adapters.vllm as adapter
    from kvplug.adapters.vllm import compat
    from kvplug.config import resolve

    monkeypatch.setattr(compat, "platform", lambda: SimpleNamespace(is_cuda=lambda: True, is_cpu=lambda: False,
                                                                     device_name="H100"))
    monkeypatch.setattr(compat, "expose_prompt_lengths", lambda: True)
    stock = "vllm.v1.attention.backends.flash_attn.FlashAttentionBackend"
    for spec in ("snapkv(budget=25%)+int4", "snapkv(budget=25%)", "knorm(budget=50%)+pyramid", "streaming+int8"):
        SELECTED["spec"] = spec
        chosen = adapter._pick_backend(stock)  # with codec none too: eviction is ours
        assert chosen == f"{adapter.CUDA_BACKEND}__{_backend(cb, spec).engine.token()}"
        config = _config(spec)
        config.cache_config.enable_prefix_caching = config.scheduler_config.enable_chunked_prefill = True
        adapter._check_engine(config, resolve(spec))  # turns prefix caching off, then the CUDA checks pass
        assert not config.cache_config.enable_prefix_caching and config.scheduler_config.enable_chunked_prefill
        builder = cb.KVPlugCudaMetadataBuilder
        assert builder.get_cudagraph_support(config, None) == cb.AttentionCGSupport.NEVER  # compaction is eager
        config.scheduler_config.enable_chunked_prefill = False
        assert builder.get_cudagraph_support(config, None) == cb.AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    spec = "h2o(budget=64)+int4"  # replaces while generating: full decode graphs as well without chunked prefill
    SELECTED["spec"] = spec
    config = _config(spec)
    config.scheduler_config.enable_chunked_prefill = False
    config.compilation_config.cudagraph_num_of_warmups = 0
    adapter._check_engine(config, resolve(spec))
    assert cb.KVPlugCudaMetadataBuilder.get_cudagraph_support(config, None) == cb.AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    assert config.compilation_config.cudagraph_num_of_warmups == 1  # the V1 runner's capture: an eager step first
    from kvplug.adapters.vllm.eviction import largest_front
    assert largest_front(resolve("h2o(budget=25%)"), 1000) == 250  # the replace step's width in a graph
    config.scheduler_config.enable_chunked_prefill = True
    assert cb.KVPlugCudaMetadataBuilder.get_cudagraph_support(config, None) == cb.AttentionCGSupport.NEVER


def _hf_layers(strategy, prompts, q, k, v):
    """The HF adapter's layer (index 1) of each request, fed its prompt's K/V and queries."""
    from kvplug.adapters.hf.layer import KVPlugLayer

    layers = []
    for r, p in enumerate(prompts):
        ours = KVPlugLayer(strategy, 1, LAYERS)
        ours.update(k[r][None, :p].transpose(1, 2), v[r][None, :p].transpose(1, 2))
        ours.compress_prompt(q[r][None, :p].transpose(1, 2), torch.ones(1, p, dtype=torch.bool), D ** -0.5)
        layers.append(ours)
    return layers


def _two_requests(cb, impl, builder, layer, nb, blocks, prompts, steps, gen):
    """A poisoned cache, two requests' block tables of ``blocks`` shuffled blocks, their queries,
    keys and values (prompt + ``steps``), and ``run(pieces, ctx)``: one step of (request, token
    range) pieces, one-token rows first, through ``impl.forward``; the output rows in order."""
    kv_cache = torch.randint(0, 256, (nb, HKV, BS, cb.token_bytes(impl.layout)), dtype=torch.uint8, generator=gen)
    tables = torch.randperm(nb, generator=gen)[:2 * blocks].view(2, blocks).int()
    total = [p + steps for p in prompts]
    q = [torch.randn(t, HKV * G, D, generator=gen).half() for t in total]
    k = [torch.randn(t, HKV, D, generator=gen).half() for t in total]
    v = [torch.randn(t, HKV, D, generator=gen).half() for t in total]
    lens = torch.tensor(prompts)

    def run(pieces, ctx):
        rows = [r for r, _ in pieces]
        slots = torch.cat([tables[r, torch.arange(a, b) // BS].long() * BS + torch.arange(a, b) % BS for r, (a, b) in pieces])
        md = builder.build(0, _common([b - a for _, (a, b) in pieces], ctx, slots, tables[rows]))
        builder.held.fill_(-12345)  # stale rows: the step's own must be written
        md.attach_prompt_lens(lens[rows])
        cat = lambda xs: torch.cat([x[r][a:b] for x, (r, (a, b)) in ((xs, p) for p in pieces)])  # noqa: E731
        out = torch.full((len(slots), HKV * G, D), float("nan"), dtype=torch.float16)
        impl.forward(layer, cat(q), cat(k), cat(v), kv_cache, md, output=out)
        return out

    return kv_cache, tables, q, k, v, run


@pytest.mark.parametrize("spec,mode", [("snapkv(budget=24, window=8)+int4", "uncompressed"),
                                       ("snapkv(budget=24, window=8)+int4", "compressed"),
                                       ("knorm(budget=40%)+pyramid(beta=4)", "uncompressed"),
                                       ("knorm(budget=40%)+pyramid(beta=4)", "compressed"),
                                       ("snapkv(budget=30, window=8)", "compressed"),
                                       ("keydiff(budget=30)+int4", "compressed"),
                                       ("lagkv(budget=30, n_sink=2, lag=8)+int8", "compressed"),
                                       ("curdkv(budget=30, local_window=8)+int8", "compressed"),
                                       ("cake(budget=30, window=8, layers=false)+int8", "compressed"),
                                       ("streaming(sinks=3, window=20)+int8", "uncompressed"),
                                       ("streaming(sinks=3, window=20)+int8", "compressed"),
                                       ("snapkv(budget=24, window=8)+mixed(rotate=true)", "compressed")])
def test_forward_with_eviction_reads_the_kept_tokens_only(cb, spec, mode, gen):
    """Two prompts, then decode steps: every decode output equals float64 attention over the
    tokens the strategy keeps (its own selection on the prompt's K/V and last queries; streaming's
    window sliding on) and the generated ones, as stored (encoded, decoded), while the blocks the
    scheduler frees are poisoned; the builder's held buffer is what the decode kernel reads.
    ``uncompressed``: both prompts in one step, selected on their raw K/V. ``compressed``: in
    chunks (vLLM's chunked prefill): the second prompt's last chunk is one token (a row the
    decode kernel serves), the first's 40 tokens after 30, the window across the boundary; the
    selection reads the prompt as the pages hold it."""
    from kvplug.adapters.vllm.eviction import freed_blocks
    from kvplug.config import resolve
    from kvplug.scorers.base import ScoreInputs

    strategy = resolve(spec)
    SELECTED["extra"] = {"kvplug_prefill": mode}
    impl = _impl(cb, spec)
    builder = cb.KVPlugCudaMetadataBuilder(None, ["model.layers.1.self_attn.attn"], _config(spec), torch.device("cpu"))
    layer = SimpleNamespace(layer_name="model.layers.1.self_attn.attn")
    assert _backend(cb, spec).engine.evicting == (str(strategy), LAYERS)
    nb, prompts, steps = 24, [70, 45], 20
    kv_cache, tables, q, k, v, run = _two_requests(cb, impl, builder, layer, nb, 8, prompts, steps, gen)

    codec = strategy.codec

    def stored(x, role, dtype=torch.float64):
        return codec.decode(codec.encode(x.float(), role), role, dtype)

    if mode == "uncompressed":
        out = run([(0, (0, prompts[0])), (1, (0, prompts[1]))], [0, 0])
        assert not out.isnan().any()
    else:
        assert not run([(0, (0, 30)), (1, (0, prompts[1] - 1))], [0, 0]).isnan().any()
        assert not run([(1, (prompts[1] - 1, prompts[1])), (0, (30, prompts[0]))], [prompts[1] - 1, 30]).isnan().any()
    # what the strategy keeps of each prompt in this layer (index 1), per KV head
    kept = []
    for r, p in enumerate(prompts):
        window = min(strategy.scorer.observation_window, p)
        seen_k = k[r][:p] if mode == "uncompressed" else stored(k[r][:p], "key", torch.float16)
        seen_v = v[r][:p] if mode == "uncompressed" else stored(v[r][:p], "value", torch.float16)
        inputs = ScoreInputs(keys=seen_k[None].transpose(1, 2).float(), values=seen_v[None].transpose(1, 2).float(),
                             queries=q[r][None, p - window:p].transpose(1, 2).float(),
                             valid=torch.ones(1, p, dtype=torch.bool), scale=D ** -0.5, layer_idx=1, num_layers=LAYERS)
        kept.append(strategy.select(inputs).indices[0])

    for step in range(steps):
        for r, p in enumerate(prompts):  # what the scheduler frees before this step: another request's now
            for a, b in freed_blocks(strategy, p, p + step, BS, LAYERS):
                kv_cache[tables[r, a:b].long()] = 255  # NaN scales / values
        n = [p + step for p in prompts]
        out = run([(0, (n[0], n[0] + 1)), (1, (n[1], n[1] + 1))], n)
        for r, p in enumerate(prompts):
            for h in range(HKV):
                pos = torch.cat([kept[r][h], torch.arange(p, n[r] + 1)])
                if strategy.scorer.evicts_on_decode:  # streaming: sinks and the last `window` tokens
                    sinks, window = strategy.scorer.sinks, strategy.scorer.window.resolve(p)
                    pos = pos[(pos < sinks) | (pos > n[r] - window)]
                keys, values = stored(k[r][pos, h], "key"), stored(v[r][pos, h], "value")
                qh = q[r][n[r], h * G:(h + 1) * G].double()
                ref = torch.softmax(qh @ keys.T * D ** -0.5, -1) @ values
                got = out[r, h * G:(h + 1) * G].double()
                assert (got - ref).norm() / ref.norm() < 1e-2, (spec, step, r, h)


@pytest.mark.parametrize("prompts", [(60, 40), (60, 12)], ids=["both-full", "one-grows"])
@pytest.mark.parametrize("spec", ["h2o(budget=24, recent_ratio=0.25)+int8", "tova(budget=20)+int4"])
def test_replacing_eviction_decodes_what_the_hf_adapters_layer_holds(cb, spec, prompts, gen):
    """h2o / tova on the CUDA backend (no graphs; the replace step of all decode rows at once):
    two prompts (a 12-token one grows to the budget, then replaces), then 16 decode steps; every
    decode output equals the HF adapter's layer fed the same queries, keys and values (its own
    codec store, its own replace rule), within fp16."""
    from kvplug.config import resolve

    strategy = resolve(spec)
    SELECTED["extra"] = {"kvplug_prefill": "uncompressed"}
    impl = _impl(cb, spec)
    config = _config(spec)
    config.scheduler_config.enable_chunked_prefill = True  # no graphs: the replace step's width follows the batch
    builder = cb.KVPlugCudaMetadataBuilder(None, ["model.layers.1.self_attn.attn"], config, torch.device("cpu"))
    assert builder.fixed_width == 0
    layer = SimpleNamespace(layer_name="model.layers.1.self_attn.attn")
    nb, prompts, steps = 24, list(prompts), 16
    kv_cache, tables, q, k, v, run = _two_requests(cb, impl, builder, layer, nb, 6, prompts, steps, gen)

    assert not run([(0, (0, prompts[0])), (1, (0, prompts[1]))], [0, 0]).isnan().any()
    hf = _hf_layers(strategy, prompts, q, k, v)
    for step in range(steps):
        n = [p + step for p in prompts]
        out = run([(0, (n[0], n[0] + 1)), (1, (n[1], n[1] + 1))], n)
        for r in range(2):
            hf[r].update(k[r][None, n[r]:n[r] + 1].transpose(1, 2), v[r][None, n[r]:n[r] + 1].transpose(1, 2))
            ref = hf[r].attend(q[r][None, n[r]:n[r] + 1].transpose(1, 2), D ** -0.5)[0, 0].double()
            assert (out[r].double() - ref).norm() / ref.norm() < 1e-2, (spec, step, r)


@pytest.mark.parametrize("spec", ["h2o(budget=8, recent_ratio=0.25)+int8", "tova(budget=6)+int4"])
def test_replacing_decodes_as_a_cuda_graph_replays_them(cb, spec, gen):
    """The replace step as a full CUDA graph runs it: no chunked prefill (so graphs are on and the
    width is fixed, here wider than any row needs), no Python after the kernels (no compaction
    for a prompt row), and two padding rows of length 0 (block 0, vLLM's null block; stale held
    spans). Three requests: prompts of 60 and 12 tokens (eager prefill), and one of a single
    token that first comes as a one-token row of such a step, its running state started there.
    Every decode output equals the HF adapter's layer fed the same inputs; the padding rows
    change no byte outside block 0, and the requests' blocks hold their codes only."""
    from kvplug.adapters.vllm.eviction import largest_front
    from kvplug.config import resolve

    strategy = resolve(spec)
    SELECTED["extra"] = {"kvplug_prefill": "uncompressed"}
    impl = _impl(cb, spec)
    config = _config(spec)
    assert cb.KVPlugCudaMetadataBuilder.get_cudagraph_support(config, None).name == "UNIFORM_SINGLE_TOKEN_DECODE"
    builder = cb.KVPlugCudaMetadataBuilder(None, ["model.layers.1.self_attn.attn"], config, torch.device("cpu"))
    assert builder.fixed_width == largest_front(strategy, 256) == strategy.scorer.kept_tokens(1)
    builder.fixed_width += 9  # as a longer max_model_len would have it
    layer = SimpleNamespace(layer_name="model.layers.1.self_attn.attn")
    nb, prompts, steps, blocks = 24, [60, 12, 1], 16, 6
    kv_cache = torch.randint(0, 256, (nb, HKV, BS, cb.token_bytes(impl.layout)), dtype=torch.uint8, generator=gen)
    tables = (torch.randperm(nb - 1, generator=gen)[:3 * blocks] + 1).view(3, blocks).int()  # block 0: vLLM's null
    q = [torch.randn(p + steps, HKV * G, D, generator=gen).half() for p in prompts]
    k = [torch.randn(p + steps, HKV, D, generator=gen).half() for p in prompts]
    v = [torch.randn(p + steps, HKV, D, generator=gen).half() for p in prompts]
    lens = torch.tensor(prompts)
    pad = 2

    def step(pieces, ctx, graph):
        rows = [r for r, _ in pieces]
        slots = torch.cat([tables[r, torch.arange(a, b) // BS].long() * BS + torch.arange(a, b) % BS
                           for r, (a, b) in pieces] + ([torch.full((pad,), -1)] if graph else []))
        qlens = [b - a for _, (a, b) in pieces] + [1] * (pad if graph else 0)
        table = torch.cat([tables[rows], torch.zeros(pad if graph else 0, blocks, dtype=torch.int32)])
        md = builder.build(0, _common(qlens, ctx + [-1] * (pad if graph else 0), slots, table))
        builder.held.fill_(-12345)
        builder.held[:, len(rows):] = torch.tensor([3, 17, 0], dtype=torch.int32)  # stale spans of padding rows
        md.attach_prompt_lens(lens[rows])
        if graph:
            md.prompt_decode_rows = ()  # a replayed graph runs no Python after the kernels
        cat = lambda xs: torch.cat([xs[r][a:b] for r, (a, b) in pieces] + (  # noqa: E731
            [torch.zeros(pad, *xs[0].shape[1:], dtype=torch.float16)] if graph else []))
        out = torch.full((len(slots), HKV * G, D), float("nan"), dtype=torch.float16)
        impl.forward(layer, cat(q), cat(k), cat(v), kv_cache, md, output=out)
        return out[:len(rows)]

    assert not step([(0, (0, prompts[0])), (1, (0, prompts[1]))], [0, 0], graph=False).isnan().any()
    hf = _hf_layers(strategy, prompts, q, k, v)
    outside = torch.ones(nb, dtype=torch.bool)
    outside[tables.flatten().long()] = outside[0] = False
    before = kv_cache[outside].clone()
    for t in range(steps):
        n = [p + t for p in prompts]
        n[2] -= 1  # the one-token prompt comes in the first step
        out = step([(r, (n[r], n[r] + 1)) for r in range(3)], n, graph=True)
        for r in range(3):
            if r == 2 and t == 0:
                continue  # its prompt: HF attends over the raw token, the backend over its codes
            hf[r].update(k[r][None, n[r]:n[r] + 1].transpose(1, 2), v[r][None, n[r]:n[r] + 1].transpose(1, 2))
            ref = hf[r].attend(q[r][None, n[r]:n[r] + 1].transpose(1, 2), D ** -0.5)[0, 0].double()
            assert (out[r].double() - ref).norm() / ref.norm() < 1e-2, (spec, t, r)
    assert torch.equal(kv_cache[outside], before)


def test_model_runner_hook_fills_the_held_spans_of_each_group_once(cb, monkeypatch, gen):
    """compat.expose_prompt_lengths wraps vLLM's V1 ``GPUModelRunner._build_attention_metadata``:
    each metadata object (shared by a group's layers) gets the batch's prompt lengths once; kvplug's
    CUDA metadata writes its decode rows' held spans into the builder's buffer, a CPU-style one
    gets the attribute."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from kvplug.adapters.vllm import compat
    from kvplug.adapters.vllm.eviction import held_spans
    from kvplug.config import resolve

    spec = "snapkv(budget=24, window=8)+pyramid(beta=4)"
    _impl(cb, spec)
    builder = cb.KVPlugCudaMetadataBuilder(None, ["model.layers.0.self_attn.attn"], _config(spec), torch.device("cpu"))
    md = builder.build(0, _common([1, 1, 30], [60, 90, 0], torch.arange(32), torch.zeros(3, 8, dtype=torch.int32)))
    other = SimpleNamespace()
    calls = []
    original = md.attach_prompt_lens
    md.attach_prompt_lens = lambda lens: calls.append(lens) or original(lens)

    def build(self, *args, **kwargs):
        return {"model.layers.0.self_attn.attn": md, "model.layers.1.self_attn.attn": md, "cpu.layer": other}, None

    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner

    monkeypatch.setattr(GPUModelRunner, "_build_attention_metadata", build)
    monkeypatch.setattr(V2Runner, "prepare_inputs", V2Runner.prepare_inputs)  # restored after the test
    assert compat.expose_prompt_lengths()
    runner = SimpleNamespace(input_batch=SimpleNamespace(num_reqs=3, num_prompt_tokens_cpu_tensor=torch.tensor(
        [50, 80, 30, 999])))
    builder.held.fill_(-1)
    GPUModelRunner._build_attention_metadata(runner)
    assert len(calls) == 1 and calls[0].tolist() == [50, 80, 30]
    assert getattr(other, compat.PROMPT_LENS).tolist() == [50, 80, 30]
    assert torch.equal(builder.held[:, :2], held_spans(resolve(spec), torch.tensor([50, 80]), LAYERS))  # the 2 decode rows
    assert (builder.held[:, 2:] == -1).all()  # the prefill row: not a decode row


def test_v2_model_runner_hook_hands_prompt_lengths_to_the_builder(cb, monkeypatch):
    """compat wraps the V2 runner's ``prepare_inputs``: the batch's ``prompt_lens`` (None unless
    R-SWA) become each request's prompt length (``req_states.prompt_len``, host), which vLLM passes
    to builders as ``rswa_prefix_lens``; kvplug's builder fills the decode rows' held spans from it."""
    import numpy as np
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from kvplug.adapters.vllm import compat
    from kvplug.adapters.vllm.eviction import held_spans
    from kvplug.config import resolve

    batch = SimpleNamespace(prompt_lens=None, idx_mapping_np=np.array([2, 0, 1, 3]), num_reqs=3)
    monkeypatch.setattr(V2Runner, "prepare_inputs", lambda self, *a, **k: batch)
    monkeypatch.setattr(GPUModelRunner, "_build_attention_metadata", GPUModelRunner._build_attention_metadata)
    assert compat.expose_prompt_lengths()
    runner = SimpleNamespace(req_states=SimpleNamespace(prompt_len=SimpleNamespace(
        np=np.array([30, 50, 80, 7], dtype=np.int32))))
    assert V2Runner.prepare_inputs(runner) is batch and batch.prompt_lens.tolist() == [80, 30, 50]
    spec = "snapkv(budget=24, window=8)+pyramid(beta=4)"
    _impl(cb, spec)
    builder = cb.KVPlugCudaMetadataBuilder(None, ["model.layers.0.self_attn.attn"], _config(spec), torch.device("cpu"))
    builder.held.fill_(-1)
    common = _common([1, 1, 30], [90, 40, 0], torch.arange(32), torch.zeros(3, 8, dtype=torch.int32))
    common.rswa_prefix_lens = batch.prompt_lens
    md = builder.build(0, common)
    assert md.prompt_lens.tolist() == [80, 30, 50]
    # both decode rows are past their prompts (91 > 80 and 41 > 30 tokens): their spans come from the lengths
    assert torch.equal(builder.held[:, :2], held_spans(resolve(spec), torch.tensor([80, 30]), LAYERS))
    assert (builder.held[:, 2:] == -1).all()
