"""The HF adapter inside generate(): exactness, eviction, core/adapter parity, memory."""

import math

import pytest
import torch
from transformers import (AttentionInterface, DynamicCache, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,
                          GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

import kvplug.hf
from conftest import naive_affine, write_random_weights
from kvplug import SpecError, parse
from kvplug.codecs.base import PagedFormat
from kvplug.learned import LearnedPart
from kvplug.scorers.base import ScoreInputs

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=1024)


def tiny(kind="llama", seed=0, head_dim=32):
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2, head_dim=head_dim))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**SMALL, num_key_value_heads=2, head_dim=32, sliding_window=None))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL, num_key_value_heads=1))
    elif kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=32))
    else:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**SMALL))
    model.generation_config.eos_token_id = None  # random weights: never stop early on an "EOS"
    return model.eval()


def prompts(gen, batch=2, length=48, pad=7):
    ids = torch.randint(0, 96, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1:, :pad] = 0  # left padding
    return ids, mask


def greedy(model, ids, mask, steps=24, cache=None):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                          past_key_values=cache, pad_token_id=0)


def assert_same_greedy(model, ids, mask, cache, steps=24, tie=1e-4):
    """Greedy tokens with ``cache`` equal plain transformers' token for token, except where plain's
    two best logits are a numerical tie (|gap| < ``tie``): from there on the runs may diverge."""
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                           past_key_values=DynamicCache(config=model.config), pad_token_id=0,
                           output_logits=True, return_dict_in_generate=True)
    ours = greedy(model, ids, mask, steps, cache)
    new = plain.sequences[:, ids.shape[1]:], ours[:, ids.shape[1]:]
    for b in range(ids.shape[0]):
        for t in range(steps):
            if new[0][b, t] != new[1][b, t]:
                top2 = plain.logits[t][b].float().topk(2).values
                assert top2[0] - top2[1] < tie, f"row {b} step {t}: not a tie ({top2.tolist()})"
                break


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gpt_neox"])
def test_none_equals_plain_transformers(kind, gen):
    model = tiny(kind)
    ids, mask = prompts(gen)
    assert_same_greedy(model, ids, mask, kvplug.hf.cache(model, "none"))


def test_streaming_short_prompt_is_uncompressed_and_long_keeps_sinks_and_window(gen):
    model = tiny()
    ids, mask = prompts(gen, length=20, pad=3)
    assert_same_greedy(model, ids, mask, kvplug.hf.cache(model, "streaming(sinks=4, window=40)"), steps=8)
    ids, mask = prompts(gen, length=60, pad=9)
    cache = kvplug.hf.cache(model, "streaming(sinks=4, window=12)")
    model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    for layer in cache.layers:
        for b, n in enumerate(mask.sum(-1).tolist()):
            for h in range(2):
                kept = sorted(p for p in layer.slots.positions[b, h].tolist() if p >= 0)
                assert kept == list(range(4)) + list(range(n - 12, n))
    # while generating, the footprint stays at sinks + window and the newest tokens are kept
    cache = kvplug.hf.cache(model, "streaming(sinks=4, window=12)")
    out = greedy(model, ids, mask, steps=10, cache=cache)
    for layer in cache.layers:
        for b, n in enumerate(mask.sum(-1).tolist()):
            kept = sorted(p for p in layer.slots.positions[b, 0].tolist() if p >= 0)
            assert kept == list(range(4)) + list(range(n + 9 - 12, n + 9))
    assert out.shape[1] == 70


@pytest.mark.parametrize("length", [12, 60])
def test_h2o_keeps_its_recent_tokens_while_generating(length, gen):
    """The recent share of the budget is protected whatever the store's width (a prompt shorter
    than the budget grows the store beyond it): the newest floor(budget * ratio) stay held."""
    model = tiny()
    ids, mask = prompts(gen, length=length, pad=3)
    cache = kvplug.hf.cache(model, "h2o(budget=16, recent_ratio=0.25)")
    greedy(model, ids, mask, steps=30, cache=cache)
    for layer in cache.layers:
        assert layer.slots.capacity > 16 or length > 16  # the short prompt's store did grow
        for b, n in enumerate(mask.sum(-1).tolist()):
            for h in range(2):
                held = {p for p in layer.slots.positions[b, h].tolist() if p >= 0}
                newest = n + 29  # 29 generated tokens were fed back
                assert len(held) == 16 and set(range(newest - 4, newest)) <= held


