"""InfiniGen (``infinigen``): K/V in host memory, the tokens each layer reads chosen from partial keys.

References are independent of the code under test: the speculation is recomputed in float64 from
the model's own weights and the hidden states the test captures with its own hooks (query and key
projections, RoPE, an SVD for the skew, a loop over heads for the ranking); outputs with every
token fetched are compared with the uncompressed cache; bytes are counted by hand.
"""

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvplug.hf
from kvplug.adapters.hf.offload import FetchBuffers, HostStore, ModelView
from kvplug.config import parse
from kvplug.errors import SpecError

HQ, HKV, D, LAYERS = 8, 2, 16, 3


def tiny_llama(seed: int, head_dim: int = D) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=HQ * head_dim, intermediate_size=256, num_hidden_layers=LAYERS,
                         num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=head_dim, vocab_size=300,
                         max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms of their own per layer (a fresh model has all ones): which norm is used shows
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    return model


def seed_of(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=gen))


def decode(model, spec, ids, steps, attention_mask=None):
    """Logits ``[steps + 1, B, V]`` of a prompt then ``steps`` greedy tokens, and the cache."""
    cache = kvplug.hf.cache(model, spec)
    mask = attention_mask
    out = model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(token)], 1)
        out = model(input_ids=token, attention_mask=mask, past_key_values=cache)
        logits.append(out.logits[:, -1])
    return torch.stack(logits), cache


@pytest.mark.parametrize("spec, grow", [("infinigen(budget=100%)", False), ("infinigen(budget=100%, ahead=false)", False),
                                        ("infinigen(budget=100%, partial=0.1)", True)])
@torch.no_grad()
def test_fetching_every_token_equals_the_uncompressed_cache(spec, grow, gen, monkeypatch):
    if grow:  # host store, partial keys and fetch buffers all reallocated while generating
        from kvplug.adapters.hf import offload

        monkeypatch.setattr(offload, "HOST_GROWTH", 2)
        monkeypatch.setattr(offload, "DEVICE_GROWTH", 3)
        monkeypatch.setattr(offload, "FETCH_GROWTH", 4)
    model = tiny_llama(seed_of(gen))
    ids = torch.randint(0, 300, (3, 37), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding: padded slots are held but never attended
    mask[2, :1] = 0
    want, _ = decode(model, "none", ids, 6, mask)
    got, cache = decode(model, spec, ids, 6, mask)
    assert torch.allclose(got, want, atol=2e-5, rtol=0), (got - want).abs().max()
    assert cache.layers[1].chosen.shape[-1] == 37 + 5  # every held slot was fetched at the last step


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def _rms_norm(x, norm):
    """The model's RMSNorm in float64, from its weight and epsilon."""
    w = norm.weight.double().numpy()
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + norm.variance_epsilon) * w


def _queries(model, layer, residual, cos, sin, row):
    """Layer ``layer``'s RoPE'd queries ``[HQ, T, D]`` for ``residual`` ``[T, hidden]``: its own
    input norm, query projection and RoPE, in float64."""
    block = model.model.layers[layer]
    x = _rms_norm(residual, block.input_layernorm)
    t = x.shape[0]
    q = (x @ block.self_attn.q_proj.weight.double().numpy().T).reshape(t, HQ, D).transpose(1, 0, 2)
    return _rope(q, cos[row % len(cos)], sin[row % len(sin)])


def _naive_choice(model, captured, layer, source, budget_tokens, columns):
    """Per (row, KV head), the set of prompt tokens layer ``layer`` fetches at the first decode
    step, in float64: the skew from an SVD of the prompt's queries, the prompt's partial keys, the
    new token's partial query from layer ``source``'s input (the residual stream, through layer
    ``layer``'s own norm and projection), softmax per query head summed over the KV head's
    group, top ``budget_tokens``."""
    block = model.model.layers[layer]
    attn = block.self_attn
    wk = attn.k_proj.weight.double().numpy()
    prompt_x, prompt_cos, prompt_sin = captured[layer][0]
    step_x, step_cos, step_sin = captured[source][1]
    b, t, _ = prompt_x.shape
    group = HQ // HKV
    prompt_q = [_queries(model, layer, prompt_x[row], prompt_cos, prompt_sin, row) for row in range(b)]
    choice = {}
    for row in range(b):
        pc, ps = prompt_cos[row % len(prompt_cos)], prompt_sin[row % len(prompt_sin)]  # RoPE may be shared by rows
        k = (_rms_norm(prompt_x[row], block.input_layernorm) @ wk.T).reshape(t, HKV, D).transpose(1, 0, 2)
        k = _rope(k, pc, ps)
        q_new = _queries(model, layer, step_x[row], step_cos, step_sin, row)
        for h in range(HKV):
            heads = range(h * group, (h + 1) * group)
            # the skew is computed over all rows of the prompt batch
            stacked = np.concatenate([prompt_q[r][g] for r in range(b) for g in heads])
            _, _, vt = np.linalg.svd(stacked, full_matrices=False)
            a = vt[:columns].T
            mass = np.zeros(t)
            for g in heads:
                logits = np.array([float(q_new[g, 0] @ a @ (k[h, j] @ a)) for j in range(t)]) * attn.scaling
                p = np.exp(logits - logits.max())
                mass += p / p.sum()
            order = np.argsort(-mass)
            choice[row, h] = (set(order[:budget_tokens].tolist()), mass)
    return choice


