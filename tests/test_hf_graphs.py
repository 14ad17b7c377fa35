"""``kvplug.hf.DecodeGraph``: the captured decode step gives generate()'s logits, keeps the cache's
tensors in place, grows when it must, and refuses what it cannot capture in one line."""

import pytest
import torch

import kvplug.hf
from test_hf_adapter import prompts, tiny

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _reference(model, ids, mask, spec, steps, device):
    """generate()'s greedy tokens and per-step logits over a fresh paged cache (positions from the
    mask, as generate computes them)."""
    cache = kvplug.hf.cache(model, spec, paged=True)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=steps,
                         do_sample=False, past_key_values=cache, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], [x.float() for x in out.logits]


def _graphed(model, ids, mask, spec, tokens, device, **kwargs):
    """The prompt through generate() (one token, the cache then holds the prompt alone), then the
    reference's tokens fed through a DecodeGraph: the logits after each."""
    cache = kvplug.hf.cache(model, spec, paged=True)
    model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=1, do_sample=False,
                   past_key_values=cache, pad_token_id=0)
    graph = kvplug.hf.DecodeGraph(model, cache, **kwargs)
    return cache, graph, [graph(tokens[:, t]).float().clone() for t in range(tokens.shape[1] - 1)]


@pytest.mark.parametrize("spec", ["int4", "none", "int4(residual=8)", "snapkv(budget=24, window=4)+int8",
                                  "h2o(budget=24)+int4", "streaming(sinks=4, window=20)+int8", "tova(budget=24)+int4"])
def test_the_static_step_gives_generates_logits(spec, gen):
    """Left-padded prompts: the step the graph holds (positions read from the cache, no mask)
    gives the logits generate() computes with the mask, step for step (CPU: the kernels'
    references, the same step run eagerly)."""
    model = tiny(head_dim=32).to(torch.bfloat16)
    ids, mask = prompts(gen, length=40)
    tokens, logits = _reference(model, ids, mask, spec, 10, "cpu")
    cache, graph, ours = _graphed(model, ids, mask, spec, tokens, "cpu", capture=False)
    for t, got in enumerate(ours):
        want = logits[t + 1]
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (spec, t)
    assert cache.get_seq_length() == ids.shape[1] + tokens.shape[1] - 1


def test_the_step_changes_the_cache_in_place_and_counts_exactly(gen, monkeypatch):
    """The tensors a graph reads stay where they are while the capacity lasts (counts, next
    positions, pages); each step adds exactly one token per head; past the capacity the store
    grows (reserve) and the logits stay generate()'s."""
    import kvplug.adapters.hf.store as store

    monkeypatch.setattr(store, "GROWTH", 4)  # 40-token prompt + 4: 3 blocks of 16, full after 8 steps
    model = tiny(head_dim=32).to(torch.bfloat16)
    ids, mask = prompts(gen, length=40)
    tokens, logits = _reference(model, ids, mask, "int4", 16, "cpu")
    cache = kvplug.hf.cache(model, "int4", paged=True)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                   past_key_values=cache, pad_token_id=0)
    graph = kvplug.hf.DecodeGraph(model, cache, max_new_tokens=5, capture=False)
    first = cache.layers[0]
    counts0, pos0 = first.slots.counts.clone(), first.next_pos.clone()
    where = (first.slots.counts.data_ptr(), first.next_pos.data_ptr(), first.slots.cache.data_ptr())
    assert first.slots.capacity == 48
    for t in range(15):
        got = graph(tokens[:, t]).float()
        assert (got - logits[t + 1]).abs().max() <= 1e-5 * logits[t + 1].abs().max(), t
        if t < 7:
            assert (first.slots.counts.data_ptr(), first.next_pos.data_ptr(), first.slots.cache.data_ptr()) == where
    assert torch.equal(first.slots.counts, counts0 + 15) and torch.equal(first.next_pos, pos0 + 15)
    assert first.slots.capacity == 64  # grew once: 8 + 15 - 1 = 22 tokens past 40 + 5 reserved, in blocks
    assert first.slots.counts.data_ptr() == where[0]  # the counts never move; the pages did


