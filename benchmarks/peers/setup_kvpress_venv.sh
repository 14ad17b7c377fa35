#!/usr/bin/env bash
# Create the virtual environment that benchmarks/peers/kvpress_eval.py runs in.
#
# NVIDIA kvpress 0.5.5 requires transformers < 5.3, while kvplug needs a newer transformers, so
# kvpress gets its own venv. kvplug itself is NOT installed there: kvpress_eval.py puts the repo
# root on sys.path and imports only kvplug.eval.inputs and kvplug.retrieval (torch + pure Python;
# importing them runs kvplug/__init__.py, which needs pluggy).
#
#   bash benchmarks/peers/setup_kvpress_venv.sh            # -> data/venv-kvpress (git-ignored)
#   KVPRESS_VENV=/some/dir bash benchmarks/peers/setup_kvpress_venv.sh
#
# Versions can be overridden: TORCH_SPEC, KVPRESS_SPEC, TRANSFORMERS_SPEC, PYTHON.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${KVPRESS_VENV:-$ROOT/data/venv-kvpress}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"                  # the CPU build where pip finds one locally
KVPRESS_SPEC="${KVPRESS_SPEC:-kvpress==0.5.5}"
TRANSFORMERS_SPEC="${TRANSFORMERS_SPEC:-transformers==5.2.0}"  # newest release kvpress 0.5.5 accepts (<5.3)

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet)
# torch first, alone, so the resolver keeps this exact build for kvpress/peft/accelerate
"${PIP[@]}" "$TORCH_SPEC"
"${PIP[@]}" "$TORCH_SPEC" "$KVPRESS_SPEC" "$TRANSFORMERS_SPEC" pluggy jsonschema rich
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "transformers", "kvpress", "tokenizers", "pluggy"):
    print(f"{name}=={md.version(name)}")
import kvpress  # noqa: F401  (fails here, not later, if kvpress cannot import)
PY
echo "ready: $VENV/bin/python benchmarks/peers/kvpress_eval.py --help"