@pytest.mark.parametrize("ahead, dense", [(True, 0), (False, 0), (True, 1)])
@torch.no_grad()
def test_speculation_picks_the_tokens_of_a_naive_float64_computation(ahead, dense, gen):
    model = tiny_llama(seed_of(gen))
    t, budget, partial = 48, 12, 0.25
    columns = round(partial * D)
    ids = torch.randint(0, 300, (2, t), generator=gen)
    captured = {i: [] for i in range(LAYERS)}

    def record(i):  # each decoder layer's input, the residual stream before its norm
        def hook(module, args, kwargs):
            cos, sin = kwargs["position_embeddings"]
            captured[i].append((args[0].double().numpy(), cos.double().numpy()[:, None],
                                sin.double().numpy()[:, None]))
        return hook

    handles = [model.model.layers[i].register_forward_pre_hook(record(i), with_kwargs=True) for i in range(LAYERS)]
    try:
        ModelView.of(model).skews.clear()  # this prompt's skew, not an earlier test's
        cache = kvplug.hf.cache(model, f"infinigen(budget={budget}, partial={partial}, ahead={str(ahead).lower()}, "
                                       f"dense_layers={dense})")
        out = model(input_ids=ids, past_key_values=cache)
        model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache)
    finally:
        for handle in handles:
            handle.remove()
    for layer in range(LAYERS):
        if layer < dense:  # kept whole on the accelerator: nothing chosen
            assert not hasattr(cache.layers[layer], "chosen")
            continue
        source = layer - 1 if ahead and layer > 0 else layer
        want = _naive_choice(model, captured, layer, source, budget, columns)
        got = cache.layers[layer].chosen
        for (row, h), (tokens, mass) in want.items():
            chosen = set(got[row, h].tolist())
            kth = np.sort(mass)[::-1][budget - 1]
            for j in chosen ^ tokens:  # a difference only at a float32 tie with the budget's last token
                assert abs(mass[j] - kth) <= 1e-5 * max(kth, 1e-12), (layer, row, h, j, mass[j], kth)


@torch.no_grad()
def test_accelerator_bytes_are_bounded_by_the_budget_and_the_host_holds_every_token(gen):
    model = tiny_llama(seed_of(gen))
    b, t, steps, budget, partial = 2, 120, 5, 20, 0.25
    ids = torch.randint(0, 300, (b, t), generator=gen)
    _, cache = decode(model, f"infinigen(budget={budget}, partial={partial}, dense_layers=0)+int8", ids, steps)
    held = t + steps  # the prompt and one token per step
    # by hand: int8 codes (D bytes) + fp16 scale and zero (4 bytes), K and V, per token and head
    per_token = 2 * (D + 4)
    assert cache.host_bytes() == LAYERS * b * HKV * held * per_token
    columns = round(partial * D)
    partial_bytes = LAYERS * b * HKV * held * columns * 4  # float32 model
    fetch_slots = math.ceil(budget / 64) * 64
    assert cache.device_bytes() == partial_bytes + 2 * b * HKV * fetch_slots * per_token
    dynamic = LAYERS * b * HKV * held * 2 * D * 4
    assert cache.device_bytes() < 0.25 * dynamic  # what the accelerator would hold without offloading
    assert cache.kept_tokens() == LAYERS * b * HKV * held
    for layer in cache.layers:
        assert all(x.device.type == "cpu" and x.shape[0] >= held for enc in layer.host.fields.values()
                   for x in enc.values())
    # dense_layers=1: layer 0 holds all of its K/V on the accelerator, in the codec's form
    _, dense = decode(model, f"infinigen(budget={budget}, partial={partial}, dense_layers=1)+int8", ids, steps)
    layer_bytes = b * HKV * held * per_token
    assert dense.host_bytes() == (LAYERS - 1) * layer_bytes
    assert dense.device_bytes() == layer_bytes + partial_bytes // LAYERS * (LAYERS - 1) + 2 * b * HKV * fetch_slots * per_token