class Recorder:
    """An attention function that records each layer's prompt queries/keys/values."""

    def __init__(self):
        self.calls = {}

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        self.calls[module.layer_idx] = (query, key, value, attention_mask)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@pytest.mark.parametrize("spec", ["snapkv(budget=13, window=5)", "h2o(budget=25%)", "tova(budget=11)",
                                  "knorm(budget=9)", "random(budget=10, seed=4)", "streaming(sinks=3, window=8)",
                                  "snapkv(budget=12, window=4)+pyramid(beta=3)", "snapkv(budget=10, window=4)+adakv",
                                  "simlayerkv(threshold=0.3, sinks=2, window=8, obs=4)"])
def test_kept_tokens_match_core_scorer(spec, gen):
    model = tiny()
    ids, mask = prompts(gen, length=40, pad=5)
    recorder = Recorder()
    AttentionInterface.register("kvplug_test_recorder", recorder)
    AttentionMaskInterface.register("kvplug_test_recorder", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation("kvplug_test_recorder")
    model(input_ids=ids, attention_mask=mask)
    cache = kvplug.hf.cache(model, spec)
    model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    strategy = parse(spec)
    for idx, layer in enumerate(cache.layers):
        query, key, value, attn_mask = recorder.calls[idx]
        valid = mask.bool()
        w = 40 if strategy.scorer.needs_all_queries else min(strategy.scorer.observation_window, 40)
        inputs = ScoreInputs(keys=key, values=value, queries=query[:, :, 40 - w:], valid=valid,
                             scale=32**-0.5, layer_idx=idx, num_layers=2)
        sel = strategy.select(inputs)
        for b in range(2):
            for h in range(2):
                core = sorted(inputs.positions[b, sel.indices[b, h, :sel.counts[b, h]]].tolist())
                adapter = sorted(p for p in layer.slots.positions[b, h].tolist() if p >= 0)
                assert adapter == core


def test_int8_logits_close_to_fp32_and_memory_is_exact(gen):
    model = tiny()
    ids, _ = prompts(gen, batch=1, length=64)
    steps = ids[:, 48:]
    logits = {}
    caches = {}
    for spec in ("none", "int8", "int4"):
        cache = kvplug.hf.cache(model, spec)
        model(input_ids=ids[:, :48], past_key_values=cache)
        out = [model(input_ids=steps[:, i:i + 1], past_key_values=cache).logits for i in range(16)]
        logits[spec], caches[spec] = torch.cat(out, 1), cache
    ref = logits["none"]
    rel8 = (logits["int8"] - ref).norm() / ref.norm()
    rel4 = (logits["int4"] - ref).norm() / ref.norm()
    assert rel8 < 5e-3 and rel8 < rel4
    dynamic = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=dynamic)
    dynamic_bytes = sum(l.keys.numel() * l.keys.element_size() * 2 for l in dynamic.layers)
    tokens = 2 * 2 * 64  # layers x KV heads x tokens
    for spec, cache in caches.items():
        per_token = parse(spec).bytes_per_token(32, dtype_bytes=4)
        assert cache.kept_tokens() == tokens
        assert cache.stored_bytes() == tokens * per_token
    assert caches["none"].stored_bytes() == dynamic_bytes
    assert dynamic_bytes / caches["int4"].stored_bytes() == pytest.approx(256 / (2 * (16 + 4)))


def test_kivi_keeps_residual_in_full_precision_and_quantizes_whole_groups(gen):
    model = tiny()
    ids, _ = prompts(gen, batch=1, length=50)
    cache = kvplug.hf.cache(model, "kivi(bits=2, group=8, residual=16)")
    out = greedy(model, ids, torch.ones_like(ids), steps=20, cache=cache)
    for layer in cache.layers:
        assert layer.groups.tokens % 8 == 0
        assert 16 <= int(layer.slots.counts.min()) < 16 + 8
        assert layer.groups.tokens + int(layer.slots.counts[0, 0]) == 50 + 19
    assert out.shape[1] == 70


@pytest.mark.parametrize("spec", ["int4(residual=16)", "mixed(key=4, value=4, residual=16)"])
def test_residual_window_keeps_the_newest_tokens_exact_and_the_rest_per_token(spec, gen):
    model = tiny()
    ids, _ = prompts(gen, batch=1, length=40)
    cache = kvplug.hf.cache(model, spec)
    out = greedy(model, ids, torch.ones_like(ids), steps=12, cache=cache)
    seen = 40 + 11  # the prompt and the generated tokens the cache was fed
    raw = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=out[:, :seen], past_key_values=raw)
    layer = cache.layers[0]  # layer 0's K/V do not depend on what the cache returned
    assert layer.groups.tokens == seen - 16 and int(layer.slots.counts.min()) == 16
    keys, values = layer.groups.decode()
    recent_k, recent_v, filled = layer.slots.decode()
    assert bool(filled[..., :16].all()) and not bool(filled[..., 16:].any())  # the rest: room to grow
    recent_k, recent_v = recent_k[..., :16, :], recent_v[..., :16, :]
    raw_k, raw_v = raw.layers[0].keys, raw.layers[0].values
    torch.testing.assert_close(recent_k, raw_k[..., -16:, :], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recent_v, raw_v[..., -16:, :], rtol=1e-5, atol=1e-5)
    for got, want in ((keys, raw_k[..., :-16, :]), (values, raw_v[..., :-16, :])):
        code, step, zero = naive_affine(want, 4)  # per token and head
        ref = code * step + zero
        err = (got.double() - ref).abs()
        assert bool((err <= step * 1.01).all())  # a half-way tie may round the other way: one step
        assert int((err > 1e-4).sum()) <= err.numel() // 100
        assert float((got.double() - want.double()).abs().max()) > 1e-3  # and they were quantized
    heads, d = model.config.num_key_value_heads, 32
    per_token = parse(spec).bytes_per_token(d)
    layers = model.config.num_hidden_layers
    assert cache.stored_bytes() == layers * heads * ((seen - 16) * per_token + 16 * 2 * d * 4)


