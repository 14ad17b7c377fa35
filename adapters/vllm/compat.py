"""Every difference between the vLLM versions kvplug supports (0.26 and 0.32), and every patch of vLLM, in one place.

The rest of ``kvplug.adapters.vllm`` calls these functions and never tests a version itself.
Each one reads vLLM lazily, so this module imports (and is unit-tested) without a running engine.

Patches of vLLM (all idempotent: each wrapper carries the :data:`ROUTED` marker; each passes
through unchanged while no strategy is selected):

=============================================================  ==========  ===============================
target                                                         versions    installed by / why no API
=============================================================  ==========  ===============================
``<current platform class>.get_attn_backend_cls`` (classmethod) 0.26, 0.32  :func:`route_backend_choice`:
                                                                           ``register_backend`` maps a
                                                                           name the user must select to
                                                                           one class; kvplug picks per
                                                                           engine from its strategy
``<current platform class>.check_and_update_config``            0.26, 0.32  :func:`check_config_on_creation`:
                                                                           no config-validation hook for
                                                                           general plugins
``Attention.get_kv_cache_spec``                                 0.26        :func:`install_spec_hook`; 0.32
                                                                           has ``customize_spec`` (used)
``gpu_model_runner.GPUModelRunner._build_attention_metadata``  0.26, 0.32  :func:`_expose_prompt_lengths_v1`
                                                                           (eviction only): prompt lengths
                                                                           reach no backend otherwise
``gpu.model_runner.GPUModelRunner.prepare_inputs`` (V2 runner)  0.26, 0.32  :func:`_expose_prompt_lengths_v2`
                                                                           (eviction only), same reason
=============================================================  ==========  ===============================

Supported APIs used instead of patches: the ``vllm.general_plugins`` entry point, the backend's
``customize_spec`` (0.32), ``KVCacheSpecRegistry`` for the evicting spec's manager (:mod:`.manager`),
``KVConnectorFactory.register_connector`` for :mod:`.connector` (0.26, 0.32: :func:`register_connector`),
``ModelRegistry.register_model`` and transformers' ``AutoConfig.register`` for the refusal of
kvplug_lckv checkpoints (:mod:`.lckv`, :func:`register_model`).

Version differences:

* Page size of a compressed layer. 0.32: the backend's classmethod ``customize_spec`` returns
  ``replace(spec, dtype=uint8, state_content_bytes=C)`` and vLLM derives the layer's cache shape
  ``[blocks, heads, block_size, C]`` from it. 0.26: no hook; ``Attention.get_kv_cache_spec`` is
  wrapped to return a ``FullAttentionSpec`` subclass whose ``real_page_size_bytes`` is
  ``block_size * heads * C`` (as 0.26's own ``TQFullAttentionSpec`` does), and the backend's
  ``get_kv_cache_shape`` returns ``(blocks, heads, block_size, C)`` uint8 (:func:`kv_cache_shape`).
* Current config in a worker: ``get_current_vllm_config_or_none`` (both; fallback kept).
* Backend choice: the platform classmethod ``get_attn_backend_cls(selected_backend,
  attn_selector_config, num_heads)``, same in both, routed by :func:`route_backend_choice`.
* Config check at start-up: the platform classmethod ``check_and_update_config(vllm_config)``,
  called from ``VllmConfig.__post_init__`` in both.
* ``get_supported_kernel_block_sizes`` takes ``kv_cache_spec`` in 0.32, nothing in 0.26.
* Prompt lengths for eviction: wrapped in both, ``_build_attention_metadata`` of the V1 model
  runner and ``prepare_inputs`` of the V2 one (:func:`expose_prompt_lengths`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import torch

ROUTED = "_kvplug_routed"


# versions -------------------------------------------------------------------------------------
def parse_version(text: str) -> tuple[int, int]:
    """``"0.32.0"`` / ``"0.26.1.dev3+g..."`` -> ``(0, 32)``."""
    m = re.match(r"\s*(\d+)\.(\d+)", text)
    if not m:
        raise ValueError(f"cannot read a vLLM version from {text!r}")
    return int(m.group(1)), int(m.group(2))


@functools.cache
def vllm_version() -> tuple[int, int]:
    import vllm

    return parse_version(getattr(vllm, "__version__", "0.0"))


def has_customize_spec() -> bool:
    """0.32+: the backend adjusts the layer's KV-cache spec itself (``customize_spec``)."""
    from vllm.v1.kv_cache_interface import AttentionSpec

    return "state_content_bytes" in {f.name for f in dataclasses.fields(AttentionSpec)}