def test_host_copy_holds_the_codecs_codes(gen):
    codec = parse("int4").codec
    keys, values = torch.randn(2, 3, 70, 32, generator=gen), torch.randn(2, 3, 70, 32, generator=gen)
    store = HostStore(codec, torch.device("cpu"))
    store.write(keys[:, :, :50], values[:, :, :50])
    store.write(keys[:, :, 50:], values[:, :, 50:])
    for role, x in (("key", keys), ("value", values)):
        want = codec.encode(x, role)
        held = store.tokens(role)
        for name, t in want.items():
            assert torch.equal(held[name], t)
    index = torch.stack([torch.randperm(70, generator=gen)[:9].sort().values for _ in range(6)]).view(2, 3, 9)
    fetched = store.fetch(index, FetchBuffers().get(0, 9, store.field_shapes(), torch.device("cpu")))
    for role, x in (("key", keys), ("value", values)):
        for i in range(2):
            for h in range(3):
                want = codec.decode(codec.encode(x[i:i + 1, h:h + 1, index[i, h]], role), role, torch.float32)
                got = codec.decode({n: t[i:i + 1, h:h + 1] for n, t in fetched[role].items()}, role, torch.float32)
                assert torch.equal(got, want)


def test_gather_rows_reads_the_indexed_rows(gen):
    pytest.importorskip("triton")
    from kvplug import triton_ops

    for dtype in (torch.float16, torch.uint8, torch.float32):
        src = (torch.randn(5, 70, 37, generator=gen) * 40).to(dtype)
        index = torch.randint(0, 70, (5, 45), generator=gen, dtype=torch.int32)
        out = torch.full((5, 45, 37), 7, dtype=dtype)
        triton_ops.gather_rows(src, index, out)
        for r in range(5):
            for j in range(45):
                assert torch.equal(out[r, j], src[r, int(index[r, j])])
    with pytest.raises(ValueError, match="index must be"):
        triton_ops.gather_rows(src, index[:2])


@pytest.mark.parametrize("spec, message", [
    ("infinigen+snapkv", "use one of them"),
    ("infinigen+kivi", "per-token codec"),
    ("infinigen(partial=0)", "partial=0.0 is out of range"),
    ("infinigen(budget=0)", "at least 1 tokens"),
])
def test_bad_specs_are_refused_in_one_line(spec, message):
    with pytest.raises(SpecError, match=message) as e:
        parse(spec)
    assert "\n" not in str(e.value)


def test_models_without_a_query_projection_are_refused():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, vocab_size=100))
    with pytest.raises(SpecError, match="q_proj"):
        kvplug.hf.cache(model, "infinigen")


