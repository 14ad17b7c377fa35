"""Learned parts (issue 24): the weights contract of :mod:`kvplug.learned` and ``attention_gate``.

The gate's kept set is compared with a naive float64 loop over tokens and features (not the
scorer's einsum), on the K/V a plain transformers forward gives; the training script's student
forward (its own Llama layers with a bias on the attention logits) is compared with transformers'
forward, since the gates it trains are only as right as that copy of the model.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvplug.hf
from conftest import write_random_weights
from kvplug import SpecError, learned, parse
from kvplug.scorers.attention_gate import AttentionGate
from kvplug.scorers.base import ScoreInputs

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)


def write_gate(path: Path, layers: int, heads: int, dim: int, gen: torch.Generator, **meta) -> dict[str, torch.Tensor]:
    """Random gate weights for this shape, written to ``path``; returns the tensors as saved."""
    write_random_weights(path, AttentionGate, layers, heads, dim, gen, **meta)
    return {k: v.clone() for k, v in learned.load(str(path), "attention_gate").tensors.items()}


def naive_logit(k: list[float], v: list[float], w: dict, layer: int, head: int) -> float:
    """The gate's logit for one token, one scalar at a time in float64."""
    half = len(k) // 2
    feats = [math.sqrt(k[i] ** 2 + k[i + half] ** 2) for i in range(half)] + list(v)
    w1, b1 = w["w1"][layer, head].double().tolist(), w["b1"][layer, head].double().tolist()
    w2, b2 = w["w2"][layer, head].double().tolist(), float(w["b2"][layer, head])
    out = b2
    for m in range(len(b1)):
        pre = b1[m] + sum(feats[f] * w1[f][m] for f in range(len(feats)))
        out += 0.5 * pre * (1 + math.erf(pre / math.sqrt(2))) * w2[m]
    return out


def test_gate_keeps_the_window_and_the_top_logits_of_a_naive_loop(tmp_path, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    path = tmp_path / "gate.safetensors"
    w = write_gate(path, 2, 2, 16, gen)
    # distinct tokens: layer 0's K/V depend on the token alone, and the rotary pairs' norms drop the
    # position, so a repeated token would tie with itself there
    ids = torch.stack([torch.randperm(95, generator=gen)[:70] + 1 for _ in range(2)])
    mask = torch.ones_like(ids)
    mask[1, :11] = 0  # left padding
    budget, window = 20, 5
    cache = kvplug.hf.cache(model, f"attention_gate(budget={budget}, window={window}, weights='{path}')")
    plain = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        model(input_ids=ids, attention_mask=mask, past_key_values=plain)
    for li, layer in enumerate(cache.layers):
        keys, values = plain.layers[li].keys, plain.layers[li].values  # [B, Hkv, T, D]
        for b in range(2):
            n = int(mask[b].sum())
            first = ids.shape[1] - n
            for h in range(2):
                logits = [naive_logit(keys[b, h, first + j].double().tolist(), values[b, h, first + j].double().tolist(),
                                      w, li, h) for j in range(n)]
                older = sorted(range(n - window), key=lambda j: -logits[j])[: budget - window]
                expect = sorted(older + list(range(n - window, n)))
                kept = sorted(p for p in layer.slots.positions[b, h].tolist() if p >= 0)
                assert kept == expect, (li, b, h)
    with torch.no_grad():  # and generation runs over the kept set
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                             past_key_values=kvplug.hf.cache(model, f"attention_gate(budget={budget}, weights='{path}')"))
    assert out.shape == (2, 74)


def _inputs(layers: int, heads: int, dim: int, t: int = 12) -> ScoreInputs:
    return ScoreInputs(keys=torch.randn(1, heads, t, dim), values=torch.randn(1, heads, t, dim),
                       queries=torch.randn(1, heads, 0, dim), valid=torch.ones(1, t, dtype=torch.bool),
                       scale=dim ** -0.5, layer_idx=0, num_layers=layers)


