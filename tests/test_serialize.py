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
    ("none", False), ("int4", False), ("mixed", False), ("kivi(bits=2, residual=16, group=16)", False),
    ("snapkv(budget=50%)+int4", False), ("h2o(budget=30)+int8", False), ("streaming(sinks=2, window=20)", False),
    ("int4", True), ("tova(budget=30)+mixed(rotate=true)", True), ("none", True),
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
