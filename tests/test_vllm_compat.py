"""The vLLM adapter's pieces that need no running engine: the 0.26/0.32 compatibility module, the
page layout (pure PyTorch), and how a strategy is selected and refused."""

import dataclasses
import importlib.util

import pytest
import torch

from kvplug import SpecError, parse
from kvplug.adapters.vllm import KEY, check_supported, compat, prefill_mode, selected_spec, selected_strategy
from kvplug.adapters.vllm.layout import PagedKV, TokenLayout
from kvplug.config import ENV_VAR

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")

CODECS = ["none", "int8", "int4", "int2", "int4(rotate=true)", "int2(rotate=true)", "int4(group=16)"]


# layout -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", CODECS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paged_store_then_gather_is_the_codec_roundtrip(spec, dtype, gen):
    codec = parse(spec).codec
    layout = TokenLayout.for_codec(codec, 64, dtype)
    assert layout.token_bytes == codec.bytes_per_token(64, 2)
    heads, block, blocks = 2, 32, 7
    cache = torch.zeros(blocks, heads, block, layout.token_bytes, dtype=torch.uint8)
    if spec == "none":  # vLLM keeps the model dtype for an uncompressed page
        cache = torch.zeros(blocks, heads, block, 2 * 64, dtype=dtype)
    paged = PagedKV(layout)
    n = 75
    k = torch.randn(n, heads, 64, generator=gen).to(dtype)
    v = torch.randn(n, heads, 64, generator=gen).to(dtype)
    table = torch.tensor([5, 0, 3, 6])
    slots = table[torch.arange(n) // block] * block + torch.arange(n) % block
    slots[10] = -1  # a padded token: skipped
    paged.store(cache, k, v, slots)
    keys, values = paged.gather(cache, table, n)
    want_k = codec.decode(codec.encode(k.transpose(0, 1), "key"), "key", dtype)
    want_v = codec.decode(codec.encode(v.transpose(0, 1), "value"), "value", dtype)
    keep = torch.arange(n) != 10
    assert torch.equal(keys[:, keep], want_k[:, keep])
    assert torch.equal(values[:, keep], want_v[:, keep])
    assert torch.count_nonzero(cache[1]) == 0 and torch.count_nonzero(cache[2]) == 0  # blocks not in the table


def test_int_page_is_the_triton_layout(gen):
    """Block page = [K/V, head, block codes then block (scale, zero) fp16]: triton_ops.PagedLayout."""
    codec = parse("int4").codec
    layout = TokenLayout.for_codec(codec, 64, torch.float16)
    cache = torch.zeros(2, 2, 16, layout.token_bytes, dtype=torch.uint8)
    k = torch.randn(1, 2, 64, generator=gen).half()
    v = torch.randn(1, 2, 64, generator=gen).half()
    PagedKV(layout).store(cache, k, v, torch.tensor([16 + 3]))  # block 1, offset 3
    page = cache[1].reshape(2, 2, 16 * (32 + 4))
    enc = codec.encode(v.transpose(0, 1), "value")
    head1 = page[1, 1]
    assert torch.equal(head1[3 * 32:4 * 32], enc["codes"][1, 0])
    meta = head1[16 * 32:].view(torch.float16).view(16, 2)
    assert meta[3, 0] == enc["scale"][1, 0, 0] and meta[3, 1] == enc["zero"][1, 0, 0]


def test_layout_refuses_a_wrong_page():
    layout = TokenLayout.for_codec(parse("int4").codec, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="bytes per token-head"):
        PagedKV(layout).pages(torch.zeros(2, 2, 16, 256, dtype=torch.bfloat16))


# selecting a strategy -----------------------------------------------------------------------------
@dataclasses.dataclass
class FakeModelConfig:
    head: int = 64
    dtype: torch.dtype = torch.bfloat16

    def get_head_size(self):
        return self.head


@dataclasses.dataclass
class FakeConfig:
    additional_config: dict = dataclasses.field(default_factory=dict)
    model_config: FakeModelConfig = dataclasses.field(default_factory=FakeModelConfig)


def test_selection_additional_config_wins_over_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert selected_spec(FakeConfig()) is None and selected_strategy(FakeConfig()) is None
    monkeypatch.setenv(ENV_VAR, "int2")
    assert str(selected_strategy(FakeConfig()).codec.name) == "int2"
    assert selected_strategy(FakeConfig({KEY: "int4(rotate=true)"})).codec.rotate
    assert selected_strategy(FakeConfig({KEY: {"int8": {}}})).codec.name == "int8"
    assert selected_spec(FakeConfig({"other": 1})) == "int2"


@pytest.mark.parametrize("spec, message", [
    ("int5", "unknown"),
    ("int4(bits=3)", "unknown parameter"),
    ("simlayerkv+int4", "decides per layer and request whether to evict"),
    ("h2o(budget=64)+pyramid", "keeps the same number of tokens in every layer while generating"),
    ("kivi(bits=2)", "groups of 32 tokens"),
    ("int4(residual=32)", "keeps the newest 32 in full precision"),
    ("minicache+int4", "shares pages between layers"),
])
def test_bad_or_unsupported_specs_are_one_line_errors(spec, message, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(SpecError, match=message) as info:
        selected_strategy(FakeConfig({KEY: spec}))
    assert "\n" not in str(info.value)


def test_prefill_mode_defaults_to_compressed_and_is_checked():
    assert prefill_mode(FakeConfig()) == "compressed" and prefill_mode(None) == "compressed"
    assert prefill_mode(FakeConfig({"kvplug_prefill": "uncompressed"})) == "uncompressed"
    with pytest.raises(SpecError, match="allowed: compressed, uncompressed"):
        prefill_mode(FakeConfig({"kvplug_prefill": "raw"}))


def test_head_dim_the_codec_cannot_store_is_refused():
    with pytest.raises(SpecError, match="power-of-two"):
        check_supported(parse("int4(rotate=true)"), head_dim=80)


def test_the_cuda_page_refuses_a_residual_window_and_keeps_the_rest():
    """The codec declares its window (PagedFormat.residual); the CUDA backend's pages cannot hold
    it, so its page function says so in one line rather than dropping the window."""
    from kvplug.adapters.vllm.capabilities import cuda_page

    with pytest.raises(SpecError, match="newest 32 tokens in full precision beside the pages") as info:
        cuda_page(parse("int4(residual=32)").codec, 128, torch.float16)
    assert "\n" not in str(info.value)
    assert cuda_page(parse("int4").codec, 128, torch.float16).bits == 4


# compat: versions, routing, page size -------------------------------------------------------------
def test_parse_version():
    assert compat.parse_version("0.32.0") == (0, 32)
    assert compat.parse_version("0.26.1.dev3+gabc") == (0, 26)
    with pytest.raises(ValueError):
        compat.parse_version("main")


class FakePlatform:
    calls = []

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        cls.calls.append(selected_backend)
        return "vllm.stock.Backend"

    @classmethod
    def check_and_update_config(cls, vllm_config):
        vllm_config.additional_config["checked"] = True


def test_route_backend_choice_is_pass_through_until_picked_and_idempotent():
    class Platform(FakePlatform):
        pass

    chosen = {"path": None}
    assert compat.route_backend_choice(lambda stock: chosen["path"], Platform)
    assert not compat.route_backend_choice(lambda stock: "never", Platform)  # installed once
    assert Platform.get_attn_backend_cls(None, None) == "vllm.stock.Backend"
    chosen["path"] = "kvplug.Backend"
    assert Platform.get_attn_backend_cls("CPU_ATTN", None, num_heads=4) == "kvplug.Backend"
    assert FakePlatform.get_attn_backend_cls(None, None) == "vllm.stock.Backend"  # base class untouched


def test_check_config_runs_after_vllm_own_check():
    class Platform(FakePlatform):
        pass

    seen = []
    compat.check_config_on_creation(lambda cfg: seen.append(dict(cfg.additional_config)), Platform)
    Platform.check_and_update_config(FakeConfig())
    assert seen == [{"checked": True}]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Spec026:
    """The shape of 0.26's FullAttentionSpec: page size from ``real_page_size_bytes``, no hook."""

    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype

    @property
    def real_page_size_bytes(self):
        return 2 * self.block_size * self.num_kv_heads * self.head_size * self.dtype.itemsize

    @classmethod
    def merge(cls, specs):
        return specs[0]


def test_compressed_spec_026_reports_kvplug_page_and_merges():
    spec = Spec026(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    assert spec.real_page_size_bytes == 16 * 2 * 256
    packed = compat.compressed_spec(spec, 72)
    assert packed.real_page_size_bytes == 16 * 2 * 72 and packed.dtype == torch.uint8
    assert isinstance(packed, Spec026) and type(packed).merge([packed, packed]).kvplug_token_bytes == 72
    with pytest.raises(ValueError, match="differ"):
        type(packed).merge([packed, compat.compressed_spec(spec, 40)])
    shape = compat.kv_cache_shape(10, 16, 2, 72)
    assert shape == (10, 2, 16, 72) and 72 * 16 * 2 == packed.real_page_size_bytes


def test_kernel_block_sizes_either_signature():
    class New:
        @staticmethod
        def get_supported_kernel_block_sizes(kv_cache_spec=None):
            return [32]

    class Old:
        @staticmethod
        def get_supported_kernel_block_sizes():
            return [16]

    assert compat.kernel_block_sizes(New, object()) == [32]
    assert compat.kernel_block_sizes(Old, object()) == [16]


@needs_vllm
def test_compressed_spec_032_uses_state_content_bytes():
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    if not compat.has_customize_spec():
        pytest.skip("this vLLM has no customize_spec (0.26 path tested above)")
    spec = FullAttentionSpec(block_size=128, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    packed = compat.compressed_spec(spec, 72)
    assert packed.page_size_bytes * 256 == spec.page_size_bytes * 72
    assert packed.dtype == torch.uint8 and compat.compressed_spec(packed, 72) is packed


@pytest.mark.parametrize("spec", ["none", "int8", "int4", "int2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pages_are_byte_identical_to_triton_ops_reference(spec, dtype, gen):
    """The GPU path can hand vLLM's cache to kvplug.triton_ops as it is: same bytes, other shape."""
    triton_ops = pytest.importorskip("kvplug.triton_ops")
    from kvplug.adapters.vllm.layout import as_triton_cache

    codec = parse(spec).codec
    heads, block, blocks, n = 2, 16, 5, 40
    try:
        paged_layout = triton_ops.PagedLayout.for_codec(codec, block, heads, 64, dtype)
    except (TypeError, ValueError) as e:  # pragma: no cover - triton_ops is being written beside us
        pytest.skip(f"triton_ops.PagedLayout API differs: {e}")
    layout = TokenLayout.for_codec(codec, 64, dtype)
    width = layout.token_bytes // (dtype.itemsize if spec == "none" else 1)
    storage = dtype if spec == "none" else torch.uint8
    ours = torch.zeros(blocks, heads, block, width, dtype=storage)
    theirs = torch.zeros(blocks, heads, block, width, dtype=storage)
    k = torch.randn(n, heads, 64, generator=gen).to(dtype)
    v = torch.randn(n, heads, 64, generator=gen).to(dtype)
    slots = torch.randperm(blocks * block, generator=gen)[:n]
    PagedKV(layout).store(ours, k, v, slots)
    view = as_triton_cache(theirs, paged_layout)
    assert view.data_ptr() == theirs.data_ptr()
    triton_ops.store_kv_reference(k, v, view, slots, paged_layout)
    assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))
