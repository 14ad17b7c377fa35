"""vLLM adapter: a general plugin whose compressed KV cache frees memory in vLLM's block manager.

Installed with kvplug (entry point ``vllm.general_plugins`` -> :func:`register`); it changes
nothing until a strategy is selected, in order of precedence:

    vllm serve MODEL --additional-config '{"kvplug": "int4"}'
    LLM(model, additional_config={"kvplug": "int4(rotate=true)"})
    KVPLUG_STRATEGY=int4 vllm serve MODEL

A bad spec stops start-up with the parser's one-line :class:`kvplug.SpecError`; a spec this
adapter cannot honour (SimLayerKV's per-layer decisions, KIVI's token groups, a platform
without a kvplug backend) is refused the same way, never run uncompressed. Eviction (snapkv,
knorm, random with uniform or pyramid budgets; streaming; h2o and tova on the CPU backend) frees
blocks in vLLM's own pool: see :mod:`.eviction` and docs/VLLM_EVICTION.md.

How it reaches the engine (details and the 0.26 differences in :mod:`.compat`): ``register()``
routes the platform's attention-backend choice, made in each worker while the model is built (when
``get_current_vllm_config()`` holds the user's ``additional_config``), to
:class:`.backend.KVPlugCPUBackend` (CPU) or :class:`.cuda_backend.KVPlugCudaBackend` (CUDA, codecs
int8/int4/int2; with ``none`` vLLM's own backend runs) when a strategy is selected, as the
subclass configured for the engine (:func:`.capabilities.configured`); the backend reports the
compressed page size to vLLM (``customize_spec``), so the block manager hands out proportionally
more blocks, and its impl stores and reads the compressed layout (:mod:`.layout`) itself. What each
backend supports, and every refusal that follows, is declared in :mod:`.capabilities`.
"""

from __future__ import annotations

import os
from typing import Any

from kvplug.config import ENV_VAR, resolve
from kvplug.errors import SpecError
from kvplug.strategy import Strategy

from .eviction import replaces

KEY = "kvplug"
"""The key of ``additional_config`` that selects a strategy."""

PREFILL_KEY = "kvplug_prefill"
"""Optional ``additional_config`` key: what a request's first step attends over (:func:`prefill_mode`)."""
PREFILL_MODES = ("compressed", "uncompressed")

CPU_BACKEND = "kvplug.adapters.vllm.backend.KVPlugCPUBackend"
CUDA_BACKEND = "kvplug.adapters.vllm.cuda_backend.KVPlugCudaBackend"
CONNECTOR = "KVPlugConnector"
"""The name kvplug's KV connector (:mod:`.connector`) is registered under: ``--kv-transfer-config
'{"kv_connector": "KVPlugConnector", "kv_role": "kv_both"}'``."""
"""The backend classes; vLLM is given their per-engine subclasses, ``<path>__<engine token>``
(:func:`.capabilities.configured`)."""

__all__ = ["register", "selected_spec", "selected_strategy", "check_supported", "layer_spec", "prefill_mode", "KEY",
           "PREFILL_KEY", "CPU_BACKEND", "CUDA_BACKEND", "CONNECTOR", "StartupError"]


class StartupError(RuntimeError):
    """A selected strategy that stops vLLM's start-up; the message is the one line of the
    :class:`kvplug.SpecError` it comes from (``__cause__``). Not a ValueError, so that vLLM's
    config validation (pydantic) passes it through instead of rewrapping it in a multi-line report."""


def selected_spec(vllm_config=None) -> Any | None:
    """The spec the user selected for this engine: ``additional_config["kvplug"]``, else
    ``$KVPLUG_STRATEGY``, else None (kvplug stays out of the way)."""
    from . import compat

    extra = compat.additional_config(vllm_config) if vllm_config is not None else {}
    if extra.get(KEY) is not None:
        return extra[KEY]
    return os.environ.get(ENV_VAR) or None


def prefill_mode(vllm_config=None) -> str:
    """``compressed`` (default): every step attends over the stored (decoded) K/V, a prompt's own
    chunk included, so vLLM's chunked prefill and prefix caching run (both on by default) and
    output does not depend on chunk sizes, prefix-cache hits, preemption or the rest of the batch.
    ``uncompressed``: a request's first step attends over its own raw K/V before they are stored,
    as the HF adapter's prefill does (the same first tokens in both engines, for comparing
    methods across engines); the CUDA backend then needs chunked prefill and prefix caching off,
    and eviction turns both off on any backend."""
    from . import compat

    extra = compat.additional_config(vllm_config) if vllm_config is not None else {}
    mode = extra.get(PREFILL_KEY) or PREFILL_MODES[0]
    if mode not in PREFILL_MODES:
        raise SpecError(f"{PREFILL_KEY}={mode!r}: allowed: {', '.join(PREFILL_MODES)}")
    return mode


