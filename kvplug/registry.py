"""The one plugin manager: built-in parts first, then third parties from entry points.

A third-party plugin that fails to import, fails in its hook, or reuses a taken name gives a
:class:`PluginWarning` naming it and the reason; discovery goes on.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import warnings

import pluggy

from kvplug import builtin, hookspecs
from kvplug.errors import SpecError
from kvplug.parts import Part

BUILTIN = "kvplug.builtin"


class PluginWarning(UserWarning):
    """A third-party kvplug plugin could not be used."""


class Registry:
    """Part classes by name, with the plugin each came from."""

    def __init__(self, discover: bool = True):
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        self.manager.register(builtin, name=BUILTIN)
        if discover:
            for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
                try:
                    self.manager.load_setuptools_entrypoints(hookspecs.PROJECT, name=ep.name)
                except Exception as e:  # a broken plugin must not break kvplug
                    warnings.warn(f"kvplug plugin {ep.name!r} ({ep.value}) failed to load: {e!r}", PluginWarning,
                                  stacklevel=2)
        self.parts: dict[str, type[Part]] = {}
        self.origin: dict[str, str] = {}
        for impl in self.manager.hook.kvplug_parts.get_hookimpls():
            self._collect(impl)

    def _collect(self, impl: pluggy.HookImpl) -> None:
        plugin = impl.plugin_name
        try:
            provided = list(impl.function())
        except Exception as e:
            warnings.warn(f"kvplug plugin {plugin!r}: kvplug_parts() failed: {e!r}", PluginWarning, stacklevel=3)
            return
        for cls in provided:
            name = getattr(cls, "name", None)
            if not (isinstance(cls, type) and issubclass(cls, Part) and isinstance(name, str)):
                warnings.warn(f"kvplug plugin {plugin!r}: {cls!r} is not a named kvplug Part; ignored",
                              PluginWarning, stacklevel=3)
            elif name in self.parts:
                warnings.warn(f"kvplug plugin {plugin!r}: part name {name!r} is already provided by "
                              f"{self.origin[name]!r}; ignored", PluginWarning, stacklevel=3)
            else:
                self.parts[name] = cls
                self.origin[name] = plugin

    def names(self, kind: str | None = None) -> list[str]:
        return [n for n, c in self.parts.items() if kind is None or c.kind == kind]

    def get(self, name: str) -> type[Part]:
        """The part class called ``name``, or a one-line error listing the known names."""
        try:
            return self.parts[name]
        except KeyError:
            close = difflib.get_close_matches(name, self.parts, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SpecError(f"unknown strategy part {name!r}; {hint}known: {', '.join(self.parts)}") from None


@functools.lru_cache(maxsize=1)
def default_registry() -> Registry:
    """The process-wide registry (discovered once)."""
    return Registry()
