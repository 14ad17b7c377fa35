"""``kvplug.eval``: quality, memory and agreement of strategies on one model, side by side.

    from kvplug.eval import EvalSettings, evaluate
    results = evaluate(EvalSettings(strategies=["int4", "snapkv(budget=25%)"], contexts=[1024]))

Needs the ``hf`` extra (transformers); ``kvplug eval`` is the command-line form.
"""

from .report import load_runs, plots, table, validate, write
from .runner import TASKS, EvalSettings, evaluate

__all__ = ["EvalSettings", "evaluate", "TASKS", "table", "plots", "write", "validate",
           "load_runs"]
