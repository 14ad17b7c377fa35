"""``kvplug eval`` checks itself: decode perplexity, exact-match retrieval, schema, failures."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from kvplug.cli import main as cli
from kvplug.eval import EvalSettings, inputs, measure, validate
from kvplug.eval.runner import load

REF = Path(__file__).resolve().parents[1] / "models" / "kvplug-ref"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random Llama with the reference tokenizer and held-out text beside it."""
    if not (REF / "tokenizer.json").exists():
        pytest.skip("reference tokenizer not present")
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                                 max_position_embeddings=4096)).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REF / name, path)
    (path / "heldout.txt").write_text((REF / "heldout.txt").read_text()[:200_000])
    return path


def test_decode_perplexity_of_none_equals_full_forward(tiny_model):
    import random

    model, _, source = load(EvalSettings(model=str(tiny_model), device="cpu"))
    ids = inputs.windows(source, 300, 3, random.Random(1), "cpu")
    prompt = measure.Prompt(model, ids[:, :200])
    nll = measure.decode_nll(prompt, "none", ids[:, 200:])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, 199:-1]
    full = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 200:].reshape(-1))
    assert math.isclose(nll, float(full), rel_tol=1e-4)
    assert measure.decode_nll(prompt, "int4", ids[:, 200:]) != pytest.approx(float(full), rel=1e-6)


def test_forked_cache_equals_a_fresh_run(tiny_model):
    import random

    model, _, source = load(EvalSettings(model=str(tiny_model), device="cpu"))
    ids = inputs.windows(source, 160, 2, random.Random(2), "cpu")
    prompt = measure.Prompt(model, ids)
    forked, _ = measure.greedy(prompt, "snapkv(budget=40, window=8)+int4", 12)
    import kvplug.hf

    model.generation_config.eos_token_id = None  # random weights: never stop early on an "EOS"
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         past_key_values=kvplug.hf.cache(model, "snapkv(budget=40, window=8)+int4"), pad_token_id=0)
    assert torch.equal(forked, out[:, 160:])


def test_layout_prefixes_choose_the_paged_layout_or_the_reference_path(tiny_model):
    import random

    from kvplug.adapters.hf.store import PagedStore, SlotStore

    model, _, source = load(EvalSettings(model=str(tiny_model), device="cpu"))
    model = model.to(torch.bfloat16)  # the paged layout holds 16-bit models
    ids = inputs.windows(source, 120, 2, random.Random(3), "cpu")
    prompt = measure.Prompt(model, ids[:, :100])
    assert isinstance(prompt.cache_for("paged:int8").layers[0].slots, PagedStore)
    assert isinstance(prompt.cache_for("ref:int8").layers[0].slots, SlotStore)
    assert isinstance(prompt.cache_for("int8").layers[0].slots, SlotStore)  # the default off CUDA
    # the same codes read two ways (both in float32 on the CPU): the same likelihood
    paged, slots = (measure.decode_nll(prompt, name, ids[:, 100:]) for name in ("paged:int8", "int8"))
    assert paged == pytest.approx(slots, rel=1e-5)


def test_only_the_exact_value_counts(tiny_model):
    import random

    _, tokenizer, source = load(EvalSettings(model=str(tiny_model), device="cpu"))
    samples = inputs.lookup_samples(tokenizer, source, random.randrange(10**6), 512, 0.5, 6)
    answers = torch.tensor([s.answer_ids for s in samples])
    assert inputs.exact_matches(answers, samples) == 6
    wrong = answers.clone()
    wrong[::2, -1] += 1  # one wrong digit in half the rows: those do not count at all
    assert inputs.exact_matches(wrong, samples) == 3


def test_evaluate_writes_valid_results_and_reports_failures(tiny_model, tmp_path):
    out = tmp_path / "run"
    code = cli(["eval", "--model", str(tiny_model), "--strategies", "int4,int4(group=48),snapkv(budget=25%)",
                "--contexts", "256", "--depths", "0.5", "--trials", "2", "--device", "cpu", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    validate(results)
    by_name = {r["strategy"]: r for r in results["results"]}
    assert list(by_name) == ["none", "int4", "int4(group=48)", "snapkv(budget=25%)"]
    assert not by_name["int4(group=48)"]["ok"] and "group=48" in by_name["int4(group=48)"]["error"]
    assert by_name["snapkv(budget=25%)"]["ok"]
    assert by_name["none"]["perplexity"]["256"]["delta_vs_none"] == 0
    assert by_name["none"]["agreement"]["256"]["share"] == 1.0
    mem = by_name["int4"]["memory"]["256"]
    assert mem["ratio_vs_dynamic"] == pytest.approx(4 * 64 * 2 / (2 * (32 + 4)))  # fp32 model vs int4 + meta
    snap = by_name["snapkv(budget=25%)"]["memory"]["256"]
    assert snap["kv_bytes"] < by_name["none"]["memory"]["256"]["kv_bytes"] * 0.4
    assert snap["bookkeeping_bytes"] > 0 and by_name["none"]["memory"]["256"]["bookkeeping_bytes"] > 0
    assert (out / "quality_vs_memory.png").stat().st_size > 1000
    assert (out / "retrieval_int4.png").exists()
    assert cli(["eval", "--compare", str(out / "results.json"), str(out / "results.json"), "--out", str(tmp_path / "c")]) == 0
    from transformers import AutoConfig

    from kvplug.eval import report

    assert results["trained_length"] == AutoConfig.from_pretrained(tiny_model).max_position_embeddings
    headers = [c.header for c in report.table([results]).columns]
    assert "ppl @256 (vs none)" in headers and not any("beyond" in h for h in headers)
    results["trained_length"] = 128  # as if 256 were past what the model was trained for
    headers = [c.header for c in report.table([results]).columns]
    assert "ppl @256 (vs none) (beyond trained length)" in headers
    assert str(tmp_path) not in report.table([results]).title  # the model's name, not its path
    assert report.plots([results], tmp_path / "p")[0].stat().st_size > 1000


def test_bad_settings_are_one_line_errors(capsys):
    assert cli(["eval", "--tasks", "speed"]) == 2
    assert "unknown task 'speed'" in capsys.readouterr().err
    assert cli(["eval", "--strategies", "int5"]) == 2
