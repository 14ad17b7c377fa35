"""MiniCache: the merge against a per-token float64 loop, its reconstruction error, and the HF
adapter's decode against a DynamicCache whose merged layers were rebuilt by that loop."""

import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvplug.hf
from kvplug import SpecError, parse
from kvplug.mergers.minicache import MiniCache


def naive_merge(a, b, valid, t, gamma):
    """(direction, magnitudes, retained) token by token in float64, straight from the paper's formulas."""
    bsz, h, n, d = a.shape
    direction = torch.zeros(bsz, h, n, d, dtype=torch.float64)
    mags = torch.zeros(2, bsz, h, n, dtype=torch.float64)
    dist = torch.full((bsz, h, n), float("nan"), dtype=torch.float64)
    for i in range(bsz):
        for j in range(h):
            for k in range(n):
                if not valid[i, k]:
                    continue
                x, y = a[i, j, k].double(), b[i, j, k].double()
                ux, uy = x / x.norm(), y / y.norm()
                omega = math.acos(max(-1.0, min(1.0, float(ux @ uy))))
                if math.sin(omega) < 1e-6:
                    e = (1 - t) * ux + t * uy
                else:
                    e = (math.sin((1 - t) * omega) * ux + math.sin(t * omega) * uy) / math.sin(omega)
                direction[i, j, k], mags[0, i, j, k], mags[1, i, j, k] = e, x.norm(), y.norm()
                dist[i, j, k] = omega / math.pi
    lo = torch.nan_to_num(dist, nan=math.inf).amin(-1, keepdim=True)
    hi = torch.nan_to_num(dist, nan=-math.inf).amax(-1, keepdim=True)
    threshold = lo + (hi - lo) * gamma
    retained = torch.nan_to_num(dist, nan=-1.0) > threshold
    return direction, mags, retained, dist, threshold


def random_pair(gen, bsz=2, h=3, n=24, d=16, pad=5):
    a = torch.randn(bsz, h, n, d, generator=gen)
    b = a + 0.8 * torch.randn(bsz, h, n, d, generator=gen) * torch.rand(1, 1, n, 1, generator=gen)
    valid = torch.ones(bsz, n, dtype=torch.bool)
    valid[1, :pad] = False
    return a, b, valid


def test_merge_matches_naive_slerp_norms_and_retained_set(gen):
    a, b, valid = random_pair(gen)
    t, gamma = float(torch.rand(1, generator=gen)), float(torch.rand(1, generator=gen))
    merged = MiniCache(t=t, gamma=gamma).merge(a, b, valid)
    direction, mags, retained, dist, threshold = naive_merge(a, b, valid, t, gamma)
    real = valid[:, None, :].expand_as(retained)
    assert torch.allclose(merged.direction[real].double(), direction[real], atol=1e-5)
    assert torch.allclose(merged.magnitudes[:, real].double(), mags[:, real], rtol=1e-5)
    decided = (dist - threshold).abs() > 1e-5  # float32 vs float64 may differ right at the threshold
    assert torch.equal(merged.retained[decided & real], retained[decided & real])
    assert not merged.retained[~real].any()
    assert merged.retained.any() and not merged.retained[real].all()


def test_identical_layers_reconstruct_exactly(gen):
    a, _, valid = random_pair(gen)
    merged = MiniCache(t=float(torch.rand(1, generator=gen)), gamma=0.0).merge(a, a.clone(), valid)
    for which in (0, 1):
        assert torch.allclose(merged.restore(which)[:, :, 5:], a[:, :, 5:], atol=1e-5)


def test_random_pairs_reconstruction_error_is_bounded_by_the_slerp_angle(gen):
    a, b, valid = random_pair(gen)
    t = float(torch.rand(1, generator=gen))
    merged = MiniCache(t=t, gamma=1.0).merge(a, b, valid)  # gamma=1: nothing retained
    assert not merged.retained.any()
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1)
    omega = torch.arccos(cos)  # float64: arccos near 1 is imprecise in float32
    for which, x, share in ((0, a, t), (1, b, 1 - t)):
        err = (merged.restore(which).double() - x.double()).norm(dim=-1)
        # the merged direction sits share * omega away from the layer's own: a chord of that angle
        bound = x.double().norm(dim=-1) * 2 * torch.sin(share * omega / 2)
        assert torch.allclose(err[:, :, 5:], bound[:, :, 5:], atol=1e-4)
        assert (err[:, :, 5:] > 0).all()
    # retained tokens come back exactly
    merged = MiniCache(t=t, gamma=0.0).merge(a, b, valid)
    kept = merged.retained
    assert torch.allclose(merged.restore(0, a)[kept], a[kept]) and torch.allclose(merged.restore(1, b)[kept], b[kept])


