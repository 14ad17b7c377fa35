"""A compressed cache as bytes and back (``kvplug.serialize``, ``KVPlugCache.to_bytes``,
``kvplug.hf.load``): a loaded cache continues exactly as the live one; anything that is not a
kvplug blob made for this model is refused in one line, and nothing in a blob can run."""

import os
import pickle

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvplug.hf
from kvplug import serialize
from kvplug.errors import SpecError


def tiny(seed: int, head_dim: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=8 * head_dim, intermediate_size=256, num_hidden_layers=3,
                                        num_attention_heads=8, num_key_value_heads=2, head_dim=head_dim,
                                        vocab_size=300)).eval()


def steps(model, cache, token, mask, n):
    """Logits ``[n, B, V]`` of ``n`` greedy steps from ``token`` ``[B, 1]``."""
    out = []
    for _ in range(n):
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        logits = model(input_ids=token, attention_mask=mask, past_key_values=cache).logits[:, -1]
        out.append(logits)
        token = logits.argmax(-1, keepdim=True)
    return torch.stack(out)


def prompt_cache(model, spec, paged, gen):
    ids = torch.randint(0, 300, (2, 60), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    cache = kvplug.hf.cache(model, spec, paged=paged)
    logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits[:, -1]
    return cache, logits.argmax(-1, keepdim=True), mask


@pytest.mark.parametrize("spec, paged", [
    ("none", False), ("int4", False), ("mixed", False), ("kivi(bits=2, residual=16, group=16)", False), ("int4(residual=16)", False),
    ("snapkv(budget=50%)+int4", False), ("h2o(budget=30)+int8", False), ("streaming(sinks=2, window=20)", False),
    ("int4", True), ("tova(budget=30)+mixed(rotate=true)", True), ("none", True), ("int4(residual=16)", True),
])
@torch.no_grad()
def test_a_loaded_cache_continues_exactly_as_the_live_one(spec, paged, gen, tmp_path):
    """Save after a prompt and two steps; the live cache and the one loaded from the file then
    give identical logits for 20 more steps (the same arithmetic on the same bytes; kivi flushes a
    group and the evicting scorers replace slots within them)."""
    model = tiny(int(torch.randint(0, 2**31, (1,), generator=gen)))
    if paged:
        model = model.to(torch.bfloat16)
    cache, token, mask = prompt_cache(model, spec, paged, gen)
    first = steps(model, cache, token, mask, 2)
    token, mask = first[-1].argmax(-1, keepdim=True), torch.cat([mask, torch.ones(2, 2, dtype=mask.dtype)], 1)
    path = tmp_path / "prefix.kvplug"
    cache.save(path, model)
    loaded = kvplug.hf.load(model, path)
    assert loaded.get_seq_length() == cache.get_seq_length() and loaded.kept_tokens() == cache.kept_tokens()
    want, got = steps(model, cache, token, mask, 20), steps(model, loaded, token, mask, 20)
    assert torch.equal(got, want), (got - want).abs().max()
    assert loaded.stored_bytes() == cache.stored_bytes()
    if spec == "int4" and not paged:  # the blob holds codes, not the raw prompt: about the codec's size
        assert os.path.getsize(path) < 1.3 * cache.stored_bytes() + cache.bookkeeping_bytes() + 20000


def _blob(gen, spec="int4"):
    model = tiny(0)
    cache, _, _ = prompt_cache(model, spec, False, gen)
    return model, cache.to_bytes(model)


class _Boom:
    def __reduce__(self):
        return (open, ("/tmp/kvplug_pickle_ran", "w"))


def test_a_pickle_is_refused_without_running(gen):
    model, _ = _blob(gen)
    marker = "/tmp/kvplug_pickle_ran"
    if os.path.exists(marker):
        os.remove(marker)
    for payload in (pickle.dumps(_Boom()), pickle.dumps({"layer0.counts": _Boom()})):
        with pytest.raises(SpecError, match="kvplug KV blob") as e:
            kvplug.hf.load(model, payload)
        assert "\n" not in str(e.value)
    assert not os.path.exists(marker)


def test_damaged_blobs_are_refused_in_one_line(gen):
    model, blob = _blob(gen)
    flipped = bytearray(blob)
    flipped[-7] ^= 0x10  # a byte of the last tensor's data
    for bad, message in ((blob[:-40], "kvplug KV blob"), (bytes(flipped), "damaged"), (blob[:5], "shorter"),
                         (b"x" * 64, "kvplug KV blob")):
        with pytest.raises(SpecError, match=message) as e:
            kvplug.hf.load(model, bad)
        assert "\n" not in str(e.value)


def test_a_blob_for_another_model_or_version_is_refused(gen, monkeypatch):
    model, blob = _blob(gen)
    with pytest.raises(SpecError, match="made for head_dim=32, this cache has 64"):
        kvplug.hf.load(tiny(0, head_dim=64), blob)
    with pytest.raises(SpecError, match="made for dtype='torch.float32'"):
        kvplug.hf.load(tiny(0).to(torch.bfloat16), blob)
    monkeypatch.setattr(serialize, "VERSION", 2)
    newer = serialize.dumps({"x": torch.zeros(2)}, {}, {})
    monkeypatch.setattr(serialize, "VERSION", 1)
    with pytest.raises(SpecError, match="version 2 cannot be read"):
        serialize.loads(newer)


def test_what_cannot_be_saved_is_refused(gen):
    model = tiny(0)
    with pytest.raises(SpecError, match="has not stored a prompt"):
        kvplug.hf.cache(model, "int4").to_bytes(model)
    cache, _, _ = prompt_cache(model, "infinigen(budget=50%)", False, gen)
    with pytest.raises(SpecError, match="infinigen is not supported yet"):
        cache.to_bytes(model)


def test_cachegen_decodes_within_its_bound(gen):
    """CacheGen's round trip on K/V with token-wise locality (a random walk) and on plain noise:
    every decoded value within the stated bound of the original (checked in float64), in every
    layer band, with and without anchors groups; the stream is bytes of uint32 words."""
    pytest.importorskip("constriction")
    from kvplug.cachegen import CacheGen

    walk = torch.randn(2, 3, 97, 64, generator=gen).cumsum(2) * 0.1 + torch.randn(1, 1, 1, 64, generator=gen) * 3
    noise = torch.randn(1, 2, 41, 32, generator=gen) * torch.logspace(-2, 1, 32)
    for x in (walk, noise):
        for coder in (CacheGen(), CacheGen(bits=6, deep_bits=3, group=4), CacheGen(group=1)):
            for layer in (0, 5):
                enc = coder.encode(x, layer, 6)
                back = coder.decode(enc, layer, 6)
                assert back.shape == x.shape and back.dtype == torch.float32
                err = (back.double() - x.double()).abs().amax(dim=(0, 1, 2))
                assert bool((err <= coder.bound(enc)).all()), (coder, layer, float((err - coder.bound(enc)).max()))
    with pytest.raises(SpecError, match="deep_bits=1 is out of range"):
        CacheGen(deep_bits=1)


@torch.no_grad()
def test_cachegen_blob_is_smaller_than_int8_and_continues_close():
    """On the reference model's real K/V (a 512-token prompt of its held-out text): the CacheGen
    blob of a full-precision cache is smaller than the int8 cache's blob, and the cache loaded
    from it continues with nearly the live cache's next-token distributions."""
    pytest.importorskip("constriction")
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvplug.cachegen import CacheGen
    from kvplug.retrieval import load_heldout_ids

    path = Path(__file__).resolve().parents[1] / "models" / "kvplug-ref"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([load_heldout_ids(str(path), AutoTokenizer.from_pretrained(path))[3000:3000 + 520]])
    sizes, logits = {}, {}
    for spec in ("none", "int8"):
        cache = kvplug.hf.cache(model, spec, paged=False)
        model(input_ids=ids[:, :512], past_key_values=cache)
        sizes[spec] = len(cache.to_bytes(model))
        if spec == "none":
            blob = cache.to_bytes(model, CacheGen())
            loaded = kvplug.hf.load(model, blob)
            for name, c in (("live", cache), ("cachegen", loaded)):
                logits[name] = torch.cat([model(input_ids=ids[:, 512 + t:513 + t], past_key_values=c).logits[:, -1]
                                          for t in range(8)])
    assert len(blob) < sizes["int8"] < sizes["none"], (len(blob), sizes)
    p, q = logits["live"].log_softmax(-1), logits["cachegen"].log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    assert float(kl.max()) < 0.05, kl
    with pytest.raises(SpecError, match="cachegen encodes full-precision K/V"):
        cache.to_bytes(model, CacheGen())  # the int8 cache


@pytest.mark.parametrize("spec", ["none", "int8"])
@torch.no_grad()
def test_a_document_store_hit_computes_what_a_cold_run_computes(spec, gen, tmp_path):
    """RAGCache-style reuse: after [A, B] + q1, the prompt [A, B] + q2 loads the [A, B] node and
    computes only q2, with exactly the logits of a cold store; [A, C] reuses [A]. With codec
    none the reused path also matches one plain forward of the whole prompt (float rounding)."""
    model = tiny(int(torch.randint(0, 2**31, (1,), generator=gen)))
    doc = {n: torch.randint(0, 300, (30,), generator=gen).tolist() for n in "ABC"}
    q1, q2 = torch.randint(0, 300, (5,), generator=gen).tolist(), torch.randint(0, 300, (6,), generator=gen).tolist()
    store = kvplug.hf.DocumentStore(model, spec, disk=tmp_path)
    store.prefill([doc["A"], doc["B"]], q1)
    assert store.stats["misses"] == 1 and store.stats["computed_tokens"] == 65
    _, hit = store.prefill([doc["A"], doc["B"]], q2)
    assert store.stats["hits"] == 1 and store.stats["reused_tokens"] == 60 and store.stats["computed_tokens"] == 71
    _, cold = kvplug.hf.DocumentStore(model, spec).prefill([doc["A"], doc["B"]], q2)
    assert torch.equal(hit, cold)
    store.prefill([doc["A"], doc["C"]], q1)
    assert store.stats["hits"] == 2 and store.stats["reused_tokens"] == 90  # [A] reused
    if spec == "none":
        whole = torch.tensor([doc["A"] + doc["B"] + q2])
        plain = model(input_ids=whole).logits[:, -1]
        assert torch.allclose(hit, plain, atol=1e-4), (hit - plain).abs().max()


@torch.no_grad()
def test_a_document_store_keeps_its_memory_budget_and_spills_to_disk(gen, tmp_path):
    model = tiny(0)
    docs = [torch.randint(0, 300, (20,), generator=gen).tolist() for _ in range(4)]
    q = [1, 2, 3]
    probe = kvplug.hf.DocumentStore(model, "int4")
    probe.prefill([docs[0]], q)
    one = probe.memory_used()
    for policy in ("pgdsf", "lru"):
        store = kvplug.hf.DocumentStore(model, "int4", memory_bytes=int(2.5 * one), disk=tmp_path / policy,
                                        policy=policy)
        for d in docs:
            store.prefill([d], q)
        assert store.memory_used() <= 2.5 * one and store.stats["to_disk"] == 2
        _, again = store.prefill([docs[0]], q)  # from disk
        assert store.stats["hits"] == 1
        _, cold = kvplug.hf.DocumentStore(model, "int4").prefill([docs[0]], q)
        assert torch.equal(again, cold)
    with pytest.raises(SpecError, match="keeps codecs only"):
        kvplug.hf.DocumentStore(model, "snapkv(budget=50%)+int4")


@torch.no_grad()
def test_a_document_blob_damaged_on_disk_is_refused(gen, tmp_path):
    """Blobs kept in memory are loaded without their checksum; one read back from disk is checked."""
    model = tiny(0)
    docs = [torch.randint(0, 300, (20,), generator=gen).tolist() for _ in range(2)]
    probe = kvplug.hf.DocumentStore(model, "int8")
    probe.prefill([docs[0]], [1, 2])
    store = kvplug.hf.DocumentStore(model, "int8", memory_bytes=int(1.5 * probe.memory_used()), disk=tmp_path)
    store.prefill([docs[0]], [1, 2])
    store.prefill([docs[1]], [1, 2])  # one of the two nodes goes to disk
    (node,) = [n for n in store._nodes() if n.blob is None]
    data = bytearray(node.path.read_bytes())
    data[-5] ^= 0x01
    node.path.write_bytes(bytes(data))
    with pytest.raises(SpecError, match="damaged"):
        store.prefill([list(node.key)], [1, 2])