def layer_spec(spec, token_bytes: int | None, evicting: tuple[str, int] | None):
    """A layer's KV-cache spec as a kvplug backend reports it: with ``evicting`` (spec string,
    layer count) the spec whose manager frees what eviction empties (:mod:`.manager`), then with
    ``token_bytes`` the compressed page. In this order on both versions: 0.26's compressed spec
    is a subclass of the spec it is given."""
    if evicting is not None:
        from .manager import KVPlugEvictingSpec

        spec = KVPlugEvictingSpec.from_spec(spec, *evicting)
    if token_bytes is not None:
        from . import compat

        spec = compat.compressed_spec(spec, token_bytes)
    return spec


def check_supported(strategy: Strategy, head_dim: int | None = None, dtype=None) -> None:
    """Refuse, in one line, what no kvplug backend runs of ``strategy`` (and, given the model's
    ``head_dim``, what its codec cannot store); the per-backend checks are in :mod:`.capabilities`."""
    from .capabilities import check_strategy, cpu_page

    check_strategy(strategy)
    if head_dim is not None:
        import torch

        cpu_page(strategy.codec, head_dim, dtype or torch.bfloat16)


def selected_strategy(vllm_config=None) -> Strategy | None:
    """The parsed, checked strategy of ``vllm_config`` (None when none is selected)."""
    spec = selected_spec(vllm_config)
    if spec is None:
        return None
    strategy = resolve(spec)
    from . import compat

    model_config = getattr(vllm_config, "model_config", None)
    check_supported(strategy, compat.head_size(vllm_config), getattr(model_config, "dtype", None))
    return strategy


def _backend_class(vllm_config, strategy: Strategy) -> type | None:
    """The kvplug backend class this platform runs ``strategy`` with (None: vLLM's own, for codec
    none without eviction on CUDA), not yet configured; or a one-line SpecError."""
    from . import compat

    plat = compat.platform()
    if plat.is_cpu():
        from .backend import KVPlugCPUBackend

        return KVPlugCPUBackend
    if plat.is_cuda():
        if _stock_on_cuda(strategy):
            return None
        from .cuda_backend import KVPlugCudaBackend

        return KVPlugCudaBackend
    raise SpecError(f"kvplug in vLLM runs on the CPU and CUDA platforms; this is {plat.device_name!r}: "
                    f"remove the {KEY!r} key / ${ENV_VAR} to run uncompressed")


def _pick_backend(stock_path: str) -> str | None:
    """Called where vLLM chooses a layer's attention backend (in the worker, config set)."""
    from . import compat
    from .capabilities import Engine, configured, path

    config = compat.current_config()
    strategy = selected_strategy(config)
    if strategy is None:
        return None
    if strategy.evicts:
        compat.expose_prompt_lengths()
    base = _backend_class(config, strategy)
    if base is None:  # codec none without eviction on CUDA: vLLM's own backend, unchanged
        return None
    if compat.platform().is_cpu() and not (stock_path.startswith(CPU_BACKEND)
                                           or stock_path == compat.stock_cpu_backend_path()):
        raise SpecError(f"kvplug in vLLM has no compressed backend for {stock_path.rsplit('.', 1)[-1]} on the CPU "
                        f"yet (only for vLLM's CPU attention backend); remove the {KEY!r} key / ${ENV_VAR} to run "
                        f"uncompressed")
    return path(configured(base, Engine.of(config, strategy)))


def _check_config(vllm_config) -> None:
    """Called when a VllmConfig is completed, in the process the user started."""
    from . import compat

    compat.clear_backend_cache()
    try:
        from .lckv import check_model

        check_model(vllm_config)
    except ValueError as e:
        raise StartupError(str(e)) from e
    try:
        strategy = selected_strategy(vllm_config)
        prefill_mode(vllm_config)
        if strategy is not None:
            _check_engine(vllm_config, strategy)
        if _uses_connector(vllm_config):
            from .connector import check

            check(vllm_config)
    except SpecError as e:
        raise StartupError(str(e)) from e


