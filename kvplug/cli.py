"""``kvplug`` command line: list the registered strategy parts, show what a spec means."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from kvplug.config import parse
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
    ratio = strategy.memory_ratio(args.head_dim, kept_share=kept / args.context)
    console.print(f"bytes per token per KV head (K+V, head_dim {args.head_dim}): "
                  f"{strategy.bytes_per_token(args.head_dim):g} (fp16: {4 * args.head_dim})")
    console.print(f"at {args.context} prompt tokens: keeps {kept} per head; KV memory ratio vs fp16: {ratio:.2f}x")


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
    args = parser.parse_args(argv)
    console = Console()
    try:
        {"list": _list, "show": _show}[args.command](args, console)
    except SpecError as e:
        print(f"kvplug: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
