"""Layer-Condensed KV (issue 24): the model kvplug registers against a naive float64 loop.

The reference computes the LCKV definition one token at a time in float64 from the model's
weights with scalar-level loops (RMSNorm, RoPE, GQA attention over a zero dummy and the earlier
tokens' top-layer K/V, SwiGLU), sharing no code with the model.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import kvplug.hf  # noqa: F401  (registers kvplug_lckv)
from kvplug import SpecError
from kvplug.adapters.hf.lckv import LckvConfig, LckvForCausalLM
from kvplug.memory import held_bytes

CFG = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rope_parameters={"rope_type": "default",
                                                                                           "rope_theta": 10000.0},
           tie_word_embeddings=True, bos_token_id=0, eos_token_id=None, pad_token_id=0)


EXACT = dict(atol=1e-5, rtol=1e-5)
"""float64 but for RoPE's angles, which transformers' rotary embedding computes in float32 (~1e-7)."""


def tiny(gen, **kw) -> LckvForCausalLM:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = LckvForCausalLM(LckvConfig(**{**CFG, **kw})).eval()
    with torch.no_grad():  # larger weights than the default init, so that attention is not uniform
        for p in model.parameters():
            p.mul_(3.0) if p.dim() > 1 else None
    return model


def naive_logits(model, ids: list[int]) -> list[list[float]]:
    """Logits per position of the LCKV definition, token by token, float64 scalars."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    hq, hkv, d, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    theta = cfg.rope_parameters["rope_theta"]
    top = len(model.model.layers) - 1

    def mat(w, x):  # y = W x
        return [sum(w[i][j] * x[j] for j in range(len(x))) for i in range(len(w))]

    def rms(x, w):
        s = math.sqrt(sum(v * v for v in x) / len(x) + eps)
        return [x[i] / s * w[i] for i in range(len(x))]

    def rope(v, pos):  # HF's rotate_half layout: dims i and i + d/2 rotate together
        half = d // 2
        out = list(v)
        for i in range(half):
            ang = pos / theta ** (2 * i / d)
            c, s = math.cos(ang), math.sin(ang)
            out[i] = v[i] * c - v[i + half] * s
            out[i + half] = v[i + half] * c + v[i] * s
        return out

    def w(name):
        return sd[name].tolist()

    top_k, top_v, logits = [], [], []  # top_k[t][head] = rotated key of token t
    for t, tok in enumerate(ids):
        h = sd["model.embed_tokens.weight"][tok].tolist()
        for li in range(len(model.model.layers)):
            pre = f"model.layers.{li}."
            r = rms(h, w(pre + "input_layernorm.weight"))
            q = mat(w(pre + "self_attn.q_proj.weight"), r)
            if li == top:
                k_new = mat(w(pre + "self_attn.k_proj.weight"), r)
                v_new = mat(w(pre + "self_attn.v_proj.weight"), r)
            heads_out = []
            for head in range(hq):
                kv = head // (hq // hkv)
                qh = rope(q[head * d:(head + 1) * d], t)
                scores = [0.0] + [sum(qh[i] * top_k[s][kv][i] for i in range(d)) / math.sqrt(d) for s in range(t)]
                m = max(scores)
                e = [math.exp(x - m) for x in scores]
                z = sum(e)
                o = [sum(e[s + 1] * top_v[s][kv][i] for s in range(t)) / z for i in range(d)]  # the dummy's value is 0
                heads_out += o
            h = [a + b for a, b in zip(h, mat(w(pre + "self_attn.o_proj.weight"), heads_out))]
            r = rms(h, w(pre + "post_attention_layernorm.weight"))
            g, u = mat(w(pre + "mlp.gate_proj.weight"), r), mat(w(pre + "mlp.up_proj.weight"), r)
            act = [gi / (1 + math.exp(-gi)) * ui for gi, ui in zip(g, u)]
            h = [a + b for a, b in zip(h, mat(w(pre + "mlp.down_proj.weight"), act))]
            if li == top:
                top_k.append([rope(k_new[kv * d:(kv + 1) * d], t) for kv in range(hkv)])
                top_v.append([v_new[kv * d:(kv + 1) * d] for kv in range(hkv)])
        logits.append(mat(w("lm_head.weight"), rms(h, w("model.norm.weight"))))
    return logits


