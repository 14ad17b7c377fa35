"""Results of ``kvplug eval`` as a table, a validated JSON file and PNG plots; several runs compared."""

from __future__ import annotations

import json
from pathlib import Path

from rich.markup import escape
from rich.table import Table

SCHEMA_FILE = Path(__file__).with_name("schema.json")


def validate(results: dict) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``results`` follows ``schema.json``."""
    import jsonschema

    jsonschema.validate(results, json.loads(SCHEMA_FILE.read_text()))


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def retrieval_accuracy(result: dict, context: str) -> float | None:
    cells = result.get("retrieval", {}).get(context, {})
    return _mean(c["accuracy"] for c in cells.values())


def run_label(run: dict) -> str:
    """A short name for a results file: its folder's name (files are all called results.json)."""
    path = Path(run.get("_file", run["model"]))
    return path.parent.name if path.name == "results.json" else path.stem


def table(runs: list[dict]) -> Table:
    """One row per (run, strategy): memory ratio, then per context ppl (delta), retrieval, agreement."""
    contexts = sorted({c for run in runs for c in run["settings"]["contexts"]})
    t = Table(title="kvplug eval" + (f" ({model_name(runs[0])}, {runs[0]['device']})" if len(runs) == 1 else ""))
    t.add_column("strategy")
    t.add_column("KV vs DynamicCache")
    for c in contexts:
        flag = " (beyond trained length)" if any(beyond_training(run, c) for run in runs) else ""
        t.add_column(f"ppl @{c} (vs none){flag}")
        t.add_column(f"retrieval @{c}{flag}")
        t.add_column(f"agree @{c}{flag}")
    for run in runs:
        for r in run["results"]:
            name = escape(r["strategy"] if len(runs) == 1 else f"{r['strategy']} [{run_label(run)}]")
            if not r["ok"]:
                t.add_row(name, "[red]failed[/red]", r["error"][:80], *[""] * (3 * len(contexts) - 1))
                continue
            mem = _mean(m["ratio_vs_dynamic"] for m in r.get("memory", {}).values())
            cells = [f"{mem:.2f}x" if mem else "-"]
            for c in map(str, contexts):
                p = r.get("perplexity", {}).get(c)
                d = p and p["delta_vs_none"]
                cells.append(f"{p['ppl']:.3f} ({d:+.2%})" if p and d is not None else (f"{p['ppl']:.3f}" if p else "-"))
                acc = retrieval_accuracy(r, c)
                cells.append("-" if acc is None else f"{acc:.0%}")
                a = r.get("agreement", {}).get(c)
                cells.append("-" if a is None else f"{a['share']:.0%}")
            t.add_row(name, *cells)
    return t


def beyond_training(run: dict, context: str | int) -> bool:
    """Whether ``context`` exceeds the positions the run's model was trained for."""
    trained = run.get("trained_length")
    return trained is not None and int(context) > trained


def model_name(run: dict) -> str:
    """The model as titles show it: its folder or hub name, never a machine path."""
    return Path(run["model"]).name or run["model"]


def plots(runs: list[dict], out: Path) -> list[Path]:
    """quality_vs_memory.png: per context, the perplexity change against ``none`` and the
    retrieval accuracy against the KV bytes held per token (no mean over contexts: a context
    beyond the model's trained length is titled as such, its ``none`` already broken); and one
    retrieval heatmap (depth x context) per strategy of the first run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    out.mkdir(parents=True, exist_ok=True)
    written = []
    contexts = sorted({c for run in runs for r in run["results"] if r["ok"]
                       for c in (*r.get("perplexity", {}), *r.get("retrieval", {}))}, key=int)
    fig, axes = plt.subplots(2, max(1, len(contexts)), figsize=(4.2 * max(1, len(contexts)), 8), squeeze=False)
    for col, c in enumerate(contexts):
        ax_p, ax_r = axes[0][col], axes[1][col]
        for run in runs:
            tag = "" if len(runs) == 1 else f" [{run_label(run)}]"
            for r in run["results"]:
                mem = r.get("memory", {}).get(c) if r["ok"] else None
                if mem is None:
                    continue
                x = mem["kv_bytes_per_token"]
                delta = r.get("perplexity", {}).get(c, {}).get("delta_vs_none")
                if delta is not None:
                    ax_p.scatter(x, 100 * delta)
                    ax_p.annotate(r["strategy"] + tag, (x, 100 * delta), fontsize=7)
                acc = retrieval_accuracy(r, c) if c in r.get("retrieval", {}) else None
                if acc is not None:
                    ax_r.scatter(x, acc)
                    ax_r.annotate(r["strategy"] + tag, (x, acc), fontsize=7)
        beyond = any(beyond_training(run, c) for run in runs)
        note = f"\nbeyond the trained {runs[0]['trained_length']} positions: none itself fails" if beyond else ""
        for ax, label in ((ax_p, "perplexity change vs none (%)"), (ax_r, "retrieval accuracy")):
            ax.set_xscale("log")
            ax.set_xlabel("KV bytes held per token (all layers)")
            ax.set_ylabel(label)
            ax.set_title(f"context {c}{note}", fontsize=9, color="firebrick" if beyond else "black")
            ax.grid(alpha=0.3)
        ax_p.axhline(0, color="grey", lw=0.8)
        if max((abs(y) for y in ax_p.get_ylim()), default=0) > 60:
            ax_p.set_yscale("symlog", linthresh=10)  # a method 25x off must not flatten the rest
        for ax in (ax_p, ax_r):
            ax.xaxis.set_minor_formatter(NullFormatter())  # the log axis' minor labels overlap
    fig.suptitle(f"quality vs KV memory: {model_name(runs[0])} ({runs[0]['device']})")
    fig.tight_layout()
    path = out / "quality_vs_memory.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    for r in runs[0]["results"]:
        grid = r.get("retrieval")
        if not r["ok"] or not grid:
            continue
        contexts = sorted(grid, key=int)
        depths = sorted(grid[contexts[0]], key=float)
        data = [[grid[c][d]["accuracy"] for c in contexts] for d in depths]
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(contexts), 1.0 + 0.45 * len(depths)))
        im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(contexts)), contexts)
        ax.set_yticks(range(len(depths)), depths)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"retrieval: {r['strategy']}", fontsize=9)
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        safe = "".join(ch if ch.isalnum() else "_" for ch in r["strategy"]).strip("_")
        path = out / f"retrieval_{safe}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write(results: dict, out: Path) -> Path:
    """Validate and write ``results.json`` in ``out``."""
    validate(results)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1))
    return path


def load_runs(paths: list[str]) -> list[dict]:
    runs = []
    for p in paths:
        run = json.loads(Path(p).read_text())
        validate(run)
        run["_file"] = p
        runs.append(run)
    return runs