# config -------------------------------------------------------------------------------------------
def current_config():
    """The VllmConfig being built or run in this process, or None outside one."""
    from vllm import config

    getter = getattr(config, "get_current_vllm_config_or_none", None)
    if getter is not None:
        return getter()
    try:  # pragma: no cover - versions without the *_or_none variant
        return config.get_current_vllm_config()
    except AssertionError:
        return None


def additional_config(vllm_config) -> dict[str, Any]:
    extra = getattr(vllm_config, "additional_config", None)
    return extra if isinstance(extra, dict) else {}


def head_size(vllm_config) -> int | None:
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is None:
        return None
    try:
        return model_config.get_head_size()
    except Exception:  # pragma: no cover - a model config vLLM cannot size yet
        return None


# platform: where the backend is chosen ---------------------------------------------------------------
def platform():
    from vllm.platforms import current_platform

    return current_platform


def stock_cpu_backend_path() -> str:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum.CPU_ATTN.get_path()


def wrap_platform_method(platform_cls: type, name: str, make: Callable[[Callable], Callable]) -> bool:
    """Replace classmethod ``name`` of ``platform_cls`` by ``make(original)`` once (idempotent,
    across re-imports too: the wrapper carries a marker). Returns True if it installed it now."""
    bound = getattr(platform_cls, name)  # a classmethod, bound to the class
    if getattr(bound, ROUTED, False):
        return False
    wrapped = make(bound)

    def method(cls, *args, **kwargs):
        return wrapped(*args, **kwargs)

    setattr(method, ROUTED, True)
    method.__name__ = name
    setattr(platform_cls, name, classmethod(method))
    return True


def route_backend_choice(pick: Callable[[str], str | None], platform_cls: type | None = None) -> bool:
    """Make the platform's backend choice go through ``pick(stock_path) -> path | None`` (None:
    keep vLLM's choice). Both versions choose with ``get_attn_backend_cls(selected_backend,
    attn_selector_config, num_heads)`` on the platform class, in the worker, while the model is
    being built (so the current config is set)."""
    platform_cls = platform_cls or type(platform())

    def make(original):
        def get_attn_backend_cls(*args, **kwargs):
            stock = original(*args, **kwargs)
            return pick(stock) or stock
        return get_attn_backend_cls

    return wrap_platform_method(platform_cls, "get_attn_backend_cls", make)


def check_config_on_creation(check: Callable[[Any], None], platform_cls: type | None = None) -> bool:
    """Run ``check(vllm_config)`` whenever a VllmConfig is completed (its ``__post_init__`` calls
    the platform's ``check_and_update_config`` in both versions), so a bad spec stops start-up in
    the process the user started, before any engine process."""
    platform_cls = platform_cls or type(platform())

    def make(original):
        def check_and_update_config(vllm_config, *args, **kwargs):
            result = original(vllm_config, *args, **kwargs)
            check(vllm_config)
            return result
        return check_and_update_config

    return wrap_platform_method(platform_cls, "check_and_update_config", make)


def clear_backend_cache() -> None:
    """Forget cached backend choices (``_cached_get_attn_backend``), so that in one process an
    engine with and one without kvplug do not share a stale choice."""
    try:
        from vllm.v1.attention import selector
    except ImportError:  # pragma: no cover
        return
    cached = getattr(selector, "_cached_get_attn_backend", None)
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()


# page size ----------------------------------------------------------------------------------------
def compressed_spec(spec, token_bytes: int):
    """``spec`` (a layer's AttentionSpec) made to report ``token_bytes`` per token-head (K+V)."""
    if "state_content_bytes" in {f.name for f in dataclasses.fields(spec)}:  # 0.32
        if spec.state_content_bytes == token_bytes and spec.dtype == torch.uint8:
            return spec
        return dataclasses.replace(spec, dtype=torch.uint8, state_content_bytes=token_bytes)
    return _spec_026(spec, token_bytes)  # 0.26