@pytest.mark.parametrize("spec, paged, message", [
    ("h2o(budget=24)+int4", True, "does not declare its decode-time eviction graph-safe"),
    ("int4", False, "not in the paged layout"),
    ("minicache(start=0)+int4", True, "outside the pages"),
    ("kivi", True, "outside the pages"),
])
def test_what_cannot_be_captured_is_refused_in_one_line(spec, paged, message, gen, monkeypatch):
    from kvplug.scorers.h2o import H2O

    monkeypatch.setattr(H2O, "decode_on_device", False)  # as a third-party scorer that does not say
    model = tiny(head_dim=32).to(torch.bfloat16)
    ids, mask = prompts(gen, length=40)
    cache = kvplug.hf.cache(model, spec, paged=paged)
    with pytest.raises(ValueError, match="holds no prompt yet"):
        kvplug.hf.DecodeGraph(model, cache, capture=False)
    model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    with pytest.raises(ValueError, match=message) as err:
        kvplug.hf.DecodeGraph(model, cache, capture=False)
    assert "\n" not in str(err.value)


def test_a_graph_needs_cuda_and_one_token_per_sequence(gen):
    model = tiny(head_dim=32).to(torch.bfloat16)
    ids, mask = prompts(gen, length=40)
    cache = kvplug.hf.cache(model, "int4", paged=True)
    model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="need the model on CUDA"):
            kvplug.hf.DecodeGraph(model, cache)
    graph = kvplug.hf.DecodeGraph(model, cache, capture=False)
    with pytest.raises(ValueError, match="made for 2 sequences"):
        graph(torch.zeros(3, dtype=torch.long))


@cuda
@pytest.mark.parametrize("spec", ["int4", "none", "int4(residual=32)",
                                  "mixed(key=3, value=2, symmetric=true, rotate=true, key_clip=0.85, residual=64)",
                                  "h2o(budget=96)+int4", "streaming(sinks=4, window=120)+int8", "tova(budget=96)+int4"])
def test_replayed_graph_equals_the_eager_step_on_cuda(spec, gen, monkeypatch):
    """On CUDA, in bfloat16: the captured step's logits equal the same step run eagerly, through
    a growth of the store (captured again) and past it; an evicting cache, at its budget, never
    grows (its victims are picked on the device in every replay)."""
    import kvplug.adapters.hf.store as store

    monkeypatch.setattr(store, "GROWTH", 8)
    model = tiny(head_dim=64).to("cuda", torch.bfloat16)
    ids, mask = prompts(gen, length=200)
    tokens, logits = _reference(model, ids, mask, spec, 40, "cuda")
    eager = _graphed(model, ids, mask, spec, tokens, "cuda", capture=False, max_new_tokens=8)
    graphed = _graphed(model, ids, mask, spec, tokens, "cuda", max_new_tokens=8)
    evicting = "budget" in spec or "window" in spec  # holds at most its budget: never grows
    assert graphed[1].replays == 38 and (graphed[1].captures == 1 if evicting else graphed[1].captures >= 2)
    for t, (a, b) in enumerate(zip(eager[2], graphed[2])):
        assert (a - b).abs().max() <= 1e-3 * a.abs().max(), (spec, t)
        assert (a - logits[t + 1]).abs().max() <= 2e-2 * a.abs().max(), (spec, t)  # bf16 rounding apart


@pytest.mark.parametrize("spec, graphed", [("int4", True), ("h2o(budget=24)+int4", True),
                                            ("minicache(start=0)+int4", False)])
