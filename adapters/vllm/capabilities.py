"""What each kvplug backend in vLLM supports, declared once, and every refusal that follows from it.

A kvplug backend class declares what it takes the way vLLM's own backends do, on the class:
model dtypes (``supported_dtypes``), KV-cache dtypes (``supported_kv_cache_dtypes``: ``auto``
only, kvplug stores its own codes), head sizes (``get_supported_head_sizes``); and, in a
:class:`Support` (``kvplug_support``), what only kvplug has: which codecs its pages hold (and
in what layout), whether it can evict while generating (h2o, tova), whether the
``uncompressed`` prefill mode can be scheduled with chunked prefill and prefix caching, and what
it does with encoder attention. The checks below read those declarations and never name a
backend; each refusal is one line (:class:`kvplug.SpecError`).

The per-engine backend class (:func:`configured`) is here too: vLLM asks a backend class for the
layer's KV-cache spec and page shape through class methods that get no config, so instead of
process-wide state the class that serves an engine carries that engine's :class:`Engine` (spec
string, model dtype, layer count). Its name encodes the engine, and the backend modules resolve
such a name in any process (:func:`resolve_configured`, their module ``__getattr__``), so
vLLM's import of the backend by qualified name finds it wherever it looks.

Imports no vLLM (the config objects are read by attribute), so it is tested without an engine.
"""

from __future__ import annotations

import base64
import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvplug.config import resolve
from kvplug.errors import SpecError
from kvplug.strategy import Strategy

__all__ = ["Support", "Engine", "configured", "resolve_configured", "check_strategy", "check_backend",
           "check_engine", "check_layer", "check_head_sizes", "cpu_page", "cuda_page"]


def cpu_page(codec, head_dim: int, dtype: torch.dtype):
    """The CPU backend's token layout (:class:`.layout.TokenLayout`): any per-token codec of the core."""
    from .layout import TokenLayout

    return TokenLayout.for_codec(codec, head_dim, dtype)


def cuda_page(codec, head_dim: int, dtype: torch.dtype, block_size: int = 16, num_kv_heads: int = 1):
    """The Triton kernels' :class:`~kvplug.triton_ops.PagedLayout` for ``codec``: what the codec
    declares (:meth:`~kvplug.codecs.base.Codec.paged_format`; none, int8/int4/int2 and mixed with
    one scale/zero (or, symmetric, one scale) per token and head, 3-bit keys, rotated or not,
    clipped or not)."""
    from kvplug import triton_ops

    fmt = codec.paged_format(head_dim)
    if fmt is not None and fmt.residual:
        raise SpecError(f"kvplug in vLLM on CUDA: {codec} keeps its newest {fmt.residual} tokens in full precision "
                        f"beside the pages, which the vLLM adapter does not hold yet (the HF adapter does)")
    try:
        return triton_ops.PagedLayout.for_codec(codec, block_size, num_kv_heads, head_dim, dtype)
    except ValueError as e:
        raise SpecError(f"kvplug in vLLM on CUDA: {e}") from None


@dataclass(frozen=True)
class Support:
    """What a kvplug backend runs beyond vLLM's own declarations (``kvplug_support`` on the class)."""

    platform: str
    """Where it runs, for messages (``CPU``, ``CUDA``)."""
    page: Callable[..., Any]
    """``page(codec, head_dim, dtype)``: the layout its pages hold for ``codec``, or a one-line
    :class:`SpecError` naming what its kernels lack."""
    replaces_on_decode: bool
    """Eviction that replaces kept tokens by each generated token's attention (h2o, tova)."""
    raw_prefill_with_context: bool
    """``kvplug_prefill=uncompressed`` with chunked prefill / prefix caching (a prefill with context)."""
    encoder_attention: bool
    """Encoder (non-causal, cache-less) layers pass through to vLLM's own implementation."""