@functools.cache
def _kvplug_spec_class(base: type) -> type:
    """0.26: a subclass of ``base`` (FullAttentionSpec) with kvplug's page size."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class KVPlugAttentionSpec(base):
        kvplug_token_bytes: int = 0

        @property
        def real_page_size_bytes(self) -> int:
            if self.kvplug_token_bytes:
                return self.block_size * self.num_kv_heads * self.kvplug_token_bytes
            return super().real_page_size_bytes

        @classmethod
        def merge(cls, specs):
            merged = super().merge(specs)
            sizes = {s.kvplug_token_bytes for s in specs}
            if len(sizes) != 1:
                raise ValueError(f"kvplug: layers of one KV-cache group differ in bytes per token: {sizes}")
            return dataclasses.replace(merged, kvplug_token_bytes=sizes.pop())

    KVPlugAttentionSpec.__qualname__ = KVPlugAttentionSpec.__name__ = f"KVPlug{base.__name__}"
    return KVPlugAttentionSpec


def _spec_026(spec, token_bytes: int):
    cls = _kvplug_spec_class(type(spec)) if not hasattr(spec, "kvplug_token_bytes") else type(spec)
    values = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init}
    values.update(dtype=torch.uint8, kvplug_token_bytes=token_bytes)
    return cls(**values)


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, token_bytes: int) -> tuple[int, ...]:
    """0.26's ``get_kv_cache_shape`` for a kvplug layer: one uint8 page per block, head-major."""
    return (num_blocks, num_kv_heads, block_size, token_bytes)


def install_spec_hook(is_kvplug_backend: Callable[[type], bool]) -> bool:
    """0.26 only: wrap ``Attention.get_kv_cache_spec`` so a layer whose backend is kvplug's
    reports the compressed spec (0.32 asks the backend through ``customize_spec`` itself)."""
    if has_customize_spec():
        return False
    from vllm.model_executor.layers.attention.attention import Attention

    current = Attention.get_kv_cache_spec
    if getattr(current, ROUTED, False):
        return False

    @functools.wraps(current)
    def get_kv_cache_spec(self, vllm_config):
        spec = current(self, vllm_config)
        backend = self.get_attn_backend()
        if spec is not None and is_kvplug_backend(backend):
            spec = backend.customize_spec(spec)
        return spec

    setattr(get_kv_cache_spec, ROUTED, True)
    Attention.get_kv_cache_spec = get_kv_cache_spec
    return True


def kernel_block_sizes(backend_cls: type, spec=None) -> list:
    """``get_supported_kernel_block_sizes`` (takes the spec in 0.32, nothing in 0.26)."""
    try:
        return backend_cls.get_supported_kernel_block_sizes(spec)
    except TypeError:
        return backend_cls.get_supported_kernel_block_sizes()


# eviction -------------------------------------------------------------------------------
PROMPT_LENS = "kvplug_prompt_lens"
"""Attribute set on each step's attention metadata: the prompt length of each request ``[num_reqs]``."""


def supports_eviction() -> bool:
    """0.26 and 0.32: the KV-cache manager is told each request's prompt length when freeing
    blocks (``remove_skipped_blocks(..., num_prompt_tokens)``) and specs register their own manager
    (``vllm.v1.kv_cache_spec_registry``); earlier releases lack one or the other."""
    import inspect

    try:
        import vllm.v1.kv_cache_spec_registry  # noqa: F401
        from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager
    except ImportError:
        return False
    return "num_prompt_tokens" in inspect.signature(SingleTypeKVCacheManager.remove_skipped_blocks).parameters


def expose_prompt_lengths() -> bool:
    """Give the attention backend each request's prompt length, in both of vLLM's model runners
    (both know it but hand it to attention only for R-SWA models). True if a hook was installed."""
    v1 = _expose_prompt_lengths_v1()
    return _expose_prompt_lengths_v2() or v1