@pytest.mark.parametrize("start, layers, pairs", [("50%", 6, [(3, 4)]), ("0", 4, [(0, 1), (2, 3)]),
                                                  ("1", 4, [(1, 2)]), ("50%", 32, [(i, i + 1) for i in range(16, 31, 2)])])
def test_pairs_follow_start(start, layers, pairs):
    assert parse(f"minicache(start={start})").merger.pairs(layers) == pairs


def tiny_llama(layers=4, head_dim=16):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,))))
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    return model


def merging_is_smaller(retained, valid, d, itemsize=4, index_bytes=4):
    """The size rule, counted by hand for an uncompressed store: per real token a pair holds 2 * d
    values unmerged, or one direction of d values and 2 norms merged, plus per retained token its
    index and both layers' d values. ``retained``: per role ``[B, H, N]``."""
    real = int(valid.sum()) * retained[0].shape[1]  # real (sequence, head, token) slots per role
    plain = len(retained) * real * 2 * d * itemsize
    merged = sum(real * (d + 2) * itemsize + int(r.sum()) * (index_bytes + 2 * d * itemsize) for r in retained)
    return merged < plain


@pytest.mark.parametrize("gammas", [(0.7, 1.0), (0.0, 0.05)], ids=["few-retained", "most-retained"])
@torch.no_grad()
def test_hf_decode_equals_dynamic_cache_rebuilt_by_the_naive_merge(gen, gammas):
    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 40), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    t = float(torch.rand(1, generator=gen))
    gamma = gammas[0] + (gammas[1] - gammas[0]) * float(torch.rand(1, generator=gen))
    spec = f"minicache(start=0, t={t}, gamma={gamma})"
    cache = kvplug.hf.cache(model, spec)
    first = model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
    mask2 = torch.cat([mask, torch.ones_like(first)], 1)
    ours = model(first, attention_mask=mask2, past_key_values=cache).logits

    reference = DynamicCache(config=model.config)
    model(ids, attention_mask=mask, past_key_values=reference)
    valid = mask.bool()
    merged_here = 0
    for la, lb in parse(spec).merger.pairs(4):
        rebuilt = {}
        retained_per_role = []
        for role in ("keys", "values"):
            xa, xb = getattr(reference.layers[la], role), getattr(reference.layers[lb], role)
            direction, mags, retained, *_ = naive_merge(xa, xb, valid, t, gamma)
            retained_per_role.append(retained)
            for layer, which, x in ((la, 0, xa), (lb, 1, xb)):
                rebuilt[layer, role] = torch.where(retained[..., None], x.double(), direction * mags[which][..., None])
        if merging_is_smaller(retained_per_role, valid, d=model.config.head_dim):  # else both keep their own
            merged_here += 1
            for (layer, role), x in rebuilt.items():
                setattr(reference.layers[layer], role, x.float())
    # the draws of gamma put every pair on one side of the size rule: few retained tokens merge, most do not
    assert merged_here == (2 if gammas[0] > 0.5 else 0)
    assert cache.merged_pairs() == (merged_here, 2)
    expected = model(first, attention_mask=mask2, past_key_values=reference).logits
    assert torch.allclose(ours, expected, atol=2e-4), (ours - expected).abs().max()
    plain = DynamicCache(config=model.config)
    model(ids, attention_mask=mask, past_key_values=plain)
    uncompressed = model(first, attention_mask=mask2, past_key_values=plain).logits
    assert torch.allclose(ours, uncompressed, atol=2e-4) == (merged_here == 0)