@dataclass(frozen=True)
class Engine:
    """What a configured backend class serves: one engine's strategy, model dtype and layer count."""

    spec: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    num_layers: int

    @classmethod
    def of(cls, vllm_config, strategy: Strategy) -> Engine:
        model = vllm_config.model_config
        dtype = getattr(model, "dtype", None) or torch.get_default_dtype()
        return cls(str(strategy), str(dtype).removeprefix("torch."), model.get_total_num_hidden_layers())

    @functools.cached_property
    def strategy(self) -> Strategy:
        return resolve(self.spec)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def evicting(self) -> tuple[str, int] | None:
        """``(spec, num_layers)`` for the evicting KV-cache spec, None when nothing is evicted."""
        return (self.spec, self.num_layers) if self.strategy.evicts else None

    def token(self) -> str:
        """An identifier-safe, reversible encoding (base32 of the JSON of the three fields)."""
        raw = json.dumps([self.spec, self.dtype, self.num_layers], separators=(",", ":")).encode()
        return base64.b32encode(raw).decode().rstrip("=")

    @classmethod
    def from_token(cls, token: str) -> Engine:
        spec, dtype, num_layers = json.loads(base64.b32decode(token + "=" * (-len(token) % 8)))
        return cls(spec, dtype, int(num_layers))


SEPARATOR = "__"


def configured(base: type, engine: Engine) -> type:
    """The subclass of backend class ``base`` that serves ``engine`` (made once per process, kept
    as an attribute of ``base``'s module under ``<base name>__<engine token>``)."""
    module = sys.modules[base.__module__]
    name = f"{base.__name__}{SEPARATOR}{engine.token()}"
    cls = module.__dict__.get(name)
    if cls is None:
        cls = type(base)(name, (base,), {"engine": engine, "__module__": base.__module__, "__qualname__": name,
                                         "__doc__": f"{base.__name__} configured for {engine.spec!r}."})
        setattr(module, name, cls)
    return cls


def resolve_configured(base: type, name: str) -> type:
    """For a backend module's ``__getattr__``: the configured class a name like
    :func:`configured`'s denotes (so another process imports it by name), else AttributeError."""
    prefix = base.__name__ + SEPARATOR
    if not name.startswith(prefix):
        raise AttributeError(f"module {base.__module__!r} has no attribute {name!r}")
    try:
        engine = Engine.from_token(name[len(prefix):])
    except (ValueError, TypeError) as e:
        raise AttributeError(f"module {base.__module__!r} has no attribute {name!r} ({e})") from None
    return configured(base, engine)


def path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# refusals ---------------------------------------------------------------------------------------
def check_strategy(strategy: Strategy) -> None:
    """What no kvplug backend in vLLM runs yet, whatever the platform."""
    from .eviction import check_evictable

    check_evictable(strategy)
    scorer = strategy.scorer
    if scorer is not None and scorer.needs_rope:
        raise SpecError(f"kvplug in vLLM: {scorer.name} needs the model's rotary embedding to read queries before "
                        f"RoPE, which the vLLM adapter does not pass its scorers yet; use it with the HF adapter")
    if scorer is not None and scorer.needs_out_proj:
        raise SpecError(f"kvplug in vLLM: {scorer.name} weights values by the layer's output projection, which "
                        f"the vLLM adapter does not pass its scorers; use it with the HF adapter")
    if strategy.merger is not None:
        raise SpecError(f"kvplug in vLLM: {strategy.merger.name} shares pages between layers, which the vLLM "
                        f"adapter does not do yet; got {str(strategy)!r}")
    if strategy.placement is not None:
        raise SpecError(f"kvplug in vLLM: {strategy.placement.name} keeps K/V in host memory, which the vLLM adapter "
                        f"does not do (docs/OFFLOAD.md says what it would take); use it with the HF adapter")
    codec = strategy.codec
    if not codec.per_token:
        raise SpecError(f"kvplug in vLLM: {codec} quantizes groups of {codec.token_group} tokens or keeps the "
                        f"newest {codec.residual} in full precision, which paged blocks cannot hold yet; use "
                        f"int2/int4/mixed (optionally rotate=true) without a residual")


