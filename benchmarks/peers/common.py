"""The measurement protocol of ``kvplug eval``, re-implemented for caches that are not kvplug's.

Used by ``quantized_cache.py`` (main venv, transformers 5.x) and ``kvpress_eval.py`` (kvpress's
own venv, transformers < 5.3, where kvplug is not installed: the repository root goes on
``sys.path``), so it imports only torch, the standard library and kvplug modules that need no
transformers: ``kvplug.eval.inputs`` (the inputs), ``kvplug.memory`` (bytes a cache holds),
``kvplug.eval.report`` (writes and validates ``results.json``) and ``kvplug.retrieval``.

Every input comes from ``inputs.py`` with the same (seed, context, task), so the tokens are
exactly those ``kvplug eval`` uses. The protocol is kvplug's (``kvplug/eval/measure.py`` and
``runner.py``): the prompt goes through the model with the method's cache in one forward
(``logits_to_keep=1``), then tokens are fed one at a time through that cache, with explicit
position ids (a cache that evicted tokens at prefill reports a shorter length than the number of
tokens seen). The only difference from kvplug: each method runs its own prefill (kvplug runs the
prompt once and forks the cache; the prompt's attention is the same either way).
"""

from __future__ import annotations

import array
import contextlib
import json
import math
import platform
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
REFERENCE_MODEL = REPO / "models" / "kvplug-ref"
SCHEMA = "kvplug-eval/1"
TASKS = ("perplexity", "retrieval", "agreement", "memory")

# ``kvplug eval``'s defaults (kvplug/cli.py, kvplug/eval/runner.py: EvalSettings)
DEFAULT_CONTEXTS = "1024,2048,4096"
DEFAULT_DEPTHS = "0.1,0.3,0.5,0.7,0.9"
DEFAULT_TRIALS = 8
PPL_SEQUENCES, PPL_TOKENS = 4, 64
AGREEMENT_SEQUENCES, AGREEMENT_TOKENS = 2, 128
MEMORY_STEPS = 16


if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # kvplug from the work tree (not installed in kvpress's venv)
from kvplug import memory  # noqa: E402
from kvplug.eval import inputs  # noqa: E402
from kvplug.eval.report import write  # noqa: E402  (validates against kvplug/eval/schema.json)
from kvplug.retrieval import load_heldout_ids  # noqa: E402


def fingerprint(ids: list[int]) -> str:
    """``N tokens, crc32 X``: equal in two environments iff they tokenized the held-out text alike."""
    return f"{len(ids)} tokens, crc32 {zlib.crc32(array.array('i', ids).tobytes()):08x}"


# -- caches ----------------------------------------------------------------------------------------
held_bytes, kv_bytes_dynamic = memory.held_bytes, memory.dynamic_cache_bytes


@dataclass
class Method:
    """A way to hold the KV cache: ``make_cache()`` gives a fresh transformers cache and
    ``prefill_context()`` wraps the prompt's forward (e.g. a kvpress press; nothing by default)."""

    name: str
    make_cache: Callable[[], object]
    prefill_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


class Session:
    """A prompt ``[B, T]`` through the model with ``method``'s cache; :meth:`step` feeds one token per row."""

    @torch.no_grad()
    def __init__(self, model, method: Method, ids: torch.Tensor):
        self.model = model
        self.cache = method.make_cache()
        with method.prefill_context():
            out = model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.logits = out.logits[:, -1]
        self.next_position = ids.shape[1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        pos = torch.full((b, 1), self.next_position, dtype=torch.long, device=tokens.device)
        out = self.model(input_ids=tokens[:, None], past_key_values=self.cache, position_ids=pos, use_cache=True)
        self.next_position += 1
        self.logits = out.logits[:, -1]
        return self.logits


@torch.no_grad()
def decode_nll(model, method: Method, prompt: torch.Tensor, continuation: torch.Tensor) -> float:
    """Mean NLL of ``continuation`` ``[B, N]`` fed one token at a time after ``prompt`` (kvplug's
    ``measure.decode_nll``)."""
    s = Session(model, method, prompt)
    logits, total = s.logits, 0.0
    for t in range(continuation.shape[1]):
        total += float(F.cross_entropy(logits.float(), continuation[:, t], reduction="sum"))
        if t + 1 < continuation.shape[1]:
            logits = s.step(continuation[:, t])
    return total / continuation.numel()


@torch.no_grad()
def greedy(model, method: Method, prompt: torch.Tensor, steps: int):
    """Greedy continuation ``[B, steps]`` and the session (cache) it ends with (kvplug's ``measure.greedy``)."""
    s = Session(model, method, prompt)
    logits, out = s.logits, []
    for i in range(steps):
        token = logits.argmax(-1)
        out.append(token)
        if i + 1 < steps:
            logits = s.step(token)
    return torch.stack(out, 1), s


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class Settings:
    model: str
    contexts: list[int]
    depths: list[float]
    trials: int
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    seed: int = 0
    device: str = "cpu"
    ppl_sequences: int = PPL_SEQUENCES
    ppl_tokens: int = PPL_TOKENS
    agreement_sequences: int = AGREEMENT_SEQUENCES
    agreement_tokens: int = AGREEMENT_TOKENS


class Board:
    """Per-method results; a method that raises is marked failed and skipped from then on (as kvplug's)."""

    def __init__(self, names: list[str]):
        self.results = {n: {"strategy": n, "ok": True, "error": None, "seconds": 0.0} for n in names}

    def each(self, methods: list[Method], fn) -> dict:
        out = {}
        for m in methods:
            r = self.results[m.name]
            if not r["ok"]:
                continue
            start = time.perf_counter()
            try:
                out[m.name] = fn(m)
            except Exception as e:  # reported in the table; the run goes on
                r.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=6))
                print(f"  {m.name} FAILED: {r['error']}", file=sys.stderr)
            r["seconds"] += time.perf_counter() - start
        return out

    def put(self, task: str, context: int, values: dict) -> None:
        for name, value in values.items():
            if self.results[name]["ok"]:
                self.results[name].setdefault(task, {})[str(context)] = value