def test_generation_step_by_step_equals_the_naive_loop(gen):
    model = tiny(gen).double()
    ids = torch.randint(1, 50, (1, 12), generator=gen)
    ref = torch.tensor(naive_logits(model, ids[0].tolist()), dtype=torch.float64)
    cache = DynamicCache()
    got = []
    with torch.no_grad():
        for t in range(ids.shape[1]):  # one token at a time: the exact path
            got.append(model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[0, -1])
    torch.testing.assert_close(torch.stack(got), ref, **EXACT)


def test_a_prompt_in_parallel_is_exact_for_as_many_tokens_as_iterations(gen):
    """After k passes the first k tokens are exact; with passes >= the prompt, all of them; then
    generation continues exactly from the cached top-layer K/V."""
    ids = torch.randint(1, 50, (1, 10), generator=gen)
    model = tiny(gen, lckv_iterations=4, lckv_grad_iterations=1).double()
    ref = torch.tensor(naive_logits(model, ids[0].tolist()), dtype=torch.float64)
    with torch.no_grad():
        out = model(input_ids=ids).logits[0]
        torch.testing.assert_close(out[:4], ref[:4], **EXACT)
        assert (out[4:] - ref[4:]).abs().max() > 1e-3  # the approximation is real beyond that
        model.config.lckv_iterations = 10
        cache = DynamicCache()
        out = model(input_ids=ids[:, :7], past_key_values=cache, use_cache=True).logits[0]
        torch.testing.assert_close(out, ref[:7], **EXACT)
        rest = model(input_ids=ids[:, 7:], past_key_values=cache, use_cache=True).logits[0]  # 3 more, with a past
        torch.testing.assert_close(rest, ref[7:], **EXACT)


def test_the_cache_holds_one_layers_kv_in_bytes(gen):
    model = tiny(gen)
    ids = torch.randint(1, 50, (2, 20), generator=gen)
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    cfg = model.config
    tokens = 20 + 6 - 1  # the last generated token is not stored
    one_layer = 2 * tokens * cfg.num_key_value_heads * cfg.head_dim * 2 * 4  # B=2, K and V, float32
    assert held_bytes(cache) == one_layer
    assert held_bytes(cache) * cfg.num_hidden_layers == 2 * tokens * cfg.num_hidden_layers * cfg.num_key_value_heads \
        * cfg.head_dim * 2 * 4  # a Llama of the same shape: num_hidden_layers times as much