def check_backend(backend: type, strategy: Strategy, head_dim: int | None = None, dtype=None) -> None:
    """What ``backend`` (a kvplug backend class) declares it cannot run of ``strategy`` on a model
    of ``head_dim`` and ``dtype``."""
    from .eviction import replaces

    support: Support = backend.kvplug_support
    where = f"kvplug in vLLM on {support.platform}"
    if dtype is not None and not backend.supports_dtype(dtype):
        allowed = ", ".join(str(d).removeprefix("torch.") for d in backend.supported_dtypes)
        raise SpecError(f"{where} runs models in {allowed}; this one is {str(dtype).removeprefix('torch.')} "
                        f"(pass --dtype)")
    if head_dim is not None and not backend.supports_head_size(head_dim):
        raise SpecError(f"{where}: head size {head_dim} is not supported; supported: "
                        f"{', '.join(map(str, backend.get_supported_head_sizes()))}")
    if replaces(strategy) and not support.replaces_on_decode:
        raise SpecError(f"{where}: {strategy.scorer.name} ranks tokens by the attention of each generated token, "
                        f"which this backend's decode kernel does not report yet; run it on the CPU backend or "
                        f"with the HF adapter")
    if head_dim is not None:
        support.page(strategy.codec, head_dim, dtype or torch.bfloat16)


def check_engine(vllm_config, strategy: Strategy, backend: type) -> None:
    """Engine settings ``backend`` cannot serve with ``strategy`` (read from ``vllm_config``)."""
    from . import KEY, PREFILL_KEY, compat, prefill_mode

    support: Support = backend.kvplug_support
    cache = getattr(vllm_config, "cache_config", None)
    sched = getattr(vllm_config, "scheduler_config", None)
    cache_dtype = getattr(cache, "cache_dtype", "auto")
    if cache_dtype not in (None, *backend.supported_kv_cache_dtypes):
        raise SpecError(f"kvplug stores its own codes: keep --kv-cache-dtype auto (got {cache_dtype!r}) "
                        f"with {KEY}={str(strategy)!r}")
    if strategy.evicts:
        name = strategy.scorer.name
        if not compat.supports_eviction():
            version = ".".join(map(str, compat.vllm_version()))
            raise SpecError(f"kvplug in vLLM: eviction ({name}) needs vLLM 0.26 or later (this is {version}); "
                            f"codecs alone run here")
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise SpecError(f"kvplug in vLLM: eviction ({name}) cannot run with speculative decoding (drafts "
                            f"would attend over tokens the scheduler already freed)")
        if getattr(vllm_config, "kv_transfer_config", None) is not None:
            raise SpecError(f"kvplug in vLLM: eviction ({name}) cannot run with a KV connector (it would "
                            f"transfer compacted blocks as if they held the tokens their positions name)")
    if prefill_mode(vllm_config) == "uncompressed" and not support.raw_prefill_with_context and not strategy.evicts:
        on = [flag for flag, enabled in (
            ("--no-enable-prefix-caching / enable_prefix_caching=False",
             getattr(cache, "enable_prefix_caching", False)),
            ("--no-enable-chunked-prefill / enable_chunked_prefill=False",
             getattr(sched, "enable_chunked_prefill", False)),
        ) if enabled]
        if on:
            raise SpecError(f"kvplug in vLLM on {support.platform} with {PREFILL_KEY}='uncompressed' attends "
                            f"prefills over their own tokens only; pass {' and '.join(on)} with {KEY}, or drop "
                            f"{PREFILL_KEY} (the default, 'compressed', runs both)")


def check_layer(backend: type, strategy: Strategy, *, encoder: bool = False, sliding_window=None, alibi_slopes=None,
                logits_soft_cap=None, sinks=None, kv_sharing_target_layer_name=None) -> None:
    """Attention-layer features no kvplug backend implements (and encoder attention where
    ``backend`` does not pass it through)."""
    support: Support = backend.kvplug_support
    refused = [what for what, present in (
        ("encoder or cross attention", encoder and not support.encoder_attention),
        ("sliding-window attention", sliding_window is not None),
        ("ALiBi", alibi_slopes is not None),
        ("logits soft-capping", bool(logits_soft_cap)),
        ("attention sinks", sinks is not None),
        ("KV sharing across layers", kv_sharing_target_layer_name is not None),
    ) if present]
    if refused:
        raise SpecError(f"kvplug in vLLM on {support.platform} does not support {', '.join(refused)} yet "
                        f"(strategy {str(strategy)!r})")


def check_head_sizes(spec, head_dim: int) -> None:
    """A compressed page holds K and V of ``head_dim`` each: refuse a layer whose sizes differ."""
    if spec.head_size != head_dim or getattr(spec, "head_size_v", spec.head_size) != head_dim:
        raise SpecError(f"kvplug: layer head sizes {spec.head_size}/{spec.head_size_v} differ from "
                        f"{head_dim}; only equal K/V head sizes are supported")
