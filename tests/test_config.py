"""The spec parser: every accepted form, one-line errors, and property tests."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvplug import SpecError, parse
from kvplug.codecs.integer import Int4
from kvplug.codecs.kivi import Kivi
from kvplug.config import ENV_VAR, resolve
from kvplug.registry import default_registry
from kvplug.scorers.snapkv import SnapKV
from kvplug.scorers.streaming import Streaming
from kvplug.tokens import TokenCount


def test_issue_examples():
    assert parse("int4").codec == Int4()
    assert parse("kivi(bits=2, group=32, residual=128)").codec == Kivi(bits=2, group=32, residual=128)
    s = parse("snapkv(budget=1024)+int4")
    assert s.scorer == SnapKV(budget=TokenCount(tokens=1024)) and s.codec == Int4()
    assert parse("streaming(sinks=4, window=1020)").scorer == Streaming(sinks=4, window=1020)
    assert parse("snapkv(budget=25%)").scorer.budget == TokenCount(fraction=0.25)


def test_dict_list_and_env_forms(monkeypatch):
    text = parse("snapkv(budget=512)+pyramid(beta=10)+kivi(bits=4)")
    assert parse({"snapkv": {"budget": 512}, "pyramid": {"beta": 10}, "kivi": {"bits": 4}}) == text
    assert parse([{"name": "snapkv", "budget": 512}, "pyramid(beta=10)", {"kivi": {"bits": "4"}}]) == text
    monkeypatch.setenv(ENV_VAR, "int8")
    assert str(resolve()) == str(parse("int8"))
    monkeypatch.delenv(ENV_VAR)
    assert str(resolve()) == "none"


@pytest.mark.parametrize("spec, words", [
    ("snapvk", ["unknown", "'snapvk'", "did you mean 'snapkv'", "known:", "int4"]),
    ("kivi(bits=3)", ["kivi", "bits=3", "2 | 4"]),
    ("snapkv(budget=0)", ["snapkv", "budget=0", "at least 1"]),
    ("h2o(recent_ratio=1.5)", ["h2o", "recent_ratio=1.5", "0..1"]),
    ("snapkv(budget=150%)", ["budget=150%", "percentage"]),
    ("int4(banana=1)", ["int4", "'banana'", "group, rotate"]),
    ("int4+int8", ["at most one codec"]),
    ("pyramid", ["scorer"]),
    ("int4(", ["expected"]),
    ("", ["empty"]),
    ("int4(group=x)", ["group='x'", "integer"]),
])
def test_errors_are_one_clear_line(spec, words):
    with pytest.raises(SpecError) as e:
        parse(spec)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


@given(st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_any_text_parses_or_raises_spec_error(text):
    try:
        parse(text)
    except SpecError:
        pass


_part = st.sampled_from([
    st.builds(lambda b: f"snapkv(budget={b})", st.integers(1, 10**6)),
    st.builds(lambda p: f"h2o(budget={p}%, recent_ratio=0.25)", st.integers(1, 100)),
    st.builds(lambda s, w: f"streaming(sinks={s}, window={w})", st.integers(0, 64), st.integers(1, 10**5)),
]).flatmap(lambda s: s)
_codec = st.sampled_from(["none", "int8", "int4", "int2(rotate=true)", "fp8", "kivi(bits=4, group=64, residual=0)"])


@given(_part, st.sampled_from(["", "+pyramid(beta=5)", "+adakv(alpha=0.5)"]), _codec)
@settings(max_examples=200, deadline=None)
def test_str_round_trips(scorer, budget, codec):
    strategy = parse(scorer + budget + "+" + codec)
    assert parse(str(strategy)) == strategy


@given(st.integers(-10, 10**7))
@settings(max_examples=200, deadline=None)
def test_budget_range_is_enforced(n):
    if n >= 1:
        assert parse(f"knorm(budget={n})").scorer.budget.resolve(10) == n
    else:
        with pytest.raises(SpecError, match="at least 1"):
            parse(f"knorm(budget={n})")


@given(st.floats(0.01, 100))
@settings(max_examples=100, deadline=None)
def test_percentages_resolve_within_one_token(pct):
    budget = parse(f"knorm(budget={pct}%)").scorer.budget
    assert abs(budget.resolve(1000) - pct * 10) <= 1 + 1e-9


def test_every_registered_part_has_a_paper_and_parses_alone():
    reg = default_registry()
    for name in reg.names():
        cls = reg.get(name)
        assert cls.paper, name
        if cls.kind != "budget":  # a part with a required parameter parses from its example
            assert parse(cls.example or name)