def _check_engine(vllm_config, strategy: Strategy) -> None:
    """What the platform's kvplug backend declares it cannot serve (:mod:`.capabilities`), then
    what eviction turns off."""
    from . import compat
    from .capabilities import check_backend, check_engine

    base = _backend_class(vllm_config, strategy)
    backend = "vLLM's own (codec none)"
    if base is not None:
        model_config = getattr(vllm_config, "model_config", None)
        check_backend(base, strategy, compat.head_size(vllm_config), getattr(model_config, "dtype", None))
        check_engine(vllm_config, strategy, base)
        backend = f"{base.__module__}.{base.__name__}"
    if strategy.evicts:
        _turn_off_for_eviction(vllm_config, strategy)
    version = ".".join(map(str, compat.vllm_version()))
    _log(f"kvplug: strategy {str(strategy)!r} selected, {prefill_mode(vllm_config)} prefill; attention backend "
         f"{backend} (vLLM {version})")


def _uses_connector(vllm_config) -> bool:
    transfer = getattr(vllm_config, "kv_transfer_config", None)
    return transfer is not None and getattr(transfer, "kv_connector", None) == CONNECTOR


def _stock_on_cuda(strategy: Strategy) -> bool:
    """Nothing for kvplug to do on CUDA (codec none, no eviction): vLLM's own backend runs."""
    from kvplug.codecs.none import NoCodec

    return isinstance(strategy.codec, NoCodec) and not strategy.evicts


def _turn_off_for_eviction(vllm_config, strategy: Strategy) -> None:
    """Turn off what eviction replaces (as vLLM does for CPU MLA; its refusals are in
    :func:`.capabilities.check_engine`): prefix caching (compressed blocks no longer hold the
    tokens their hashes name) and, in the ``uncompressed`` prefill mode, chunked prefill (the
    selection then reads the prompt's raw K/V, which only its own step has). In the default
    ``compressed`` mode a prompt may come in chunks: the chunk that ends it selects over the
    prompt as the pages hold it (:mod:`.compaction`)."""
    cache, scheduler = vllm_config.cache_config, vllm_config.scheduler_config
    compilation = getattr(vllm_config, "compilation_config", None)
    if replaces(strategy) and getattr(compilation, "cudagraph_num_of_warmups", 1) < 1:
        compilation.cudagraph_num_of_warmups = 1  # V1 runner: an eager step before each capture makes the
        # running state a replayed graph updates (made inside a capture, its fill would be replayed)
    if prefill_mode(vllm_config) == "compressed":
        if cache.enable_prefix_caching:
            _log(f"kvplug: eviction ({strategy.scorer.name}) turns off prefix caching (a request's blocks hold "
                 f"its kept tokens only); chunked prefill stays as configured")
        cache.enable_prefix_caching = False
        return
    model_len = vllm_config.model_config.max_model_len
    if cache.enable_prefix_caching or scheduler.enable_chunked_prefill:
        _log(f"kvplug: eviction ({strategy.scorer.name}) with {PREFILL_KEY}=uncompressed turns off prefix caching "
             f"and chunked prefill")
    cache.enable_prefix_caching = False
    scheduler.enable_chunked_prefill = False
    scheduler.long_prefill_token_threshold = 0  # it would split prompts even without chunked prefill
    scheduler.max_num_batched_tokens = max(scheduler.max_num_batched_tokens, model_len)


def _log(message: str) -> None:
    try:
        from vllm.logger import init_logger

        init_logger("vllm.kvplug").info(message)
    except Exception:  # pragma: no cover
        pass


def register() -> None:
    """Entry point ``vllm.general_plugins``: runs in every vLLM process, before engines start.

    Installs two small routes (see :mod:`.compat`): the config check and the backend choice.
    Both are pass-through while no strategy is selected, so an unused plugin changes nothing, but
    for one thing: a kvplug_lckv checkpoint (:mod:`.lckv`) is refused in one line.
    """
    try:
        import vllm  # noqa: F401
    except ImportError:  # pragma: no cover - the entry point only fires inside vLLM
        return
    from . import compat

    compat.check_config_on_creation(_check_config)
    compat.route_backend_choice(_pick_backend)

    def is_kvplug_backend(backend) -> bool:
        return getattr(backend, "kvplug", False) is True

    compat.install_spec_hook(is_kvplug_backend)  # 0.26 only (0.32 asks customize_spec itself)
    compat.register_connector(CONNECTOR, "kvplug.adapters.vllm.connector", "KVPlugConnector")
    from kvplug.adapters.hf.lckv import LckvConfig

    from .lckv import ARCHITECTURE, MODEL_TYPE, LckvNotServed

    compat.register_model(ARCHITECTURE, LckvNotServed, MODEL_TYPE, LckvConfig)  # refused at start-up, one line
