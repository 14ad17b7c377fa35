"""The contract kvplug plugins implement (pluggy hook specifications, project name ``kvplug``).

A plugin is a module (or object) with ``@hookimpl`` functions, registered under the entry-point
group ``kvplug`` in its distribution's metadata::

    [project.entry-points.kvplug]
    myplugin = "my_package.kvplug_plugin"

kvplug's own strategies are registered through these same hooks (``kvplug.builtin``).
"""

from __future__ import annotations

import pluggy

PROJECT = "kvplug"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kvplug_parts() -> list[type]:
    """Return the strategy part classes this plugin provides.

    Each is a frozen dataclass subclassing one of :class:`kvplug.codecs.base.Codec` (how a token
    is stored), :class:`kvplug.scorers.base.Scorer` (which tokens are kept),
    :class:`kvplug.budgets.base.Budget` (how many per layer/head),
    :class:`kvplug.mergers.base.Merger` (which layers share storage) or
    :class:`kvplug.placements.base.Placement` (where K/V live and which are fetched), with a unique ``name`` (used in
    spec strings), a ``paper`` and parameters declared with :func:`kvplug.parts.param`. A name
    already taken by an earlier plugin is refused with a warning.

    Decisions per layer: a scorer's ``for_layer(inputs)`` is called once per layer at prefill and
    returns the scorer that layer uses from then on (or None: keep every token); ``inputs``
    carries ``layer_idx``/``num_layers`` and the layer's K/V and queries. SimLayerKV
    (``kvplug.scorers.simlayerkv``) and ``examples/depth_plugin`` are built this way. Per-layer
    budgets are a budget part (``kvplug.budgets.pyramid``).

    Decisions across layers: a :class:`kvplug.mergers.base.Merger` part plans which layer pairs
    share storage (``pairs(num_layers)``) and merges a pair's K or V (``merge``, tensors only);
    adapters hold the cross-layer state (the first layer's prompt until the second's arrives, one
    stored copy read by both). MiniCache (``kvplug.mergers.minicache``) is built this way.

    Where K/V live: a :class:`kvplug.placements.base.Placement` part declares what adapters must
    hand it (``needs_hidden_states``: each decoder layer's input before it runs) and chooses, in
    tensors, which held tokens a step fetches; adapters keep the host copy and do the copies.
    InfiniGen (``kvplug.placements.infinigen``) is built this way.
    """
