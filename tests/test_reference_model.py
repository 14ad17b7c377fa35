"""The shipped reference model (models/kvplug-ref) and the lookup task generator (kvplug.retrieval).

CPU only, a few seconds: the checkpoint is ~6 M parameters.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from kvplug.retrieval import PAIR_LINE, QUERY_LINE, LookupTask, _key_split, load_heldout_ids  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "models" / "kvplug-ref"


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(MODEL))


@pytest.fixture(scope="module")
def heldout(tokenizer):
    return load_heldout_ids(str(MODEL), tokenizer)


@pytest.fixture(scope="module")
def model():
    m = transformers.AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32)
    return m.eval()


def test_config_and_files():
    cfg = transformers.AutoConfig.from_pretrained(str(MODEL))
    assert cfg.model_type == "llama"
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert cfg.num_key_value_heads >= 2
    assert cfg.num_attention_heads == 4 * cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert head_dim in (64, 128)
    assert cfg.max_position_embeddings >= 8192
    assert cfg.tie_word_embeddings
    assert (MODEL / "model.safetensors").stat().st_size <= 12_000_000
    assert (MODEL / "heldout.txt").stat().st_size <= 2_000_000


def test_tokenizer(tokenizer):
    assert 4096 <= len(tokenizer) <= 16384
    text = "def f(x):\n    return x + 12345  # caf\u00e9\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    digits = tokenizer.encode("58213", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in digits] == list("58213")


def test_model_is_tied_and_loaded(model):
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n <= 6_000_000


@pytest.mark.parametrize("length,depth", [(1024, 0.0), (1024, 0.37), (2048, 0.5), (4096, 0.81), (8192, 1.0)])
def test_generator(tokenizer, heldout, length, depth):
    task = LookupTask(tokenizer)
    rng = random.Random(length * 1000 + int(depth * 100))
    s = task.sample(heldout, length, depth, rng, split="eval")
    assert len(s.prompt_ids) + len(s.answer_ids) == length
    # the needle is where the sample says, at the requested depth (to within a line)
    line = PAIR_LINE.format(key=s.key, value=s.answer_text)
    n_line = len(task.pair_ids(s.key, s.answer_text))
    assert tokenizer.decode(s.prompt_ids[s.needle_position:s.needle_position + n_line]) == line
    assert s.needle_depth == pytest.approx(s.needle_position / len(s.prompt_ids))
    assert abs(s.needle_position - depth * len(s.prompt_ids)) <= max(64, 0.03 * length)
    # the answer is exactly the value, and the prompt ends with the query for the needle's key
    assert tokenizer.decode(s.answer_ids) == s.answer_text
    assert len(s.answer_text) == 5 and s.answer_text.isdigit()
    text = tokenizer.decode(s.prompt_ids)
    assert text.endswith("\n" + QUERY_LINE.format(key=s.key))
    assert text.count(line) == 1
    assert text.count(s.key) == 2  # once in its pair line, once in the query
    # distractors: distinct keys and values, each present once, all from the evaluation key space
    assert len(s.pairs) == task.n_pairs
    assert len({p.key for p in s.pairs}) == len(s.pairs) == len({p.value for p in s.pairs})
    for p in s.pairs:
        assert _key_split(p.key) == "eval"
        assert text.count(PAIR_LINE.format(key=p.key, value=p.value)) == 1
        assert tokenizer.decode(s.prompt_ids[p.position:p.position + 2]).startswith("\n#")


def test_key_spaces_are_disjoint(tokenizer):
    task = LookupTask(tokenizer)
    rng = random.Random(0)
    train = {task.random_key(rng, "train") for _ in range(300)}
    evals = {task.random_key(rng, "eval") for _ in range(300)}
    assert not train & evals
    assert all(_key_split(k) == "train" for k in train)


def test_greedy_retrieval_at_1k(model, tokenizer, heldout):
    task = LookupTask(tokenizer)
    s = task.sample(heldout, 1024, 0.5, random.Random(20261123), split="eval")
    x = torch.tensor([s.prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=len(s.answer_ids),
                             min_new_tokens=len(s.answer_ids), do_sample=False, pad_token_id=0, eos_token_id=None)
    got = out[0, x.size(1):].tolist()
    assert tokenizer.decode(got) == s.answer_text, (tokenizer.decode(got), s.answer_text)
    assert got == s.answer_ids