def run(model, tokenizer, source, methods: list[Method], settings: Settings, extra: dict | None = None) -> dict:
    """Every task of ``settings`` for every method (the first must be the plain baseline, named
    ``none``: perplexity deltas and agreement are relative to it). Returns a kvplug-eval/1 dict that
    records the held-out tokens' fingerprint (so runs in different venvs can be shown to share inputs)."""
    assert methods[0].name == "none", "the first method is the baseline"
    seed, device = settings.seed, settings.device
    board = Board([m.name for m in methods])
    started = time.time()

    def log(msg):
        print(f"[{time.time() - started:7.1f}s] {msg}", file=sys.stderr, flush=True)

    for context in settings.contexts:
        if "perplexity" in settings.tasks:
            log(f"context {context}: perplexity")
            ids = inputs.perplexity_ids(source, seed, context, settings.ppl_sequences, settings.ppl_tokens, device)
            nll = board.each(methods, lambda m: decode_nll(model, m, ids[:, :context], ids[:, context:]))
            base = nll.get("none")
            board.put("perplexity", context, {
                n: {"ppl": math.exp(v), "nll": v, "tokens": ids[:, context:].numel(),
                    "delta_vs_none": None if base is None else math.exp(v - base) - 1} for n, v in nll.items()})
        if "retrieval" in settings.tasks:
            cells: dict[str, dict] = {}
            for depth in settings.depths:
                log(f"context {context}: retrieval depth {depth:g}")
                samples = inputs.lookup_samples(tokenizer, source, seed, context, depth, settings.trials)
                prompt = torch.tensor([s.prompt_ids for s in samples], device=device)
                steps = len(samples[0].answer_ids)
                hits = board.each(methods, lambda m: inputs.exact_matches(greedy(model, m, prompt, steps)[0], samples))
                for n, correct in hits.items():
                    cells.setdefault(n, {})[f"{depth:g}"] = {"correct": correct, "trials": len(samples),
                                                             "accuracy": correct / len(samples)}
            board.put("retrieval", context, cells)
        if "agreement" in settings.tasks:
            log(f"context {context}: agreement")
            prompt = inputs.agreement_prompts(source, seed, context, settings.agreement_sequences, device)
            tokens = board.each(methods, lambda m: greedy(model, m, prompt, settings.agreement_tokens)[0])
            ref = tokens.get("none")
            if ref is not None:
                board.put("agreement", context, {n: {"share": float((t == ref).float().mean()), "tokens": t.numel()}
                                                 for n, t in tokens.items()})
        if "memory" in settings.tasks:
            log(f"context {context}: memory")
            prompt = inputs.memory_prompt(source, seed, context, device)
            held = board.each(methods, lambda m: held_bytes(greedy(model, m, prompt, MEMORY_STEPS + 1)[1].cache))
            logical = context + MEMORY_STEPS
            dynamic = kv_bytes_dynamic(model, logical)
            board.put("memory", context, {
                n: {"kv_bytes": b, "tokens": logical, "kv_bytes_per_token": b / logical,
                    "dynamic_cache_bytes": dynamic, "ratio_vs_dynamic": dynamic / b} for n, b in held.items()})
    log("done")
    settings_dict = {**settings.__dict__, "strategies": [m.name for m in methods]}
    return {
        "schema": SCHEMA,
        "model": settings.model,
        "device": settings.device,
        "machine": f"{platform.node()} {platform.machine()} ({torch.get_num_threads()} threads)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seconds": time.time() - started,
        "settings": settings_dict,
        "heldout_fingerprint": fingerprint(source),
        **(extra or {}),
        "results": list(board.results.values()),
    }


