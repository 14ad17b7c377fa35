"""``kvplug`` command line: list the registered parts, show a spec, evaluate and benchmark strategies."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from kvplug.config import parse, split_specs
from kvplug.defaults import BENCH_CACHES, EVAL_STRATEGIES, EVAL_TASKS
from kvplug.errors import SpecError
from kvplug.registry import default_registry


def _list(args: argparse.Namespace, console: Console) -> None:
    registry = default_registry()
    table = Table(title="kvplug strategy parts (combine with '+', e.g. snapkv(budget=25%)+int4)")
    for col in ("name", "kind", "paper", f"bytes/token/head (d={args.head_dim})", "fp16 / this", "plugin"):
        table.add_column(col)
    fp16 = 4 * args.head_dim
    for name in registry.names():
        cls = registry.get(name)
        if cls.kind == "codec":
            size = cls().bytes_per_token(args.head_dim)
            cells = (f"{size:g}", f"{fp16 / size:.2f}x")
        else:
            cells = ("-", "by eviction" if cls.kind == "scorer" else "-")
        table.add_row(name, cls.kind, cls.paper, *cells, registry.origin[name])
    console.print(table)


def _show(args: argparse.Namespace, console: Console) -> None:
    strategy = parse(args.spec)
    strategy.check_head_dim(args.head_dim)
    table = Table(title=f"strategy: {strategy}")
    for col in ("part", "kind", "parameter", "value", "meaning"):
        table.add_column(col)
    for part in strategy.parts:
        fields = part.parameters() or [None]
        for i, f in enumerate(fields):
            head = (part.name, part.kind) if i == 0 else ("", "")
            if f is None:
                table.add_row(*head, "-", "-", part.summary())
            else:
                table.add_row(*head, f.name, str(getattr(part, f.name)), f.metadata.get("doc", ""))
    console.print(table)
    kept = strategy.kept_per_row(_all_valid(args.context))[0].item() if strategy.scorer else args.context
    ratio = strategy.memory_ratio(args.head_dim, kept_share=kept / args.context, context=args.context)
    console.print(f"bytes per token per KV head (K+V, head_dim {args.head_dim}): "
                  f"{strategy.bytes_per_token(args.head_dim):g} (fp16: {4 * args.head_dim})")
    full = min(strategy.codec.residual, kept)
    window = f", the newest {full} in full precision" if full else ""
    console.print(f"at {args.context} prompt tokens: keeps {kept} per head{window}; KV memory ratio vs fp16: "
                  f"{ratio:.2f}x")
    if strategy.placement is not None and strategy.placement.accelerator_note(args.head_dim, args.context):
        console.print(strategy.placement.accelerator_note(args.head_dim, args.context))
    if strategy.merger is not None:
        console.print(f"{strategy.merger.name} stores merged layer pairs once: not in the ratio above, since it depends "
                      f"on the model's layers and on the tokens retained; `kvplug eval` measures it")


def _eval(args: argparse.Namespace, console: Console) -> None:
    from pathlib import Path

    from kvplug.eval import EvalSettings, evaluate, load_runs, plots, table, write

    if args.compare:
        runs = load_runs(args.compare)
        console.print(table(runs))
        for path in plots(runs, Path(args.out)):
            console.print(f"wrote {path}")
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = EvalSettings(strategies=split_specs(args.strategies), tasks=args.tasks.split(","),
                            contexts=[int(c) for c in args.contexts.split(",")],
                            depths=[float(d) for d in args.depths.split(",")], trials=args.trials, seed=args.seed)
    if args.model:
        settings.model = args.model
    if args.device:
        settings.device = args.device
    if args.heldout:
        settings.heldout = args.heldout
    settings.cuda_graphs = not args.eager
    results = evaluate(settings, console)
    out = Path(args.out)
    console.print(table([results]))
    console.print(f"wrote {write(results, out)}")
    for path in plots([results], out):
        console.print(f"wrote {path}")


def _bench(args: argparse.Namespace, console: Console) -> None:
    import json

    import torch

    from kvplug import bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    model = bench.load_model(args.model, args.preset, device, dtype)
    rows = bench.run(model, args.caches.split(";"), [int(b) for b in args.batch.split(",")],
                     [int(c) for c in args.contexts.split(",")], args.steps, device, console)
    console.print(bench.table(rows, f"kvplug bench: {args.model or args.preset}, {dtype}, {device}"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


def _all_valid(n: int):
    import torch

    return torch.ones(1, n, dtype=torch.bool)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvplug", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="table of every registered codec, scorer and budget")
    p_list.add_argument("--head-dim", type=int, default=128)
    p_show = sub.add_parser("show", help="parse SPEC and show its parameters and memory ratio")
    p_show.add_argument("spec")
    p_show.add_argument("--head-dim", type=int, default=128)
    p_show.add_argument("--context", type=int, default=8192, help="prompt length for eviction ratios")
    p_eval = sub.add_parser("eval", help="quality, retrieval, agreement and memory of strategies on a model")
    p_eval.add_argument("--model", help="checkpoint path or hub id (default: the shipped reference model)")
    p_eval.add_argument("--strategies", default=",".join(EVAL_STRATEGIES),
                        help="comma-separated specs (budgets may be percentages); 'none' is always added; "
                             "paged:SPEC / ref:SPEC force the paged layout / the reference path (default: paged on cuda)")
    p_eval.add_argument("--tasks", default=",".join(EVAL_TASKS))
    p_eval.add_argument("--contexts", default="1024,2048,4096", help="prompt lengths in tokens")
    p_eval.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="needle depths for retrieval")
    p_eval.add_argument("--trials", type=int, default=8, help="retrieval trials per (context, depth) cell")
    p_eval.add_argument("--device", default=None)
    p_eval.add_argument("--heldout", default="", metavar="FILE",
                        help="held-out text, documents joined by <|endoftext|> (default: heldout.txt beside the model)")
    p_eval.add_argument("--seed", type=int, default=0)
    p_eval.add_argument("--eager", action="store_true",
                        help="run every decode step eagerly (default on CUDA: replay a CUDA graph where the cache allows)")
    p_eval.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is faster on a small, shared CPU)")
    p_eval.add_argument("--out", default="kvplug-eval", help="folder for results.json and plots")
    p_eval.add_argument("--compare", nargs="+", metavar="RESULTS_JSON", help="table and plot of earlier runs")
    p_bench = sub.add_parser("bench", help="decode tokens/s and memory of strategies vs DynamicCache")
    p_bench.add_argument("--model", help="checkpoint (default: a random Llama of --preset)")
    p_bench.add_argument("--preset", default="tiny", choices=("tiny", "llama-8l"))
    p_bench.add_argument("--caches", default=";".join(BENCH_CACHES),
                         help="';'-separated: DynamicCache, OffloadedCache, QuantizedCache-4/-2 (optimum-quanto), kvplug specs "
                              "(paged:SPEC / ref:SPEC: the paged layout / the reference path; default paged on cuda; "
                              "graph:paged:SPEC: its decode step replayed as a CUDA graph)")
    p_bench.add_argument("--batch", default="1")
    p_bench.add_argument("--contexts", default="1024,4096")
    p_bench.add_argument("--steps", type=int, default=16)
    p_bench.add_argument("--device", default=None)
    p_bench.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    p_bench.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    console = Console()
    try:
        {"list": _list, "show": _show, "eval": _eval, "bench": _bench}[args.command](args, console)
    except SpecError as e:
        print(f"kvplug: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