@pytest.mark.parametrize("model", [(3, 2, 16), (2, 1, 16), (2, 2, 32)])
def test_weights_for_another_model_are_refused_in_one_line(tmp_path, gen, model):
    path = tmp_path / "gate.safetensors"
    write_gate(path, 2, 2, 16, gen, trained_for="model-a")
    scorer = parse(f"attention_gate(budget=4, weights='{path}')").scorer
    assert scorer.score(_inputs(2, 2, 16)).shape == (1, 2, 12)  # its own shape runs
    with pytest.raises(SpecError) as e:
        scorer.score(_inputs(*model))
    msg = str(e.value)
    assert "\n" not in msg and "model-a" in msg and "num_layers=2, num_kv_heads=2, head_dim=16" in msg
    layers, heads, dim = model
    assert f"num_layers={layers}, num_kv_heads={heads}, head_dim={dim}" in msg


def test_bad_weight_files_are_refused_in_one_line(tmp_path, gen):
    pickled = tmp_path / "gate.pt"
    torch.save({"w1": torch.zeros(1)}, pickled)
    bad = {"pickled": f"weights='{pickled}'", "missing": f"weights='{tmp_path / 'nope.safetensors'}'",
           "unknown name": "weights=no-such-gate"}
    for why, arg in bad.items():
        with pytest.raises(SpecError) as e:  # when the spec is read, before any model is seen
            parse(f"attention_gate({arg})")
        assert "\n" not in str(e.value), why
    assert "pickle" in str(pytest.raises(SpecError, lambda: learned.load(str(pickled), "attention_gate")).value)
    w = write_gate(tmp_path / "clean.safetensors", 2, 2, 16, gen)  # (a file rewritten within one clock tick
    # of its first read could be served from the read cache: each case gets a file of its own)
    w["w2"][0, 0, 0] = float("nan")
    learned.save(str(tmp_path / "nan.safetensors"), "attention_gate", w, num_layers=2, num_kv_heads=2, head_dim=16)
    learned.save(str(tmp_path / "short.safetensors"), "attention_gate", {"w1": w["w1"]}, num_layers=2)
    learned.save(str(tmp_path / "other.safetensors"), "another_part", w)
    for name, needle in (("nan", "NaN"), ("short", "no tensor 'b1'"), ("other", "another_part")):
        with pytest.raises(SpecError, match=needle) as e:
            parse(f"attention_gate(weights='{tmp_path / name}.safetensors')").scorer.score(_inputs(2, 2, 16))
        assert "\n" not in str(e.value)


def test_shipped_gate_fits_the_reference_model():
    """The default weights are the reference model's: 6 layers x 2 KV heads x head_dim 64, <= 1 MB."""
    path = learned.resolve("kvplug-ref", "attention_gate")
    assert Path(path).stat().st_size <= 1 << 20
    w = parse("attention_gate").scorer.gate()
    w.check(num_layers=6, num_kv_heads=2, head_dim=64)
    assert w.meta["trained_for"] == "kvplug-ref"
    with pytest.raises(SpecError):
        w.check(num_layers=2, num_kv_heads=2, head_dim=64)


def test_training_student_forward_equals_transformers(gen):
    """With no bias the trainer's student (its own Llama layers over the teacher's K/V) gives the
    logits transformers gives at the same positions; a bias of -inf on a token removes it."""
    sys.path.insert(0, str(REPO / "benchmarks" / "reference_model"))
    from train_attention_gate import student, teacher

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    x = torch.randint(1, 96, (2, 40), generator=gen)
    starts, cont = torch.tensor([10, 25]), 12
    with torch.no_grad():
        logits, kv = teacher(model, x)
        zero = [torch.zeros(2, 2, 40) for _ in kv]
        got = student(model, x, starts, cont, kv, zero)
        for b in range(2):
            s = int(starts[b])
            torch.testing.assert_close(got[b], logits[b, s:s + cont], atol=1e-5, rtol=1e-5)
        # hiding token 3 from the continuation equals a forward whose attention never sees it
        hide = [z.clone() for z in zero]
        for h in hide:
            h[:, :, 3] = float("-inf")
        got = student(model, x, starts, cont, kv, hide)
        mask = torch.ones(40, 40).tril().bool()
        mask[10:, 3] = False  # every query from the first continuation on (row 0 starts at 10)
        ref = model(input_ids=x[:1], attention_mask=mask[None, None]).logits
    torch.testing.assert_close(got[0], ref[0, 10:22], atol=1e-5, rtol=1e-5)
