"""``kvplug.eval.evaluate``: run every task for every strategy, with progress, into one results dict."""

from __future__ import annotations

import math
import platform
import random
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.progress import Progress

from kvplug.config import parse
from kvplug.defaults import EVAL_STRATEGIES, EVAL_TASKS
from kvplug.errors import SpecError

from . import measure

SCHEMA = "kvplug-eval/1"
TASKS = EVAL_TASKS
REFERENCE_MODEL = Path(__file__).resolve().parents[2] / "models" / "kvplug-ref"


@dataclass
class EvalSettings:
    """What to measure. Contexts are prompt lengths in tokens; depths are needle depths in [0, 1]."""

    model: str = str(REFERENCE_MODEL)
    strategies: list[str] = field(default_factory=lambda: list(EVAL_STRATEGIES))
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    contexts: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    depths: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    trials: int = 8
    ppl_sequences: int = 4
    ppl_tokens: int = 64
    agreement_sequences: int = 2
    agreement_tokens: int = 128
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    seed: int = 0

    def check(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise SpecError(f"unknown task {unknown[0]!r}; tasks: {', '.join(TASKS)}")
        if not self.strategies:
            raise SpecError("no strategy to evaluate")
        bad = [d for d in self.depths if not 0 <= d <= 1]
        if bad:
            raise SpecError(f"depth={bad[0]} is out of range; allowed: 0..1")
        if any(c < 64 for c in self.contexts):
            raise SpecError(f"context={min(self.contexts)} is out of range; allowed: at least 64 tokens")


def load(settings: EvalSettings):
    """Model (eval mode, on the device), tokenizer and held-out token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvplug.retrieval import load_heldout_ids

    path = Path(settings.model)
    if settings.model == str(REFERENCE_MODEL) and not path.exists():
        raise SpecError(f"the reference model is not at {path}; pass --model PATH_OR_HUB_ID")
    dtype = torch.bfloat16 if settings.device.startswith("cuda") else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    model = AutoModelForCausalLM.from_pretrained(settings.model, dtype=dtype).to(settings.device).eval()
    heldout = path / "heldout.txt"
    source = load_heldout_ids(str(path), tokenizer) if heldout.exists() else None
    if source is None:
        raise SpecError(f"{settings.model} has no heldout.txt: kvplug eval needs held-out text beside the model")
    return model, tokenizer, source


def _run_strategy(spec: str, settings: EvalSettings, model, tokenizer, source, baseline: dict, progress,
                  task_id) -> dict:
    rng = random.Random(settings.seed)
    result: dict = {"strategy": spec, "ok": True, "error": None}
    device = settings.device
    for context in settings.contexts:
        key = str(context)
        if "perplexity" in settings.tasks:
            ids = measure.windows(source, context + settings.ppl_tokens, settings.ppl_sequences, rng, device)
            nll = float(measure.decode_nll(model, spec, ids, context))
            ppl = math.exp(nll)
            base = ppl if spec == "none" else baseline.get("perplexity", {}).get(key, {}).get("ppl")
            result.setdefault("perplexity", {})[key] = {
                "ppl": ppl, "nll": nll, "tokens": settings.ppl_sequences * settings.ppl_tokens,
                "delta_vs_none": None if base is None else ppl / base - 1}
            progress.advance(task_id)
        if "retrieval" in settings.tasks:
            cells = {}
            for i, depth in enumerate(settings.depths):
                correct, trials = measure.retrieval_cell(model, tokenizer, spec, source, context, depth,
                                                         settings.trials, settings.seed * 1000 + i, device)
                cells[f"{depth:g}"] = {"correct": correct, "trials": trials, "accuracy": correct / trials}
                progress.advance(task_id)
            result.setdefault("retrieval", {})[key] = cells
        if "agreement" in settings.tasks:
            prompt = measure.windows(source, context, settings.agreement_sequences, random.Random(context), device)
            tokens, _ = measure.greedy(model, spec, prompt, settings.agreement_tokens)
            ref = baseline.get("_agreement_tokens", {}).get(key)
            if ref is None:
                result.setdefault("_agreement_tokens", {})[key] = tokens
                share = 1.0
            else:
                share = float((tokens == ref).float().mean())
            result.setdefault("agreement", {})[key] = {"share": share, "tokens": tokens.numel()}
            progress.advance(task_id)
        if "memory" in settings.tasks:
            prompt = measure.windows(source, context, 1, rng, device)
            _, cache = measure.greedy(model, spec, prompt, 17)
            held, logical = cache.stored_bytes(), context + 16
            dynamic = measure.kv_bytes_dynamic(model, logical)
            result.setdefault("memory", {})[key] = {
                "kv_bytes": held, "tokens": logical, "kv_bytes_per_token": held / logical,
                "dynamic_cache_bytes": dynamic, "ratio_vs_dynamic": dynamic / held}
            progress.advance(task_id)
    return result


def evaluate(settings: EvalSettings | None = None, console=None) -> dict:
    """Run ``settings`` and return the results (schema ``kvplug-eval/1``, see ``schema.json``).

    ``none`` is always measured first: deltas and agreement are relative to it. A strategy that
    fails is recorded with ``ok: false`` and its error; the others still run.
    """
    settings = settings or EvalSettings()
    settings.check()
    strategies = list(dict.fromkeys(["none", *settings.strategies]))
    for spec in strategies:
        parse(spec)  # every spec is valid before any model work starts
    model, tokenizer, source = load(settings)
    per_context = (("perplexity" in settings.tasks) + ("agreement" in settings.tasks) + ("memory" in settings.tasks)
                   + len(settings.depths) * ("retrieval" in settings.tasks))
    started = time.time()
    results, baseline = [], {}
    with Progress(console=console, transient=False) as progress:
        task_id = progress.add_task("kvplug eval", total=len(strategies) * len(settings.contexts) * per_context)
        for spec in strategies:
            progress.update(task_id, description=f"{spec}")
            try:
                result = _run_strategy(spec, settings, model, tokenizer, source, baseline, progress, task_id)
            except Exception as e:  # reported in the table; the run goes on
                result = {"strategy": spec, "ok": False, "error": f"{type(e).__name__}: {e}",
                          "traceback": traceback.format_exc(limit=3)}
                progress.advance(task_id, per_context * len(settings.contexts))
            if spec == "none":
                baseline = result
            results.append(result)
    for r in results:
        r.pop("_agreement_tokens", None)
    return {
        "schema": SCHEMA,
        "model": settings.model,
        "device": settings.device,
        "machine": f"{platform.node()} {platform.machine()} ({torch.get_num_threads()} threads)"
                   + (f", {torch.cuda.get_device_name()}" if settings.device.startswith("cuda") else ""),
        "command": " ".join(sys.argv),
        "seconds": time.time() - started,
        "settings": asdict(settings),
        "results": results,
    }
