"""The one parser for the strategy a user writes, shared by every entry point.

Accepted forms (all give a :class:`kvplug.strategy.Strategy`)::

    "int4"
    "kivi(bits=2, group=32, residual=128)"
    "snapkv(budget=1024)+int4"          "snapkv(budget=25%)+pyramid+kivi(bits=2)"
    {"snapkv": {"budget": 1024}, "int4": {}}       # dict: part name -> parameters
    [{"name": "snapkv", "budget": 1024}, "int4"]   # list of parts
    os.environ["KVPLUG_STRATEGY"] = "int4"         # read by resolve()

Every error is a :class:`kvplug.errors.SpecError` with a one-line message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from kvplug.errors import SpecError
from kvplug.parts import NAME, Part
from kvplug.registry import Registry, default_registry
from kvplug.strategy import Strategy

ENV_VAR = "KVPLUG_STRATEGY"
_TOKEN = re.compile(rf"\s*(?:(?P<name>{NAME})|(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?%?)"
                    r"|(?P<str>\"[^\"]*\"|'[^']*')|(?P<op>[()+,=]))")
_ROLES = {"codec": "codec", "scorer": "scorer", "budget": "budget", "merger": "merger", "placement": "placement"}


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise SpecError(f"cannot parse strategy {text!r}: unexpected {text[pos:].strip()[:20]!r} at column {pos + 1}")
        kind = m.lastgroup
        value = m.group(kind)
        out.append((kind, value.strip("\"'") if kind == "str" else value, m.start(kind)))
        pos = m.end()
    return out


def _parse_text(text: str) -> list[tuple[str, dict[str, Any]]]:
    toks = _tokens(text)
    if not toks:
        raise SpecError("empty strategy spec; write e.g. 'int4' or 'snapkv(budget=1024)+int4'")
    parts, i = [], 0

    def expect(what: str) -> tuple[str, str, int]:
        nonlocal i
        if i >= len(toks):
            raise SpecError(f"cannot parse strategy {text!r}: expected {what} at the end")
        tok = toks[i]
        i += 1
        return tok

    while True:
        kind, name, col = expect("a part name")
        if kind != "name":
            raise SpecError(f"cannot parse strategy {text!r}: expected a part name at column {col + 1}, got {name!r}")
        args: dict[str, Any] = {}
        if i < len(toks) and toks[i][1] == "(":
            i += 1
            while toks[i:] and toks[i][1] != ")":
                k_kind, key, k_col = expect("a parameter name")
                if k_kind != "name":
                    raise SpecError(f"cannot parse strategy {text!r}: expected parameter name at column {k_col + 1}")
                if expect("'='")[1] != "=":
                    raise SpecError(f"cannot parse strategy {text!r}: expected '=' after {key!r}")
                v_kind, value, v_col = expect("a value")
                if v_kind == "op":
                    raise SpecError(f"cannot parse strategy {text!r}: expected a value for {key!r} at column {v_col + 1}")
                if key in args:
                    raise SpecError(f"{name}: parameter {key!r} given twice")
                args[key] = value
                if toks[i:] and toks[i][1] == ",":
                    i += 1
            expect("')'")
        parts.append((name, args))
        if i == len(toks):
            return parts
        kind, op, col = expect("'+'")
        if op != "+":
            raise SpecError(f"cannot parse strategy {text!r}: expected '+' between parts at column {col + 1}, got {op!r}")


def _parse_items(spec: Any) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(spec, str):
        return _parse_text(spec)
    if isinstance(spec, Mapping):
        if "name" in spec:
            args = {k: v for k, v in spec.items() if k != "name"}
            return [(str(spec["name"]), args)]
        items = []
        for name, args in spec.items():
            if args is not None and not isinstance(args, Mapping):
                raise SpecError(f"{name}: parameters must be a mapping, got {args!r}")
            items.append((str(name), dict(args or {})))
        return items
    if isinstance(spec, Sequence):
        return [item for element in spec for item in _parse_items(element)]
    raise SpecError(f"a strategy is a string, a mapping or a list of parts, got {type(spec).__name__}")


def build_part(cls: type[Part], args: Mapping[str, Any]) -> Part:
    """Instantiate ``cls`` from user-written arguments, naming any unknown parameter."""
    known = [p.name for p in cls.parameters()]
    for key in args:
        if key not in known:
            allowed = ", ".join(known) if known else "none"
            raise SpecError(f"{cls.name}: unknown parameter {key!r}; parameters: {allowed}")
    return cls(**args)


def parse(spec: Any, registry: Registry | None = None) -> Strategy:
    """Parse a spec string / mapping / list (or pass a Strategy through)."""
    if isinstance(spec, Strategy):
        return spec
    registry = registry or default_registry()
    chosen: dict[str, Part] = {}
    for name, args in _parse_items(spec):
        part = build_part(registry.get(name), args)
        role = _ROLES.get(part.kind)
        if role is None:
            raise SpecError(f"{name}: parts of kind {part.kind!r} are not supported by this kvplug version")
        if role in chosen:
            raise SpecError(f"a strategy has at most one {role}: got {chosen[role].name!r} and {name!r}")
        chosen[role] = part
    if "budget" in chosen and "scorer" not in chosen:
        raise SpecError(f"{chosen['budget'].name} splits a scorer's budget; add a scorer, e.g. "
                        f"'snapkv(budget=1024)+{chosen['budget'].name}'")
    if "merger" in chosen and "scorer" in chosen:
        raise SpecError(f"{chosen['merger'].name} merges every prompt token of a layer pair, which eviction "
                        f"({chosen['scorer'].name}) would leave different in the two layers; use one of them")
    placement = chosen.get("placement")
    if placement is not None:
        other = chosen.get("scorer") or chosen.get("merger")
        if other is not None:
            raise SpecError(f"{placement.name} fetches from every token a layer ever held, which {other.name} "
                            f"would drop or share; use one of them")
        codec = chosen.get("codec")
        if codec is not None and not codec.per_token:
            raise SpecError(f"{placement.name} fetches single tokens, which {codec.name} cannot decode alone (it "
                            f"quantizes groups of {codec.token_group} tokens, the newest {codec.residual} in full "
                            f"precision); use a per-token codec (int8/int4/mixed, no residual)")
    return Strategy(**chosen)


LAYOUTS = {"paged:": True, "ref:": False}
"""Prefixes of a cache name in ``kvplug eval``/``kvplug bench``: ``paged:SPEC`` keeps the spec in
the paged layout the Triton decode kernel reads, ``ref:SPEC`` on the reference path (the
``paged`` argument of ``kvplug.hf.cache``); without one, the default (paged on CUDA)."""


def split_paged(name: str) -> tuple[str, bool | None]:
    """``("int4", True)`` for ``"paged:int4"``, ``("int4", False)`` for ``"ref:int4"``, else ``(name, None)``."""
    for prefix, paged in LAYOUTS.items():
        if name.startswith(prefix):
            return name[len(prefix):], paged
    return name, None


def split_specs(text: str) -> list[str]:
    """Split a comma-separated list of specs, ignoring commas inside parentheses."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return [p for p in parts + [current.strip()] if p]


def resolve(spec: Any = None, registry: Registry | None = None) -> Strategy:
    """``spec`` if given, else ``$KVPLUG_STRATEGY``, else no compression."""
    if spec is None:
        spec = os.environ.get(ENV_VAR) or "none"
    return parse(spec, registry)
