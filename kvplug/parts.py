"""Base classes for strategy parts and their validated parameters.

A part is a small frozen dataclass: a codec (how a token is stored), a scorer (which tokens are
kept) or a budget (how many are kept per layer / head). Its parameters are dataclass fields made
with :func:`param`, which carries the allowed range, so the spec parser, ``kvplug show`` and the
error messages all read one declaration.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvplug.errors import SpecError
from kvplug.tokens import TokenCount


def param(default: Any, *, low: float | None = None, high: float | None = None,
          choices: tuple | None = None, doc: str = "") -> Any:
    """A part parameter with its allowed range (inclusive) or choices and a one-line doc."""
    return field(default=default, metadata={"low": low, "high": high, "choices": choices, "doc": doc})


@dataclass(frozen=True)
class Part:
    """A named, documented piece of a strategy. Subclasses set ``name``, ``kind`` and ``paper``."""

    name: ClassVar[str]
    kind: ClassVar[str]
    paper: ClassVar[str] = ""
    example: ClassVar[str] = ""  # a spec that runs, for a part with a required parameter (docs, tests)

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(self.name, f.name, hints[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            problem = _out_of_range(value, f.metadata)
            if problem:
                raise SpecError(f"{self.name}: {f.name}={value} is out of range; allowed: {problem}")

    @classmethod
    def parameters(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __str__(self) -> str:
        args = ", ".join(f"{k}={_spec_value(v)}" for k, v in self.params().items())
        return f"{self.name}({args})" if args else self.name

    @classmethod
    def summary(cls) -> str:
        """First line of the docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


NAME = r"[A-Za-z_][\w.-]*"
"""What the spec parser reads as a bare name (a part, a parameter, an unquoted string value)."""


def _spec_value(value: Any) -> str:
    """``value`` as the spec parser reads it back: a string that is not a plain name is quoted."""
    if isinstance(value, str) and not re.fullmatch(NAME, value):
        return "'" + value + "'" if "'" not in value else '"' + value + '"'
    return str(value)


def _coerce(part: str, name: str, hint: Any, value: Any) -> Any:
    if hint is TokenCount:
        try:
            return TokenCount.parse(value)
        except SpecError as e:
            raise SpecError(f"{part}: {name}={value!r}: {e}") from None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        if value is None:
            return None
        hint = options[0]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise SpecError(f"{part}: {name}={value!r} is not a boolean (true/false)")
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())
                                          or (isinstance(value, str) and value.strip().lstrip("-").isdigit())):
            raise SpecError(f"{part}: {name}={value!r} is not an integer")
        return int(value)
    if hint is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise SpecError(f"{part}: {name}={value!r} is not a number") from None
    if hint is str:
        return str(value)
    return value


def _out_of_range(value: Any, meta: dict) -> str | None:
    if value is None:
        return None
    if meta.get("choices") is not None and value not in meta["choices"]:
        return " | ".join(map(str, meta["choices"]))
    low, high = meta.get("low"), meta.get("high")
    if isinstance(value, TokenCount):
        return value.check(int(low) if low is not None else 1)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value or (low is not None and value < low) or (high is not None and value > high):
            lo = "-inf" if low is None else f"{low:g}"
            hi = "inf" if high is None else f"{high:g}"
            return f"{lo}..{hi}"
    return None
