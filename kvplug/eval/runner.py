"""``kvplug.eval.evaluate``: run every task for every strategy, with progress, into one results dict."""

from __future__ import annotations

import math
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.progress import Progress

from kvplug.config import parse, split_paged
from kvplug.defaults import EVAL_STRATEGIES, EVAL_TASKS
from kvplug.memory import device_bytes as memory_device_bytes, dynamic_cache_bytes, held_bytes
from kvplug.errors import SpecError

from . import inputs, measure

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
    heldout: str = ""  # held-out text file; "" = heldout.txt beside the model
    cuda_graphs: bool = True  # on CUDA, decode steps of capturable caches replay a CUDA graph (same kernels)

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
    heldout = Path(settings.heldout) if settings.heldout else path / "heldout.txt"
    if not heldout.is_file():
        raise SpecError(f"{heldout} not found: kvplug eval needs held-out text (--heldout FILE, or heldout.txt "
                        f"beside the model)")
    return model, tokenizer, load_heldout_ids(str(path), tokenizer, str(heldout))


class _Board:
    """Per-strategy results; a strategy that raises is marked failed and skipped from then on."""

    def __init__(self, strategies: list[str]):
        self.results = {s: {"strategy": s, "ok": True, "error": None} for s in strategies}

    def live(self) -> list[str]:
        return [s for s, r in self.results.items() if r["ok"]]

    def each(self, fn) -> dict:
        """``fn(spec)`` for every live strategy; failures are recorded, not raised."""
        out = {}
        for spec in self.live():
            try:
                out[spec] = fn(spec)
            except Exception as e:  # reported in the table; the run goes on
                self.results[spec].update(ok=False, error=f"{type(e).__name__}: {e}",
                                          traceback=traceback.format_exc(limit=4))
        return out

    def put(self, task: str, context: int, values: dict) -> None:
        for spec, value in values.items():
            if self.results[spec]["ok"]:
                self.results[spec].setdefault(task, {})[str(context)] = value


def _context(board: _Board, settings: EvalSettings, context: int, model, tokenizer, source, progress, bar) -> None:
    seed, device = settings.seed, settings.device
    if "perplexity" in settings.tasks:
        ids = inputs.perplexity_ids(source, seed, context, settings.ppl_sequences, settings.ppl_tokens, device)
        prompt = measure.Prompt(model, ids[:, :context], settings.cuda_graphs)
        nll = board.each(lambda spec: measure.decode_nll(prompt, spec, ids[:, context:]))
        base = nll.get("none")
        board.put("perplexity", context, {
            spec: {"ppl": math.exp(v), "nll": v, "tokens": ids[:, context:].numel(),
                   "delta_vs_none": None if base is None else math.exp(v - base) - 1} for spec, v in nll.items()})
        progress.advance(bar)
    if "retrieval" in settings.tasks:
        cells: dict[str, dict] = {}
        for depth in settings.depths:
            samples = inputs.lookup_samples(tokenizer, source, seed, context, depth, settings.trials)
            prompt = measure.Prompt(model, torch.tensor([s.prompt_ids for s in samples], device=device),
                                    settings.cuda_graphs)
            steps = len(samples[0].answer_ids)
            hits = board.each(lambda spec: inputs.exact_matches(measure.greedy(prompt, spec, steps)[0], samples))
            for spec, correct in hits.items():
                cells.setdefault(spec, {})[f"{depth:g}"] = {"correct": correct, "trials": len(samples),
                                                            "accuracy": correct / len(samples)}
            progress.advance(bar)
        board.put("retrieval", context, cells)
    if "agreement" in settings.tasks:
        prompt = measure.Prompt(model, inputs.agreement_prompts(source, seed, context, settings.agreement_sequences,
                                                                device), settings.cuda_graphs)
        tokens = board.each(lambda spec: measure.greedy(prompt, spec, settings.agreement_tokens)[0])
        ref = tokens.get("none")
        if ref is not None:
            board.put("agreement", context, {spec: {"share": float((t == ref).float().mean()), "tokens": t.numel()}
                                             for spec, t in tokens.items()})
        progress.advance(bar)
    if "memory" in settings.tasks:
        prompt = measure.Prompt(model, inputs.memory_prompt(source, seed, context, device), settings.cuda_graphs)
        steps = 16
        def held(spec):  # (K/V bytes, bookkeeping bytes, accelerator K/V bytes); the cache is dropped at once
            cache = measure.greedy(prompt, spec, steps + 1)[1]
            return (held_bytes(cache), getattr(cache, "bookkeeping_bytes", lambda: 0)(),
                    memory_device_bytes(cache, device))

        sizes = board.each(held)
        logical = context + steps
        dynamic = dynamic_cache_bytes(model, logical)
        board.put("memory", context, {
            spec: {"kv_bytes": b, "tokens": logical, "kv_bytes_per_token": b / logical, "dynamic_cache_bytes": dynamic,
                   "ratio_vs_dynamic": dynamic / b, "bookkeeping_bytes": extra, "device_kv_bytes": device}
            for spec, (b, extra, device) in sizes.items()})
        progress.advance(bar)


def evaluate(settings: EvalSettings | None = None, console=None) -> dict:
    """Run ``settings`` and return the results (schema ``kvplug-eval/1``, see ``schema.json``).

    ``none`` is always measured: deltas and agreement are relative to it. A strategy that fails
    is recorded with ``ok: false`` and its error; the others still run.
    """
    settings = settings or EvalSettings()
    settings.check()
    strategies = list(dict.fromkeys(["none", *settings.strategies]))
    for spec in strategies:
        parse(split_paged(spec)[0])  # every spec is valid before any model work starts
    model, tokenizer, source = load(settings)
    per_context = (("perplexity" in settings.tasks) + ("agreement" in settings.tasks) + ("memory" in settings.tasks)
                   + len(settings.depths) * ("retrieval" in settings.tasks))
    started = time.time()
    board = _Board(strategies)
    with Progress(console=console) as progress:
        bar = progress.add_task(f"{len(strategies)} strategies", total=len(settings.contexts) * per_context)
        for context in settings.contexts:
            progress.update(bar, description=f"{len(strategies)} strategies, context {context}")
            _context(board, settings, context, model, tokenizer, source, progress, bar)
    results = list(board.results.values())
    return {
        "schema": SCHEMA,
        "model": settings.model,
        "device": settings.device,
        "machine": f"{platform.node()} {platform.machine()} ({torch.get_num_threads()} threads)"
                   + (f", {torch.cuda.get_device_name()}" if settings.device.startswith("cuda") else ""),
        "command": " ".join(sys.argv),
        "seconds": time.time() - started,
        "settings": asdict(settings),
        "trained_length": trained_length(model),
        "results": results,
    }


def trained_length(model) -> int | None:
    """The positions the model was trained for (``max_position_embeddings``), None if unstated."""
    text = model.config.get_text_config()
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None