def test_saved_model_loads_through_auto_classes_and_refuses_padding(gen, tmp_path):
    model = tiny(gen)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again) is LckvForCausalLM
    assert not hasattr(again.model.layers[0].self_attn, "k_proj") and hasattr(again.model.layers[-1].self_attn, "k_proj")
    ids = torch.randint(1, 50, (1, 9), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        with pytest.raises(SpecError, match="padded"):
            model(input_ids=ids, attention_mask=mask)
    with pytest.raises(SpecError, match="kvplug_lckv") as e:  # kvplug's strategies: not on this model yet
        kvplug.hf.cache(model, "int4")
    assert "\n" not in str(e.value)


def test_training_backpropagates_through_the_last_iterations_only(gen):
    model = tiny(gen, lckv_iterations=3, lckv_grad_iterations=2).train()
    ids = torch.randint(1, 50, (2, 16), generator=gen)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    top = model.model.layers[-1].self_attn
    assert top.k_proj.weight.grad is not None and top.k_proj.weight.grad.abs().sum() > 0  # K/V learn (2 passes)
    with pytest.raises(SpecError):
        LckvConfig(**CFG, lckv_iterations=2, lckv_grad_iterations=3)


def test_kvplug_eval_runs_none_on_its_own_cache_and_refuses_strategies(gen, tmp_path):
    """``kvplug eval`` on an LCKV checkpoint: 'none' only, its decode likelihood that of the naive
    loop (a prompt no longer than the passes is exact), the K/V bytes one layer's, exactly."""
    import json
    import shutil
    from pathlib import Path

    from kvplug.cli import main as cli
    from kvplug.eval import EvalSettings, measure
    from kvplug.eval.runner import load

    ref = Path(__file__).resolve().parents[1] / "models" / "kvplug-ref"
    if not (ref / "tokenizer.json").exists():
        pytest.skip("reference tokenizer not present")
    tiny(gen, vocab_size=6144, lckv_iterations=12).save_pretrained(tmp_path)  # the tokenizer's vocabulary
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ref / name, tmp_path)
    text = tmp_path.parent / f"{tmp_path.name}-text.txt"  # held-out text named by --heldout, not beside the model
    text.write_text((ref / "heldout.txt").read_text()[:100_000])
    with pytest.raises(SpecError, match="--heldout FILE"):
        load(EvalSettings(model=str(tmp_path), device="cpu"))

    model, _, _ = load(EvalSettings(model=str(tmp_path), device="cpu", heldout=str(text)))
    ids = torch.randint(1, 6144, (1, 16), generator=gen)
    prompt = measure.Prompt(model, ids[:, :12])
    nll = measure.decode_nll(prompt, "none", ids[:, 12:])
    logits = torch.tensor(naive_logits(model, ids[0].tolist()), dtype=torch.float64)
    want = float(torch.nn.functional.cross_entropy(logits[11:15], ids[0, 12:]))
    assert nll == pytest.approx(want, rel=1e-4)
    assert measure.decode_nll(prompt, "none", ids[:, 12:]) == nll  # the prompt's cache is copied, not consumed
    with pytest.raises(SpecError, match="only 'none'"):
        measure.decode_nll(prompt, "int4", ids[:, 12:])

    out = tmp_path / "run"
    assert cli(["eval", "--model", str(tmp_path), "--strategies", "int4", "--tasks", "perplexity,memory",
                "--contexts", "64", "--device", "cpu", "--heldout", str(text), "--out", str(out)]) == 0
    by_name = {r["strategy"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert not by_name["int4"]["ok"] and "only 'none'" in by_name["int4"]["error"]
    mem = by_name["none"]["memory"]["64"]
    cfg = model.config
    assert mem["kv_bytes"] == (64 + 16) * cfg.num_key_value_heads * cfg.head_dim * 2 * 4  # one layer, K and V, fp32
    assert mem["ratio_vs_dynamic"] == cfg.num_hidden_layers  # against a Llama of the same shape


def test_the_shipped_model_s_prompt_passes_reach_its_exact_decoding():
    """models/kvplug-ref-lckv: a prompt run in the config's parallel passes gives the likelihood of
    exact token-by-token decoding (the passes converged; the 3-pass model before its 7-pass
    fine-tune did not, docs/EVALUATION.md), and far fewer passes do not."""
    import random
    from pathlib import Path

    from transformers import AutoTokenizer

    from kvplug.retrieval import load_heldout_ids

    root = Path(__file__).resolve().parents[1] / "models"
    if not (root / "kvplug-ref-lckv" / "model.safetensors").exists():
        pytest.skip("models/kvplug-ref-lckv not present")
    model = AutoModelForCausalLM.from_pretrained(root / "kvplug-ref-lckv", dtype=torch.float32).eval()
    assert type(model) is LckvForCausalLM and model.config.lckv_iterations == 7
    source = load_heldout_ids(str(root / "kvplug-ref"), AutoTokenizer.from_pretrained(root / "kvplug-ref-lckv"))
    seed = random.randrange(10**6)
    print(f"window seed={seed}")
    start = random.Random(seed).randrange(len(source) - 200)
    ids = torch.tensor([source[start:start + 200]])

    def nll(logits):
        return float(torch.nn.functional.cross_entropy(logits[0].float(), ids[0, 1:]))

    with torch.no_grad():
        parallel = nll(model(input_ids=ids).logits[:, :-1])
        cache = DynamicCache()
        exact = nll(torch.cat([model(input_ids=ids[:, t:t + 1], past_key_values=cache).logits
                               for t in range(ids.shape[1] - 1)], 1))
        model.config.lckv_iterations = 2
        two = nll(model(input_ids=ids).logits[:, :-1])
    assert parallel == pytest.approx(exact, rel=0.01)
    assert two > exact + 0.5


@pytest.mark.vllm
def test_vllm_refuses_an_lckv_checkpoint_in_one_line(gen, tmp_path):
    """vLLM has no model for it: start-up stops in the user's process with kvplug's one line (not
    transformers' "does not recognize this architecture")."""
    pytest.importorskip("vllm")
    import subprocess
    import sys

    from test_vllm_engine import _tokenizer

    tiny(gen).save_pretrained(tmp_path)
    _tokenizer(tmp_path)
    code = (f"from vllm import LLM\nLLM(model={str(tmp_path)!r}, dtype='float32', max_model_len=128, "
            "enforce_eager=True)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("kvplug.adapters.vllm.StartupError: kvplug_lckv (Layer-Condensed KV"), out.stderr[-2000:]
    assert "does not run in vLLM yet" in last
