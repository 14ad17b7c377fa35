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