@pytest.mark.parametrize("spec", ["int4(residual=16)", "mixed(key=8, value=4, rotate=true, residual=8)"])
def test_residual_window_in_the_paged_layout(spec, gen, monkeypatch):
    """In the paged layout a residual window is a tail beside the pages: after a left-padded
    prompt, 12 steps and a 4-token step, each row's N newest tokens sit in the tail exactly as
    the model made them (layer 0, against a DynamicCache run), the pages hold every token's codes
    (int4: a float64 round trip of the raw K/V), the stored bytes are the blocks plus the tail;
    and on rows without padding the logits equal the reference path's (grouped, one token at a
    time), whose window is then the same N tokens. Blocks start poisoned (all bits set)."""
    from kvplug.triton_ops import PagedLayout

    from kvplug.adapters.hf.store import read_paged

    allocate = PagedLayout.allocate
    monkeypatch.setattr(PagedLayout, "allocate", lambda self, n, device="cpu": allocate(self, n, device).view(
        torch.uint8).fill_(255).view(self.storage_dtype))
    window = parse(spec).codec.residual
    model = tiny().to(torch.bfloat16)
    ids, mask = prompts(gen, length=56, pad=7)

    def run(paged, mask):
        cache = kvplug.hf.cache(model, spec, paged=paged)
        out = [model(input_ids=ids[:, :40], attention_mask=mask[:, :40], past_key_values=cache).logits[:, -1:]]
        out += [model(input_ids=ids[:, i:i + 1], attention_mask=mask[:, :i + 1], past_key_values=cache).logits
                for i in range(40, 52)]
        out.append(model(input_ids=ids[:, 52:56], attention_mask=mask, past_key_values=cache).logits)
        return cache, torch.cat(out, 1).float()

    cache, _ = run(True, mask)
    layer = cache.layers[0]
    store = layer.slots
    assert type(store).__name__ == "PagedStore" and layer.groups is None and store.tail.n == window
    raw = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=raw)
    pads = [0, 7]
    counts = store.counts
    for r, pad in enumerate(pads):
        assert bool((counts[r] == 56 - pad).all())
        raw_k, raw_v = raw.layers[0].keys[r, :, pad:], raw.layers[0].values[r, :, pad:]   # [H, n, D]
        for j in range(56 - pad - window, 56 - pad):                                     # the N newest
            assert torch.equal(store.tail.keys[r, :, j % window], raw_k[:, j])
            assert torch.equal(store.tail.values[r, :, j % window], raw_v[:, j])
        if spec.startswith("int4"):
            k, v = read_paged(store.layout, store.cache, store.block_tables, 56, torch.float64)
            for got, want in ((k[r, :, :56 - pad], raw_k), (v[r, :, :56 - pad], raw_v)):
                code, step, zero = naive_affine(want, 4)
                err = (got - (code * step + zero)).abs()
                assert bool((err <= step * 1.01).all()) and int((err > 1e-3).sum()) <= err.numel() // 100
    per_token = parse(spec).bytes_per_token(32)
    heads, layers = model.config.num_key_value_heads, model.config.num_hidden_layers
    blocks = 2 * heads * 64 * per_token      # 56 tokens in 16-token blocks, 2 rows
    assert cache.stored_bytes() == layers * (blocks + 2 * heads * window * 32 * 2 * 2)
    full = torch.ones_like(mask)
    paged_logits = run(True, full)[1]
    ref_cache, ref_logits = run(False, full)
    assert type(ref_cache.layers[0].slots).__name__ == "SlotStore" and ref_cache.layers[0].groups is not None
    assert (paged_logits - ref_logits).norm() / ref_logits.norm() < 1e-2


