"""What users call: ``kvplug.hf.cache(model, spec)`` and ``kvplug.hf.compress(model, spec)``."""

from __future__ import annotations

import contextlib
import functools

import torch

from kvplug.config import resolve
from kvplug.errors import SpecError
from kvplug.rope import Rope

from .attention import NAME, register
from .cache import KVPlugCache
from .offload import ModelView

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gpt_neox")


def check_model(model) -> None:
    """Refuse, in one line, a model whose attention kvplug does not drive."""
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind == "kvplug_lckv":
        raise SpecError("kvplug.hf: a kvplug_lckv model already holds one layer's K/V in transformers' "
                        "DynamicCache; kvplug's strategies do not run on it yet")
    if kind not in SUPPORTED:
        raise SpecError(f"kvplug.hf supports model types {', '.join(SUPPORTED)}; got {kind!r}")
    layer_types = getattr(config, "layer_types", None) or []
    sliding = [t for t in layer_types if t != "full_attention"]
    if sliding or (kind == "mistral" and getattr(config, "sliding_window", None)):
        raise SpecError(f"kvplug.hf does not support sliding-window attention layers yet ({kind}: "
                        f"sliding_window={getattr(config, 'sliding_window', None)})")


def use_kvplug_attention(model) -> None:
    """Switch the model to the ``kvplug`` attention function (plain SDPA for any other cache)."""
    register()
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)


def cache(model, spec=None, paged: bool | None = None, keep_prompt: bool = False) -> KVPlugCache:
    """A fresh compressed cache for ``model`` following ``spec`` (string, dict, Strategy; default
    ``$KVPLUG_STRATEGY`` or none). Pass it as ``model.generate(..., past_key_values=cache)``.

    ``paged``: keep per-token codecs (none/int8/int4/int2/mixed, rotated or not; fp16/bf16 models) in the paged layout
    of :mod:`kvplug.triton_ops`, whose Triton kernel decodes straight from the packed codes on CUDA
    instead of dequantizing the cache each step. Default (None): on CUDA devices, where it is
    measured as accurate as the reference path and 15x faster (docs/BENCHMARKS.md); ``True``
    forces it (on the CPU the kernels' PyTorch references read it); ``False`` keeps the reference
    path. A residual window (``int4(residual=32)``) sits beside the pages as a dense tail that
    the decode kernel reads in the same softmax. Codecs the layout cannot hold (kivi, fp8, grouped)
    use the reference path. Also switches the model's
    attention implementation to ``kvplug`` (see :mod:`.attention`). ``keep_prompt`` retains the
    prompt's K/V and queries so that :meth:`KVPlugCache.fork` can compress it for other strategies.
    """
    strategy = resolve(spec)
    check_model(model)
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    strategy.check_head_dim(head_dim)
    merger = strategy.merger
    if merger is not None and not merger.pairs(text.num_hidden_layers):
        raise SpecError(f"{merger}: merges no layer pair of this {text.num_hidden_layers}-layer model; lower start")
    scorer = strategy.scorer
    rope = rope_of(model)
    if scorer is not None and scorer.needs_rope:
        if rope is None:
            raise SpecError(f"{scorer.name} needs the model's rotary embedding; this {text.model_type} model has no "
                            f"rotary module kvplug can read (inv_freq)")
        rope.check_covers(head_dim, scorer.name)
    view = ModelView.of(model)
    if scorer is not None and scorer.needs_out_proj and (
            len(view.attention) != text.num_hidden_layers
            or not all(hasattr(a, "o_proj") for a in view.attention.values())):
        raise SpecError(f"{scorer.name} weights values by the layer's output projection (o_proj), which this "
                        f"{text.model_type} model's attention does not have (supported: llama, mistral, qwen2, qwen3)")
    placement = strategy.placement
    if placement is not None and len(view.attention) != text.num_hidden_layers:
        raise SpecError(f"{placement.name} computes the next layer's queries from its q_proj, which this "
                        f"{text.model_type} model's attention does not have (supported: llama, mistral, qwen2, qwen3)")
    use_kvplug_attention(model)
    return KVPlugCache(strategy, text.num_hidden_layers, paged, keep_prompt, rope=rope, view=view)


def rope_of(model) -> Rope | None:
    """The model's rotary embedding (transformers' ``rotary_emb``: ``inv_freq`` and
    ``attention_scaling``), or None where it has none (one shared by every layer)."""
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor) and inv_freq.dim() == 1:
            return Rope(inv_freq.detach().float().clone(), float(getattr(module, "attention_scaling", 1.0)))
    return None


@contextlib.contextmanager
def compress(model, spec=None):
    """Within the block, every ``model.generate()`` without its own ``past_key_values`` runs
    with a fresh kvplug cache; yields the strategy. Outside it, ``generate`` is as before."""
    strategy = resolve(spec)
    cache(model, strategy)  # validates model and spec up front
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        if kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = cache(model, strategy)
        return original(*args, **kwargs)

    model.generate = generate
    try:
        yield strategy
    finally:
        del model.generate