def _expose_prompt_lengths_v2() -> bool:
    """Target: ``vllm.v1.worker.gpu.model_runner.GPUModelRunner.prepare_inputs`` (the V2 model
    runner, 0.26 and 0.32; its default for Llama-like models in 0.26). The wrapped call sets the
    ``InputBatch``'s ``prompt_lens`` (left None unless the model is R-SWA) to the prompt length of
    each of the batch's requests, on the host (``req_states.prompt_len``, not ``prefill_len``, which
    grows after a preemption); vLLM's model state passes it to every builder as
    ``CommonAttentionMetadata.rswa_prefix_lens`` (vLLM's own backends read it only for R-SWA
    layers), where kvplug's CUDA builder takes it (``KVPlugCudaMetadataBuilder.build``)."""
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    except ImportError:  # pragma: no cover - releases without the V2 runner
        return False
    current = GPUModelRunner.prepare_inputs
    if getattr(current, ROUTED, False):
        return False

    @functools.wraps(current)
    def prepare_inputs(self, *args, **kwargs):
        batch = current(self, *args, **kwargs)
        if getattr(batch, "prompt_lens", None) is None and hasattr(batch, "idx_mapping_np"):
            batch.prompt_lens = torch.from_numpy(self.req_states.prompt_len.np[batch.idx_mapping_np[:batch.num_reqs]])
        return batch

    setattr(prepare_inputs, ROUTED, True)
    GPUModelRunner.prepare_inputs = prepare_inputs
    return True


def _expose_prompt_lengths_v1() -> bool:
    """Target: ``vllm.v1.worker.gpu_model_runner.GPUModelRunner._build_attention_metadata`` (the
    V1 model runner, 0.26 and 0.32; the CPU worker's base). Wrapped to attach the prompt lengths
    (``input_batch.num_prompt_tokens``) to the metadata it returns (the rows are the batch's
    requests in order; rows beyond them, as in warm-up runs, get none): through the metadata's
    own ``attach_prompt_lens`` where it has one (kvplug's CUDA backend), else as the attribute
    :data:`PROMPT_LENS`."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    current = GPUModelRunner._build_attention_metadata
    if getattr(current, ROUTED, False):
        return False

    @functools.wraps(current)
    def _build_attention_metadata(self, *args, **kwargs):
        metadata, rest = current(self, *args, **kwargs)
        batch = self.input_batch
        lens = batch.num_prompt_tokens_cpu_tensor[:batch.num_reqs].clone()
        for per_layer in metadata if isinstance(metadata, list) else [metadata]:
            for md in {id(md): md for md in per_layer.values()}.values():  # layers of a group share one
                attach = getattr(md, "attach_prompt_lens", None)
                if attach is not None:
                    attach(lens)
                else:
                    setattr(md, PROMPT_LENS, lens)
        return metadata, rest

    setattr(_build_attention_metadata, ROUTED, True)
    GPUModelRunner._build_attention_metadata = _build_attention_metadata
    return True


def required_prompt_lengths(lens):
    """``lens`` (the prompt lengths :func:`expose_prompt_lengths` attached to a step's metadata),
    or the error an evicting backend raises when a model runner it does not reach built the step."""
    if lens is None:
        raise RuntimeError("kvplug: eviction needs each request's prompt length in the attention metadata; "
                           "this vLLM model runner does not pass it")
    return lens


def register_model(architecture: str, model_cls: type, model_type: str, config_cls: type | None = None) -> bool:
    """Register ``model_cls`` for ``architecture`` with vLLM's ``ModelRegistry`` and, when given,
    ``config_cls`` for ``model_type`` with transformers' ``AutoConfig`` (both supported APIs, the
    same in 0.26 and 0.32; a second call is a no-op). False if vLLM has no registry."""
    try:
        from vllm import ModelRegistry
    except ImportError:  # pragma: no cover - every supported version has it
        return False
    if config_cls is not None:
        from transformers import AutoConfig

        try:
            AutoConfig.register(model_type, config_cls)
        except ValueError:  # already registered in this process
            pass
    if architecture not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(architecture, model_cls)
    return True


def register_connector(name: str, module: str, class_name: str) -> bool:
    """Register kvplug's KV connector with vLLM's ``KVConnectorFactory`` (the same API in 0.26 and
    0.32; registering twice raises there, so a second call is a no-op). False if vLLM has none."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    except ImportError:  # pragma: no cover - every supported version has it
        return False
    try:
        KVConnectorFactory.register_connector(name, module, class_name)
    except ValueError:  # already registered in this process
        pass
    return True


def host_hit_source():
    """The label of a connector's hits from host memory (0.32's ``CacheHitSource.HOST``; 0.26 has
    no labels: None)."""
    try:
        from vllm.v1.metrics.cache_hit_source import CacheHitSource
    except ImportError:
        return None
    return CacheHitSource.HOST
