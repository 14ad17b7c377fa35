"""The wheel installs everything under ``kvplug``; ``import kvplug`` stays engine-free."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_only_the_kvplug_top_level(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True)
    wheel = next(tmp_path.glob("kvplug-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"kvplug"}
    sources = {"kvplug": ROOT / "kvplug", "kvplug/adapters": ROOT / "adapters", "kvplug/triton_ops": ROOT / "triton_ops"}
    for prefix, folder in sources.items():
        for path in folder.rglob("*.py"):
            if "__pycache__" not in path.parts:
                assert f"{prefix}/{path.relative_to(folder).as_posix()}" in names, path
    assert "kvplug/eval/schema.json" in names
    assert "kvplug/weights/attention_gate-kvplug-ref.safetensors" in names  # a learned part's shipped tensors


def test_import_kvplug_loads_no_engine():
    code = ("import sys, kvplug, kvplug.cli; kvplug.parse('snapkv(budget=8)+kivi'); "
            "print(sorted(m for m in ('transformers', 'vllm', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_source_imports_adapters_or_triton_ops_as_a_top_level_module():
    """Installed there is no top-level ``adapters`` or ``triton_ops``; from the repository root they
    would import as second copies of kvplug's modules (transformers' Auto classes then hold two
    ``LckvForCausalLM``s, as a CI run showed), so every file imports them under ``kvplug``."""
    import ast

    found = []
    for folder in ("kvplug", "adapters", "triton_ops", "tests", "benchmarks", "examples", "models"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] in ("adapters", "triton_ops")]
    assert not found, found
