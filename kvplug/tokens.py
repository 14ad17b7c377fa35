"""A token count written either absolutely (``1024``) or as a share of the prompt (``25%``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvplug.errors import SpecError


@dataclass(frozen=True)
class TokenCount:
    """``tokens`` absolute, or ``fraction`` of the tokens present (0 < fraction <= 1)."""

    tokens: int | None = None
    fraction: float | None = None

    def __post_init__(self):
        if (self.tokens is None) == (self.fraction is None):
            raise SpecError("a token count is either a number of tokens or a percentage, not both")

    @classmethod
    def parse(cls, value: object) -> TokenCount:
        """Accept ``1024``, ``"1024"``, ``"25%"`` or a float in (0, 1) meaning a share."""
        if isinstance(value, TokenCount):
            return value
        if isinstance(value, bool):
            raise SpecError(f"expected a token count or a percentage, got {value!r}")
        if isinstance(value, str):
            text = value.strip()
            try:
                if text.endswith("%"):
                    return cls(fraction=float(text[:-1]) / 100)
                value = float(text) if "." in text or "e" in text.lower() else int(text)
            except ValueError:
                raise SpecError(f"expected a token count or a percentage, got {value!r}") from None
        if isinstance(value, int):
            return cls(tokens=value)
        if isinstance(value, float):
            if value.is_integer() and value >= 1:
                return cls(tokens=int(value))
            return cls(fraction=value)
        raise SpecError(f"expected a token count or a percentage, got {value!r}")

    def check(self, low: int = 1) -> str | None:
        """Why this count is out of range, or None."""
        if self.tokens is not None and self.tokens < low:
            return f"at least {low} tokens"
        if self.fraction is not None and not (0 < self.fraction <= 1) or (
            self.fraction is not None and math.isnan(self.fraction)
        ):
            return "a percentage in (0%, 100%]"
        return None

    def resolve(self, present: int) -> int:
        """Tokens meant when ``present`` tokens are there (a share rounds up, never below 1)."""
        if self.tokens is not None:
            return self.tokens
        return max(1, math.ceil(self.fraction * present))

    def __str__(self) -> str:
        if self.tokens is not None:
            return str(self.tokens)
        return f"{self.fraction * 100:g}%"