def test_merged_layers_count_once_in_memory(gen):
    model = tiny_llama(layers=5)  # pairs (3, 4) at start=50%: layers 0-2 unmerged
    ids = torch.randint(0, 96, (1, 64), generator=gen)
    cache = kvplug.hf.cache(model, "minicache(gamma=1.0)")  # nothing retained
    model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=3, do_sample=False)
    h, d, e, prompt, total = 2, 16, 4, 64, 66  # fp32 model: 4 bytes an element; the 3rd new token is never fed back
    unmerged = 3 * 2 * h * d * e * total
    merged_pair = 2 * (h * prompt * d * e + 2 * h * prompt * e)  # K and V: one direction + two norms per token
    own_tail = 2 * 2 * h * d * e * (total - prompt)  # tokens generated after the merge stay per layer
    assert cache.stored_bytes() == unmerged + merged_pair + own_tail
    assert cache.kept_tokens() == 5 * h * total


def test_minicache_composes_with_kivi_and_refuses_eviction(gen):
    model = tiny_llama(layers=4, head_dim=64)
    ids = torch.randint(0, 96, (1, 300), generator=gen)
    sizes = {}
    for spec in ("kivi(bits=2, residual=32)", "minicache(start=0, gamma=1.0)+kivi(bits=2, residual=32)"):
        cache = kvplug.hf.cache(model, spec)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=4,
                             do_sample=False)
        assert out.shape == (1, 304)
        sizes[spec] = cache.stored_bytes()
    h, quantized, residual = 2, (300 - 32) // 32 * 32, 303 - (300 - 32) // 32 * 32  # the 4th new token is not fed
    code = parse("kivi(bits=2)").codec.bytes_per_token(64)  # K+V codes and scales of one token-head
    full = 2 * 64 * 4  # the residual window in fp32
    assert sizes["kivi(bits=2, residual=32)"] == 4 * h * (quantized * code + residual * full)
    # two pairs: one quantized direction per token + four fp16 norms (K and V, both layers)
    merged = 2 * h * quantized * (code + 4 * 2) + 4 * h * residual * full
    assert sizes["minicache(start=0, gamma=1.0)+kivi(bits=2, residual=32)"] == merged
    with pytest.raises(SpecError, match="minicache merges every prompt token"):
        parse("snapkv(budget=25%)+minicache")
    with pytest.raises(SpecError, match="merges no layer pair of this 4-layer model"):
        kvplug.hf.cache(model, "minicache(start=4)")


def test_a_pair_whose_merge_would_not_be_smaller_stays_unmerged(gen):
    """gamma=0 retains nearly every token, so the shared direction and norms only add bytes: the
    pair keeps each layer's own K/V, holds exactly what the unmerged layers would, and generates
    the tokens of the plain cache; with gamma=1 (nothing retained) the pair merges and is smaller.
    The merged pairs are counted."""
    model = tiny_llama(layers=4)
    ids = torch.randint(0, 96, (1, 64), generator=gen)
    runs = {}
    for spec in ("none", "minicache(start=2, gamma=0.0)", "minicache(start=2, gamma=1.0)"):
        cache = kvplug.hf.cache(model, spec)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=6,
                             do_sample=False)
        runs[spec] = (out, cache)
    plain_out, plain = runs["none"]
    out, kept = runs["minicache(start=2, gamma=0.0)"]
    assert kept.merged_pairs() == (0, 1)
    assert kept.stored_bytes() == plain.stored_bytes()
    assert torch.equal(out, plain_out)
    out, merged = runs["minicache(start=2, gamma=1.0)"]
    assert merged.merged_pairs() == (1, 1)
    assert merged.stored_bytes() < plain.stored_bytes()
    assert plain.merged_pairs() == (0, 0)


def test_minicache_defaults_never_hold_more_than_none(gen):
    """The issue's case: a random 6-layer Llama and a 300-token prompt, where every pair merged
    and held 555,552 bytes against none's 465,408."""
    model = tiny_llama(layers=6)
    ids = torch.randint(0, 96, (1, 300), generator=gen)
    sizes = {}
    for spec in ("none", "minicache"):
        cache = kvplug.hf.cache(model, spec)
        model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=4,
                       do_sample=False)
        sizes[spec] = (cache.stored_bytes(), cache.merged_pairs())
    print(sizes)
    assert sizes["minicache"][0] <= sizes["none"][0]
