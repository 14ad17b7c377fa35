"""Plugins: a real throwaway distribution found through the ``kvplug`` entry-point group."""

import sys
from pathlib import Path
import warnings

import pytest

from kvplug import parse
from kvplug.registry import PluginWarning, Registry

PLUGIN = '''
from dataclasses import dataclass
import torch
from kvplug.hookspecs import hookimpl
from kvplug.parts import param
from kvplug.scorers.base import Scorer
from kvplug.tokens import TokenCount

@dataclass(frozen=True)
class Oldest(Scorer):
    """Keep the oldest tokens (a test plugin)."""
    name = "{name}"
    paper = "test"
    budget: TokenCount = param(TokenCount(tokens=8))
    def kept_tokens(self, present):
        return self.budget.resolve(present)
    def score(self, inputs):
        return inputs.finish(-inputs.positions.float()[:, None, :])

@hookimpl
def kvplug_parts():
    return [Oldest]
'''


def install_dist(root, dist, module, source, group_line):
    """A real installed distribution: a module plus a .dist-info with entry_points.txt."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"  # as wheels name it
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[kvplug]\n{group_line}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in ("kvplug_oldest", "kvplug_broken", "kvplug_dup", "kvplug_depth"):
        sys.modules.pop(mod, None)


def test_third_party_plugin_is_listed_and_usable(site):
    install_dist(site, "kvplug-oldest", "kvplug_oldest", PLUGIN.format(name="oldest"), "oldest = kvplug_oldest")
    reg = Registry()
    assert "oldest" in reg.names("scorer") and reg.origin["oldest"] == "oldest"
    strategy = parse("oldest(budget=3)+int4", registry=reg)
    assert strategy.scorer.name == "oldest" and strategy.codec.name == "int4"


def test_broken_and_duplicate_plugins_warn_and_discovery_goes_on(site):
    install_dist(site, "kvplug-broken", "kvplug_broken", "raise ImportError('no such thing')",
                 "broken = kvplug_broken")
    install_dist(site, "kvplug-dup", "kvplug_dup", PLUGIN.format(name="snapkv"), "dup = kvplug_dup")
    install_dist(site, "kvplug-oldest", "kvplug_oldest", PLUGIN.format(name="oldest"), "oldest = kvplug_oldest")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = Registry()
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]
    assert any("'broken'" in m and "no such thing" in m for m in messages), messages
    assert any("'dup'" in m and "'snapkv' is already provided by 'kvplug.builtin'" in m for m in messages), messages
    assert "oldest" in reg.names()
    assert reg.origin["snapkv"] == "kvplug.builtin"


def test_without_discovery_only_builtins():
    reg = Registry(discover=False)
    assert set(reg.origin.values()) == {"kvplug.builtin"}
    assert {"none", "int8", "int4", "int2", "kivi", "fp8", "streaming", "h2o", "snapkv", "tova", "knorm",
            "random", "uniform", "pyramid", "adakv"} <= set(reg.names())


def test_example_per_layer_plugin_runs_in_hf_generate(site):
    """examples/depth_plugin, installed as a distribution, is listed and drives each layer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import kvplug.hf

    source = (Path(__file__).resolve().parents[1] / "examples" / "depth_plugin" / "kvplug_depth.py").read_text()
    install_dist(site, "kvplug-depth", "kvplug_depth", source, "depth = kvplug_depth")
    reg = Registry()
    assert reg.origin["depth"] == "depth"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)).eval()
    model.generation_config.eos_token_id = None
    cache = kvplug.hf.cache(model, parse("depth(full=1, sinks=2, window=6)+int8", registry=reg))
    ids = torch.randint(0, 64, (1, 30))
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                   past_key_values=cache, pad_token_id=0)
    kept = [sorted(p for p in layer.slots.positions[0, 0].tolist() if p >= 0) for layer in cache.layers]
    assert kept[0] == list(range(34))
    assert kept[1] == kept[2] == [0, 1] + list(range(28, 34))