@pytest.mark.parametrize("codec", ["none", "int8", "int4", "int2", "mixed"])
def test_token_rows_move_between_host_rows_and_pages(codec, gen):
    """``copy_token_rows`` (Triton, interpreter) and its reference: a write-back gives each token's
    bytes exactly as the layout's own views hold them (codes, then scale/zero, per role); a fetch
    of permuted rows into other slots puts the same bytes where those views expect them; slots not
    written keep their poison."""
    pytest.importorskip("triton")
    from kvplug import triton_ops
    from kvplug.triton_ops import PagedLayout

    layout = PagedLayout.for_codec(codec, 16, 3, 64, torch.bfloat16)
    b, n, blocks = 2, 37, 4
    cache = layout.allocate(b * blocks)
    cache.view(torch.uint8).copy_(torch.randint(0, 256, cache.view(torch.uint8).shape, generator=gen,
                                                dtype=torch.uint8))
    tables = torch.randperm(b * blocks, generator=gen).to(torch.int32).view(b, blocks)

    def token_bytes(c, row, head, slot):  # independent of the copy: the layout's views
        blk, off = int(tables[row, slot // 16]), slot % 16
        if not layout.quantized:
            return torch.cat([c[blk, role, head, off].view(torch.uint8) for role in (0, 1)])
        return torch.cat([torch.cat([layout.role_codes(c, role)[blk, head, off],
                                     layout.role_meta(c, role)[blk, head, off].view(torch.uint8)]) for role in (0, 1)])

    host_index = torch.stack([torch.randperm(50, generator=gen)[:n] for _ in range(b * 3)]).view(b, 3, n).int()
    slots = torch.stack([torch.randperm(blocks * 16, generator=gen)[:n] for _ in range(b * 3)]).view(b, 3, n).int()
    for copy in (triton_ops.copy_token_rows, triton_ops.copy_token_rows_reference):
        rows = torch.full((50, b, 3, layout.token_row_bytes()), 77, dtype=torch.uint8)
        copy(rows, cache, layout, tables, host_index, slots, to_pages=False)
        for row in range(b):
            for head in range(3):
                for j in range(n):
                    got = rows[int(host_index[row, head, j]), row, head]
                    assert torch.equal(got, token_bytes(cache, row, head, int(slots[row, head, j])))
        assert int((rows == 77).all(-1).sum()) >= (50 - n) * b * 3  # rows not written stay poisoned
        other = layout.allocate(b * blocks)
        other.view(torch.uint8).fill_(201)
        back = torch.stack([torch.randperm(blocks * 16, generator=gen)[:n] for _ in range(b * 3)]).view(b, 3, n).int()
        copy(rows, other, layout, tables, host_index, back, to_pages=True)
        for row in range(b):
            for head in range(3):
                for j in range(n):
                    want = token_bytes(cache, row, head, int(slots[row, head, j]))
                    assert torch.equal(token_bytes(other, row, head, int(back[row, head, j])), want)


@pytest.mark.parametrize("spec", ["infinigen(budget=100%)", "infinigen(budget=25%)+int4",
                                  "infinigen(budget=100%, partial=0.2)+mixed(rotate=true)",
                                  "infinigen(budget=30%, ahead=false)+int8"])
@torch.no_grad()
def test_paged_token_rows_path_equals_the_reference_path(spec, gen):
    """The kernels' path (token rows, fetch pages, the decode kernel; here their references, as on
    a CPU) against the codec-field path, bf16 model with left padding: the same tokens fetched,
    the same logits up to bf16 rounding; a step of 3 tokens at once takes the pages' dense path."""
    model = tiny_llama(seed_of(gen), head_dim=32).to(torch.bfloat16)  # 32: int4 codes fill 16-byte chunks
    ids = torch.randint(0, 300, (2, 40), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    extra = torch.randint(0, 300, (2, 3), generator=gen)

    def run(paged, tokens=None):
        """Logits of the prompt, 4 greedy steps and a 3-token step; ``tokens``: feed these instead
        of this run's own argmax (so a near-tie in bf16 cannot send the two paths down other text)."""
        cache = kvplug.hf.cache(model, spec, paged=paged)
        am = mask
        logits = [model(input_ids=ids, attention_mask=am, past_key_values=cache).logits[:, -1]]
        fed = []
        for i in range(4):
            token = logits[-1].argmax(-1, keepdim=True) if tokens is None else tokens[i]
            fed.append(token)
            am = torch.cat([am, torch.ones_like(token)], 1)
            logits.append(model(input_ids=token, attention_mask=am, past_key_values=cache).logits[:, -1])
        am = torch.cat([am, torch.ones_like(extra)], 1)
        logits.append(model(input_ids=extra, attention_mask=am, past_key_values=cache).logits[:, -1])
        return torch.stack(logits).float(), cache, fed

    ref, ref_cache, fed = run(False)
    got, paged_cache, _ = run(True, fed)
    from kvplug.adapters.hf.offload import PagedOffload

    offloaded = [layer for layer in paged_cache.layers[1:]]  # layer 0 is dense (dense_layers=1)
    assert all(isinstance(layer.host, PagedOffload) for layer in offloaded)
    if "rotate" not in spec:  # rotated: q is rounded to bf16 in the rotated basis, so near-ties may differ
        for a, c in zip(ref_cache.layers[1:], offloaded):
            assert torch.equal(a.chosen.sort(-1).values, c.chosen.sort(-1).values)
    # bf16 rounding, as the paged HF test (rotated: every token fetched, since near-tie choices may differ)
    assert (got - ref).norm() / ref.norm() < 2e-2, (spec, (got - ref).abs().max())
    assert paged_cache.host_bytes() == ref_cache.host_bytes()  # the same bytes per token, laid out as rows
