"""``kvplug.eval``: quality, memory and agreement of strategies on one model, side by side.

    from kvplug.eval import EvalSettings, evaluate
    results = evaluate(EvalSettings(strategies=["int4", "snapkv(budget=25%)"], contexts=[1024]))

Needs the ``hf`` extra (transformers); ``kvplug eval`` is the command-line form. The names load
lazily, so ``kvplug.eval.inputs`` (torch only) imports where transformers is older or absent.
"""

import importlib

_NAMES = {"EvalSettings": "runner", "evaluate": "runner", "TASKS": "runner", "table": "report", "plots": "report",
          "write": "report", "validate": "report", "load_runs": "report"}
__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