def test_a_residual_window_after_prefill_eviction_in_pages_equals_the_reference_path(gen):
    """snapkv keeps 20 of each head's prompt tokens, the 8 newest kept ones stay exact: in the
    paged layout (tail beside the pages) and on the reference path (grouped one token at a
    time) the cache holds the same tokens and gives the same logits over 12 steps."""
    model = tiny().to(torch.bfloat16)
    ids, _ = prompts(gen, length=52)
    spec = "snapkv(budget=20, window=4)+int4(residual=8)"
    logits, caches = [], []
    for paged in (True, False):
        cache = kvplug.hf.cache(model, spec, paged=paged)
        out = [model(input_ids=ids[:, :40], past_key_values=cache).logits[:, -1:]]
        out += [model(input_ids=ids[:, i:i + 1], past_key_values=cache).logits for i in range(40, 52)]
        logits.append(torch.cat(out, 1).float())
        caches.append(cache)
    paged_store = caches[0].layers[0].slots
    assert type(paged_store).__name__ == "PagedStore" and bool((paged_store.counts == 20 + 12).all())
    assert caches[0].kept_tokens() == caches[1].kept_tokens() == 2 * 2 * 2 * (20 + 12)
    assert (logits[0] - logits[1]).norm() / logits[1].norm() < 1e-2


def test_a_residual_window_longer_than_the_context_is_uncompressed(gen):
    model = tiny()
    ids, mask = prompts(gen, length=30)
    steps = 8
    logits = {}
    for spec in ("none", "int4(residual=64)"):
        run = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                             past_key_values=kvplug.hf.cache(model, spec), output_logits=True,
                             return_dict_in_generate=True)
        logits[spec] = torch.stack(run.logits)
    torch.testing.assert_close(logits["int4(residual=64)"], logits["none"], rtol=1e-5, atol=1e-5)
    with pytest.raises(SpecError, match="h2o evicts while generating.*newest 16 kept in full precision"):
        kvplug.hf.cache(model, "h2o(budget=50%)+int4(residual=16)")
    assert parse("int4(residual=16)").codec.paged_format(32) == PagedFormat(4, 4, False, 16)  # a tail beside pages
    assert not parse("mixed(residual=8)").codec.per_token and parse("int4").codec.per_token


@pytest.mark.parametrize("threshold, lazy", [(0.0, True), (1.0, False)])
def test_simlayerkv_lazy_layers_stay_at_sinks_and_window_while_generating(threshold, lazy, gen):
    model = tiny()
    ids, mask = prompts(gen, length=40, pad=6)
    cache = kvplug.hf.cache(model, f"simlayerkv(threshold={threshold}, sinks=2, window=8)+int4")
    greedy(model, ids, mask, steps=12, cache=cache)
    for layer in cache.layers:
        assert (layer.scorer is not None) == lazy
        for b, n in enumerate(mask.sum(-1).tolist()):
            kept = sorted(p for p in layer.slots.positions[b, 0].tolist() if p >= 0)
            total = n + 11  # the prompt and the generated tokens the model has seen
            assert kept == (list(range(2)) + list(range(total - 8, total)) if lazy else list(range(total)))
    per_token = parse("int4").bytes_per_token(32, dtype_bytes=4)
    # the tensors hold every row and head up to the longest: the shorter row's slots are padding
    longest = 10 if lazy else int(mask.sum(-1).max()) + 11
    b, layers, heads = mask.shape[0], model.config.num_hidden_layers, model.config.num_key_value_heads
    assert cache.stored_bytes() == per_token * layers * b * heads * longest
    assert cache.bookkeeping_bytes() == (8 + 4) * layers * b * heads * longest  # int64 position, float32 score
    assert (cache.stored_bytes() > cache.kept_tokens() * per_token) == (not lazy)


def test_compress_context_manager(gen):
    model = tiny()
    ids, mask = prompts(gen)
    with kvplug.hf.compress(model, "streaming(sinks=2, window=8)") as strategy:
        inside = greedy(model, ids, mask)
    assert strategy.scorer.name == "streaming"
    assert "generate" not in vars(model)
    explicit = greedy(model, ids, mask, cache=kvplug.hf.cache(model, "streaming(sinks=2, window=8)"))
    assert torch.equal(inside, explicit)
    plain = greedy(model, ids, mask, cache=DynamicCache(config=model.config))
    assert torch.equal(greedy(model, ids, mask), plain)  # after the block: uncompressed again


def test_clear_errors():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(SpecError, match="supports model types .*got 'gpt2'"):
        kvplug.hf.cache(gpt2, "int4")
    with pytest.raises(SpecError, match="sliding-window"):
        kvplug.hf.cache(MistralForCausalLM(MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=16)), "int4")
    with pytest.raises(SpecError, match="unknown strategy part"):
        kvplug.hf.cache(tiny(), "int5")
    with pytest.raises(SpecError, match="streaming evicts while generating"):
        kvplug.hf.cache(tiny(), "streaming+kivi")
    with pytest.raises(SpecError, match="simlayerkv evicts while generating"):
        kvplug.hf.cache(tiny(), "simlayerkv+kivi(bits=2)")