def finish(results: dict, args) -> None:
    """Write ``OUT/results.json`` (validated), compare ``none`` with ``--reference``, list strategies."""
    path = write(results, Path(args.out))
    print(f"wrote {path}")
    for line in check_against(results, args.reference):
        print(line)
    for r in results["results"]:
        print(r["strategy"], "ok" if r["ok"] else f"FAILED: {r['error']}", f"{r['seconds']:.1f}s")


def add_common_args(p, default_out: str) -> None:
    """The options both peer scripts share, with ``kvplug eval``'s defaults."""
    p.add_argument("--model", default=str(REFERENCE_MODEL),
                   help="checkpoint directory with heldout.txt beside it (default: the shipped reference model)")
    p.add_argument("--contexts", default=DEFAULT_CONTEXTS, help="prompt lengths in tokens")
    p.add_argument("--depths", default=DEFAULT_DEPTHS, help="needle depths for retrieval")
    p.add_argument("--trials", type=int, default=DEFAULT_TRIALS, help="retrieval trials per (context, depth) cell")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=default_out, help=f"folder for results.json (default: {default_out})")


def settings_from(args) -> Settings:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise SystemExit(f"unknown task {bad[0]!r}; tasks: {', '.join(TASKS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return Settings(model=args.model, contexts=[int(c) for c in args.contexts.split(",")],
                    depths=[float(d) for d in args.depths.split(",")], trials=args.trials, tasks=tasks,
                    seed=args.seed)


def check_against(results: dict, reference: str | None, tolerance: float = 1e-3) -> list[str]:
    """Lines comparing this run's ``none`` perplexity with a ``kvplug eval`` results file's (same
    inputs, same model: they must agree to float tolerance, or the peer's numbers are not comparable)."""
    if not reference:
        return []
    ref = json.loads(Path(reference).read_text())
    ours = next(r for r in results["results"] if r["strategy"] == "none")
    theirs = next((r for r in ref["results"] if r["strategy"] == "none"), None)
    if theirs is None:
        return [f"{reference} has no 'none' row to check against"]
    lines = []
    for c, p in ours.get("perplexity", {}).items():
        q = theirs.get("perplexity", {}).get(c)
        if q is None:
            lines.append(f"context {c}: not in {reference}")
            continue
        rel = p["ppl"] / q["ppl"] - 1
        verdict = "OK" if abs(rel) <= tolerance else "MISMATCH"
        lines.append(f"context {c}: none ppl {p['ppl']:.5f} here vs {q['ppl']:.5f} in kvplug eval ({rel:+.2e}) {verdict}")
    return lines


# -- model -----------------------------------------------------------------------------------------
def load(model_path: str, device: str = "cpu"):
    """Model (float32 on CPU, bf16 on CUDA, eval mode), tokenizer and held-out ids, as ``kvplug eval``
    loads them, with transformers 4.x or 5.x.

    transformers 4.x reads ``rope_theta`` but not 5.x's ``rope_parameters`` (the reference model's
    config has only the latter): the theta is passed explicitly there, and the rotary frequencies
    are checked against config.json either way. A tokenizer_config naming ``TokenizersBackend``
    (5.x) falls back to ``PreTrainedTokenizerFast(tokenizer_file=...)``.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = Path(model_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (ValueError, OSError, AttributeError) as e:
        if not (path / "tokenizer.json").exists():
            raise
        print(f"AutoTokenizer failed ({type(e).__name__}); using PreTrainedTokenizerFast(tokenizer_file=...)",
              file=sys.stderr)
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    theta = _rope_theta_on_disk(path)
    config = AutoConfig.from_pretrained(model_path)
    if theta is not None and not hasattr(config, "rope_parameters"):  # 4.x: sets rope_theta only
        config.rope_theta = theta
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    major = int(transformers.__version__.split(".")[0])
    kw = {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(model_path, config=config, **kw).to(device).eval()
    _check_rope(model, theta)
    if not (path / "heldout.txt").exists():
        raise SystemExit(f"{model_path} has no heldout.txt: the peers need the held-out text beside the model")
    return model, tokenizer, load_heldout_ids(str(path), tokenizer)


def _rope_theta_on_disk(path: Path) -> float | None:
    cfg = path / "config.json"
    if not cfg.exists():
        return None
    data = json.loads(cfg.read_text())
    rp = data.get("rope_parameters") or {}
    return rp.get("rope_theta", data.get("rope_theta"))


def _check_rope(model, theta: float | None) -> None:
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    inv = getattr(rotary, "inv_freq", None)
    if theta is None or inv is None or getattr(rotary, "rope_type", "default") != "default":
        return
    d = inv.shape[0] * 2
    expected = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    if not torch.allclose(inv.float().cpu(), expected, rtol=1e-5):
        raise SystemExit(f"rotary frequencies do not match rope_theta={theta} of config.json")