def test_generate_inside_cuda_graphs_gives_generates_tokens(spec, graphed, gen):
    """generate() within ``kvplug.hf.cuda_graphs`` (the static step run eagerly on the CPU):
    the tokens of generate() outside it, left padding included; its decode steps went through
    the graph, or (a cache it cannot capture) ran as before."""
    model = tiny(head_dim=32).to(torch.bfloat16)
    ids, mask = prompts(gen, length=40)
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                          past_key_values=kvplug.hf.cache(model, spec, paged=True))
    with kvplug.hf.cuda_graphs(model, capture=False) as state:
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                             past_key_values=kvplug.hf.cache(model, spec, paged=True))
    assert torch.equal(got, want)
    assert state["steps"] == (11 if graphed else 0)
    assert "forward" not in vars(model)  # the block restores the model


def test_cuda_graphs_around_generate_on_the_cpu_runs_eagerly_and_says_so(gen, caplog):
    model = tiny(head_dim=32).to(torch.bfloat16)
    ids, mask = prompts(gen, length=40)
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                          past_key_values=kvplug.hf.cache(model, "int4", paged=True))
    with kvplug.hf.cuda_graphs(model) as state:
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             past_key_values=kvplug.hf.cache(model, "int4", paged=True))
    assert torch.equal(got, want) and state["steps"] == 0
    assert sum("CUDA graphs need the model on CUDA" in r.getMessage() for r in caplog.records) == 1


@cuda
def test_generate_replays_the_graph_on_cuda(gen):
    """generate() within ``cuda_graphs`` on CUDA: the tokens and logits of the same static step
    run eagerly (capture=False), with every decode step after the first replayed."""
    model = tiny(head_dim=64).to("cuda", torch.bfloat16)
    ids, mask = prompts(gen, length=300)
    kw = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=30, do_sample=False, pad_token_id=0,
              output_logits=True, return_dict_in_generate=True)
    runs = []
    for capture in (False, True):
        with kvplug.hf.cuda_graphs(model, capture=capture) as state:
            runs.append(model.generate(**kw, past_key_values=kvplug.hf.cache(model, "int4")))
            if capture:
                assert state["graph"].replays == 28 and state["steps"] == 29
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for a, b in zip(runs[0].logits, runs[1].logits):
        assert (a.float() - b.float()).abs().max() <= 1e-3 * a.float().abs().max()


@pytest.mark.parametrize("spec", ["h2o(budget=96)+int4", "tova(budget=96)+int8(rotate=true)"])
def test_eviction_scores_from_the_decode_logits_equal_the_dequantized_cache_s(spec, gen):
    """A decode-time scorer's step attention in the paged layout comes from the logits the decode
    kernel (CUDA) or its reference (elsewhere) writes while attending (no second pass): equal to
    :func:`kvplug.attention.step_attention` over the decoded keys, and the output to SDPA over the
    decoded cache, within float16 rounding; slots no token holds get 0."""
    import torch.nn.functional as F

    from kvplug.attention import step_attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny(head_dim=64).to(dev, torch.bfloat16)
    ids, mask = prompts(gen, length=200)
    cache = kvplug.hf.cache(model, spec, paged=True)
    model(input_ids=ids.to(dev), attention_mask=mask.to(dev), past_key_values=cache)
    layer = cache.layers[1]
    assert layer.slots.capacity > int(layer.slots.counts.max())  # slots past the counts exist, unwritten
    h, d = layer.slots.counts.shape[1], 64
    q = torch.randn(2, 2 * h, d, generator=gen).to(dev, torch.bfloat16)
    out, probs = layer.slots.attend_scored(q, d ** -0.5)
    keys, values, filled = layer.slots.decode()
    want = step_attention(q, keys, d ** -0.5, filled)
    assert (probs - want).abs().max() <= 2e-3 * want.max()
    assert torch.all(probs[~filled] == 0)
    ref = F.scaled_dot_product_attention(q[:, :, None].float(), keys.float(), values.float(),
                                         attn_mask=filled.repeat_interleave(2, 1)[:, :, None], scale=d ** -0.5,
                                         enable_gqa=True)[:, :, 0]
    assert (out.float() - ref).norm() / ref.norm() < 1e-2