@pytest.mark.parametrize("spec", ["none", "int8", "int4", "streaming(sinks=2, window=20)+int4",
                                  "snapkv(budget=20, window=4)+int8", "int4(rotate=true)", "mixed",
                                  "snapkv(budget=20, window=4)+mixed(rotate=true)",
                                  "int4(rotate=true, clip=0.8)", "mixed(key_clip=0.9, value_clip=0.7)",
                                  "mixed(key=3, value=2, symmetric=true, rotate=true, key_clip=0.85)",
                                  "int2(symmetric=true)"])
def test_paged_layout_matches_slot_store(spec, gen, monkeypatch):
    """The paged layout the Triton kernels read (here through their PyTorch references) gives the
    logits of the plain slot store, within bfloat16 rounding, and holds the same bytes; its blocks
    start poisoned (all bits set: NaN scales and values), and a last step of 4 tokens at once
    reads the cache decoded, empty slots included."""
    from kvplug.triton_ops import PagedLayout

    allocate = PagedLayout.allocate
    monkeypatch.setattr(PagedLayout, "allocate", lambda self, n, device="cpu": allocate(self, n, device).view(
        torch.uint8).fill_(255).view(self.storage_dtype))
    head_dim = 64 if "int2" in spec or "value=2" in spec else 32  # 2-bit codes fill the kernels' 16-byte chunks from head_dim 64
    model = tiny(head_dim=head_dim).to(torch.bfloat16)
    ids, _ = prompts(gen, length=64)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    logits, caches = [], []
    for paged in (False, True):
        cache = kvplug.hf.cache(model, spec, paged=paged)
        model(input_ids=ids[:, :48], attention_mask=mask[:, :48], past_key_values=cache)
        steps = [model(input_ids=ids[:, i:i + 1], attention_mask=mask[:, :i + 1], past_key_values=cache).logits
                 for i in range(48, 60)]
        steps.append(model(input_ids=ids[:, 60:64], attention_mask=mask, past_key_values=cache).logits)
        logits.append(torch.cat(steps, 1).float())
        caches.append(cache)
    assert type(caches[1].layers[0].slots).__name__ == "PagedStore"
    assert (logits[0] - logits[1]).norm() / logits[0].norm() < 2e-2
    # the same tokens; both hold every head and row up to the longest, the paged one in 16-token blocks
    per_token = parse(spec).bytes_per_token(head_dim, dtype_bytes=2)
    for cache, block in ((caches[0], 1), (caches[1], 16)):
        expect = sum(per_token * c.numel() * (-(-int(c.max()) // block) * block)
                     for c in (layer.slots.counts for layer in cache.layers))
        assert cache.stored_bytes() == expect, (spec, block)

    def kept(layer):
        return [sorted(p for p in row if p >= 0) for row in layer.slots.positions.flatten(0, 1).tolist()]

    for a, b in zip(caches[0].layers, caches[1].layers):
        assert kept(a) == kept(b)


def _registered_specs():
    """One spec per registered part (the registry, not a list kept here): a scorer with half its
    prompt as the budget where it takes one, a budget behind knorm, a codec or merger alone."""
    from kvplug.registry import Registry

    reg = Registry(discover=False)
    for name in reg.names():
        cls = reg.get(name)
        fields = {f.name for f in cls.parameters()}
        if cls.example:  # a part with a required parameter gives its own example
            yield name, cls.example
        elif cls.kind == "scorer":
            yield name, f"{name}(budget=50%)" if "budget" in fields else name
        elif cls.kind == "budget":
            yield name, f"knorm(budget=50%)+{name}"
        else:
            yield name, name


@pytest.mark.parametrize("name, spec", list(_registered_specs()), ids=[n for n, _ in _registered_specs()])
def test_every_registered_part_runs_in_generate(gen, name, spec, tmp_path):
    """Each part the registry holds runs once through ``generate()`` on a tiny 4-layer Llama (batch
    of 2, left padding; 4 layers so that a merger has a pair); an evicting one keeps about half the
    prompt, at most what was seen."""
    print(f"seed {gen.initial_seed()}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SMALL, "num_hidden_layers": 4}, num_key_value_heads=2, head_dim=32))
    model.generation_config.eos_token_id = None
    model.eval()
    ids, mask = prompts(gen, length=40, pad=6)
    strategy = parse(spec)
    if isinstance(strategy.scorer, LearnedPart):  # its weights: a file made for this model's shape
        path = write_random_weights(tmp_path / "weights.safetensors", type(strategy.scorer), 4, 2, 32, gen)
        strategy = parse(spec[:-1] + f", weights='{path}')" if spec.endswith(")") else f"{spec}(weights='{path}')")
    cache = kvplug.hf.cache(model, strategy)
    out = greedy(model, ids, mask, steps=6, cache=cache)
    assert out.shape == (2, 46)
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    seen = layers * heads * (2 * 46 - 6 - 1)  # every real token but the last generated one
    kept = cache.kept_tokens()
    if strategy.scorer is not None and ("budget" in {f.name for f in type(strategy.scorer).parameters()}
                                        or strategy.scorer.example):
        assert kept < seen * 0.8, (spec, kept, seen)
    else:
        assert 0 < kept <= seen, (spec, kept, seen)


def test_adakv_stored_bytes_count_the_padding_of_uneven_heads(gen):
    """Ada-KV gives heads different counts; the slot tensors hold every head up to the longest,
    and stored_bytes says so (the kept tokens alone would under-report)."""
    model = tiny()
    # About 2% of random prompts give this tiny model's two heads equal shares (seen over 200
    # seeds); the test needs uneven ones, so it draws up to five prompts and takes the first.
    for _ in range(5):
        ids, _ = prompts(gen, batch=1, length=64)
        cache = kvplug.hf.cache(model, "snapkv(budget=12, window=4)+adakv(alpha=0.1)")
        model(input_ids=ids, past_key_values=cache)
        counts = [layer.slots.counts for layer in cache.layers]
        if any(int(c.max()) > int(c.min()) for c in counts):
            break
    assert any(int(c.max()) > int(c.min()) for c in counts)  # uneven heads somewhere
    per_token = parse("none").bytes_per_token(32, dtype_bytes=4)
    assert cache.stored_bytes() == sum(per_token * c.numel() * int(c.max()) for c in counts)
    assert cache.stored_bytes() > cache.kept_tokens() * per_token


@pytest.mark.parametrize("source", ["bits", "tsv"])
def test_duo_streaming_heads_keep_sinks_and_window_retrieval_heads_everything(gen, tmp_path, source):
    """A head pattern (bits, or DuoAttention's file of gates with half the heads streaming):
    after a left-padded prompt and 12 steps, each retrieval head holds every token seen, each
    streaming head its 2 sinks and the 8 newest, counted against the positions a loop lists."""
    model = tiny()  # 2 layers x 2 KV heads
    ids, mask = prompts(gen, length=40, pad=6)
    if source == "bits":
        pattern = "10/01"
    else:
        (tmp_path / "gates.tsv").write_text("0.9\t0.1\n0.2\t0.8\n")  # the lowest two stream: (0, 1), (1, 0)
        pattern = str(tmp_path / "gates.tsv")
    cache = kvplug.hf.cache(model, f"duo(pattern='{pattern}', sinks=2, window=8)")
    greedy(model, ids, mask, steps=12, cache=cache)
    retrieval = [[True, False], [False, True]]
    for layer, full in zip(cache.layers, retrieval):
        for b, n in enumerate(mask.sum(-1).tolist()):
            total = n + 11  # the prompt and the generated tokens the model has seen
            for h in range(2):
                kept = sorted(p for p in layer.slots.positions[b, h].tolist() if p >= 0)
                assert kept == (list(range(total)) if full[h] else [0, 1] + list(range(total - 8, total))), (b, h)


def test_duo_refuses_a_pattern_that_does_not_fit_in_one_line(tmp_path):
    model = tiny()
    ids = torch.ones(1, 12, dtype=torch.long)
    for spec, message in (("duo", "needs pattern="), ("duo(pattern='10/0')", "same number of heads"),
                          ("duo(pattern='nope.tsv')", "neither bits like 10/01 nor a file")):
        with pytest.raises(SpecError, match=message) as e:
            parse(spec)
        assert "\n" not in str(e.value)
    with pytest.raises(SpecError, match="has 3 layers x 2 heads; the model has 2 x 2") as e:
        model(input_ids=ids, past_key_values=kvplug.hf.cache(model, "duo(pattern='10/01/11')"))
    with pytest.raises(SpecError, match="places its tokens as 'per_head'"):
        from kvplug.adapters.vllm import check_supported
        check_supported(parse("duo(pattern='10/01')"), 32)


def _recorded_inputs(model, ids, mask, spec, window):
    """Each layer's prompt inputs as the model computes them (an SDPA recorder, not kvplug)."""
    recorder = Recorder()
    AttentionInterface.register("kvplug_test_recorder", recorder)
    AttentionMaskInterface.register("kvplug_test_recorder", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation("kvplug_test_recorder")
    model(input_ids=ids, attention_mask=mask)
    t = ids.shape[1]
    return {idx: ScoreInputs(keys=key, values=value, queries=query[:, :, t - window:], valid=mask.bool(),
                             scale=32**-0.5, layer_idx=idx, num_layers=2,
                             out_proj=model.model.layers[idx].self_attn.o_proj.weight)
            for idx, (query, key, value, _) in recorder.calls.items()}


def _kept(layer):
    return [[sorted(p for p in layer.slots.positions[b, h].tolist() if p >= 0) for h in range(2)]
            for b in range(layer.slots.positions.shape[0])]


def test_criticalkv_reads_each_layers_own_output_projection(gen):
    """The kept sets equal a float64 loop over the recorded prompt and that layer's o_proj."""
    from test_scorers import naive_projected_norm, naive_snapkv_mean, naive_topk

    model = tiny()
    ids, mask = prompts(gen, length=40, pad=0)
    inputs = _recorded_inputs(model, ids, mask, None, 6)
    cache = kvplug.hf.cache(model, "criticalkv(budget=14, window=6, kernel=3)")
    model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    for idx, layer in enumerate(cache.layers):
        x = inputs[idx]
        for b in range(2):
            for kv in range(2):
                snap = naive_snapkv_mean(x, b, kv, 6, 3) + [math.inf] * 6
                first = naive_topk(snap, 7)
                norm = naive_projected_norm(x.values[b], x.out_proj, kv, 2)
                weighted = [math.inf if j in first else (snap[j] + 1e-4) * norm[j] for j in range(40)]
                assert set(_kept(layer)[b][kv]) == naive_topk(weighted, 14), (idx, b, kv)


def test_cake_splits_the_budget_over_layers_by_preference(gen):
    """Every layer's count is its share of 2 x 12 tokens per head by the float64 preference
    (split_across_layers, hand-checked in test_scorers); the counts sum to exactly 24; each
    layer keeps the top of its own indicator; the cache reports those counts while generating."""
    from test_scorers import naive_cake, naive_topk

    from kvplug.budgets.base import split_across_layers

    model = tiny()
    ids, mask = prompts(gen, length=40, pad=0)
    inputs = _recorded_inputs(model, ids, mask, None, 5)
    spec = "cake(budget=12, window=5, kernel=3, gamma=50)"
    cache = kvplug.hf.cache(model, spec)
    greedy(model, ids, mask, steps=4, cache=cache)
    for b in range(2):
        naive = [naive_cake(inputs[i], b, 5, 3, 50.0, 1.0, 1.0) for i in range(2)]
        pref = torch.tensor([[p] for p, _ in naive])
        counts = split_across_layers(pref, torch.tensor([12]), torch.tensor([40]), 5)[:, 0].tolist()
        assert sum(counts) == 24
        for i, layer in enumerate(cache.layers):
            for kv in range(2):
                kept = _kept(layer)[b][kv]
                assert set(kept[:len(kept) - 3]) == naive_topk(naive[i][1][kv], counts[i]), (i, b, kv)
                assert kept[-3:] == [40, 41, 42]  # the generated tokens fed back, appended


def _naive_prefill(name, x, b, kv, window):
    """Prefill scores of one row and KV head (float64 loops over the recorded prompt; finite, the
    running scores generation starts from) and the positions kept at prefill whatever they score."""
    from test_scorers import naive_probs, naive_unimportant_counts

    t = x.keys.shape[2]
    valid = x.valid[b]
    if name == "scissorhands":
        counts = naive_unimportant_counts(x, b, kv, window, 1.0)
        return [-counts[j] if valid[j] else -math.inf for j in range(t)], set(range(t - 3, t))
    if name == "h2o":  # attention summed over every prompt query, mean over the KV head's query heads
        probs = naive_probs(x.queries[b], x.keys[b], valid, 0, x.scale)
        acc = [sum(float(probs[h, i, j]) for h in (2 * kv, 2 * kv + 1) for i in range(t)) / 2 for j in range(t)]
        return [acc[j] if valid[j] else -math.inf for j in range(t)], set(range(t - 3, t))
    probs = naive_probs(x.queries[b, :, -1:], x.keys[b], valid, t - 1, x.scale)  # tova: the last query, all heads
    last = [sum(float(probs[h, 0, j]) for h in range(4)) / 4 for j in range(t)]
    return [last[j] if valid[j] else -math.inf for j in range(t)], {t - 1}


@pytest.mark.parametrize("name, spec, length", [
    ("scissorhands", "scissorhands(budget=12, window=8, recent_ratio=0.25)", 40),
    ("h2o", "h2o(budget=12, recent_ratio=0.25)", 40),
    ("h2o", "h2o(budget=12, recent_ratio=0.25)", 9),  # the cache fills while generating: decode scores decide
    ("tova", "tova(budget=12)", 40),
])
def test_decode_time_eviction_follows_a_naive_slot_loop(gen, monkeypatch, name, spec, length):
    """A float64 loop over the recorded prompt and every step's query and key, written from the
    papers (not from kvplug's update code): the prefill keeps the top of the method's prompt
    scores (its always-kept tokens first); each new token takes the slot of the lowest-scored
    unprotected token (the lowest slot on ties; h2o and scissorhands protect the newest 3),
    then the step's attention updates the scores: H2O adds it (group mean), TOVA replaces them by
    it (mean over all query heads), Scissorhands counts one more for every token below 1/held."""
    from test_scorers import naive_topk

    from kvplug.adapters.hf.layer import KVPlugLayer

    model = tiny()
    ids, mask = prompts(gen, length=length, pad=2)
    window, budget, steps = 8, 12, 40
    record = {0: {"q": [], "k": []}, 1: {"q": [], "k": []}}
    attend, append = KVPlugLayer.attend, KVPlugLayer._append
    monkeypatch.setattr(KVPlugLayer, "attend",
                        lambda self, q, scale: (record[self.layer_idx]["q"].append(q.clone()), attend(self, q, scale))[1])
    monkeypatch.setattr(KVPlugLayer, "_append",
                        lambda self, k, v: (record[self.layer_idx]["k"].append(k.clone()), append(self, k, v))[1])
    cache = kvplug.hf.cache(model, spec, paged=False, keep_prompt=True)
    greedy(model, ids, mask, steps=steps, cache=cache)
    for idx, layer in enumerate(cache.layers):
        keys, values, queries, valid, scale = layer.prompt
        w = length if name == "h2o" else window
        x = ScoreInputs(keys=keys, values=values, queries=queries[:, :, length - w:], valid=valid, scale=scale)
        for b in range(2):
            first = int((~valid[b]).sum())
            n = length - first
            held = {}
            for kv in range(2):
                scores, must = _naive_prefill(name, x, b, kv, window)
                keep = sorted(naive_topk(scores, min(budget, n), must=must))
                held[kv] = {"pos": [j - first for j in keep], "score": [scores[j] for j in keep],
                            "k": [keys[b, kv, j].double() for j in keep]}  # always-kept ones score on
            for s in range(steps - 1):
                step = n + s
                for kv in range(2):
                    hk = held[kv]
                    k_new = record[idx]["k"][s][b, kv, 0].double()
                    if len(hk["pos"]) < budget:  # below the budget: the token joins at the next slot
                        hk["pos"].append(step), hk["score"].append(0.0), hk["k"].append(k_new)
                        continue
                    protected = [name != "tova" and p > step - 3 for p in hk["pos"]]
                    victim = min((i for i in range(budget) if not protected[i]), key=lambda i: (hk["score"][i], i))
                    hk["pos"][victim], hk["score"][victim], hk["k"][victim] = step, 0.0, k_new
                step_probs = {}
                for h in range(4):
                    q = record[idx]["q"][s][b, h, 0].double()
                    logits = [float(q @ k) * scale for k in held[h // 2]["k"]]
                    m = max(logits)
                    e = [math.exp(v - m) for v in logits]
                    step_probs[h] = [v / sum(e) for v in e]
                for kv in range(2):
                    hk = held[kv]
                    held_now = len(hk["pos"])
                    group = [(step_probs[2 * kv][i] + step_probs[2 * kv + 1][i]) / 2 for i in range(held_now)]
                    if name == "h2o":
                        hk["score"] = [sc + p for sc, p in zip(hk["score"], group)]
                    elif name == "tova":
                        hk["score"] = [sum(step_probs[h][i] for h in range(4)) / 4 for i in range(held_now)]
                    else:
                        hk["score"] = [sc - (p < 1 / held_now) for sc, p in zip(hk["score"], group)]
            for kv in range(2):
                assert layer.slots.positions[b, kv].tolist()[:budget] == held[kv]["pos"], (idx, b, kv)


@pytest.mark.parametrize("spec, message", [
    ("compactor(budget=50%)", "compactor: RoPE rotates 4 of the 16 head channels"),
    ("expected_attention(budget=50%)", "expected_attention: RoPE rotates 4 of the 16 head channels"),
    ("criticalkv(budget=50%)", "criticalkv weights values by the layer's output projection"),
])
def test_what_a_scorer_needs_of_the_model_is_checked_when_the_cache_is_made(spec, message):
    """GPT-NeoX rotates a quarter of each head (partial rotary) and has no o_proj: refused in one line."""
    with pytest.raises(SpecError, match=message) as info:
        kvplug.hf.cache(tiny("gpt_neox"), spec)
    assert "\n" not in str(info.value)
