"""``DecodeGraph``: one decode step of an HF model over a paged :class:`~.cache.KVPlugCache`,
captured once as a CUDA graph and replayed for every later token.

A decode step over the paged cache does little GPU work (at 8 x 32K on the H200, 2.2 ms of
kernels for paged int4 against DynamicCache's 7.5), so eager PyTorch's host time (the model's
modules, the Triton launchers) sets its pace. Replaying a graph costs one launch. What makes the
step capturable: the paged cache's tensors are allocated ahead (:meth:`.store.PagedStore.reserve`)
and change in place (token counts, next positions), the kernels size their grids from the block
table's capacity rather than the lengths, and the step's positions come from the cache on the
device. The host-side counters the layers keep (tokens seen, a bound on the slots) advance after
each replay as the step would move them (:meth:`.layer.KVPlugLayer.replayed`).

    graph = kvplug.hf.DecodeGraph(model, cache, max_new_tokens=256)
    logits = graph(next_tokens)           # [B, vocab]; valid until the next call

    with kvplug.hf.cuda_graphs(model):    # generate()'s decode steps go through a DecodeGraph
        model.generate(**inputs, past_key_values=kvplug.hf.cache(model, "int4"))

The first call runs the step eagerly (compiling the kernels) and captures it; the cache must
hold its prompt already (run the model on the prompt first). Supported: every layer in the paged
layout (CUDA; codecs the paged kernels read, with or without a residual window), prefill-only
scorers (snapkv, knorm, ...) and decode-time eviction by scorers that declare it graph-safe
(``decode_on_device``: streaming, h2o, tova, scissorhands, DuoAttention, SimLayerKV). Mergers,
grouped codecs and offloading run eagerly (their steps decide on the host), and
:class:`DecodeGraph` says so in one line.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

from .layer import KVPlugLayer
from .store import PagedStore

log = logging.getLogger("kvplug")


def graph_blocker(cache, cuda: bool = True) -> str | None:
    """Why ``cache``'s decode step cannot be captured, or None when it can (``cuda`` False: the
    same static step run eagerly, on any device)."""
    for i, layer in enumerate(cache.layers):
        if type(layer) is not KVPlugLayer:  # an offloading layer fetches on the host's decision
            return f"layer {i} is a {type(layer).__name__} (offloading decides on the host each step)"
        if not layer.prompt_stored():
            return f"layer {i} holds no prompt yet; run the model on the prompt first"
        scorer = layer.scorer
        if scorer is not None and scorer.evicts_on_decode and not scorer.decode_on_device:
            return f"{scorer.name} does not declare its decode-time eviction graph-safe (decode_on_device)"
        if layer.merged is not None or layer.groups is not None:
            return f"{layer.strategy} holds part of its prompt outside the pages (merged or grouped)"
        if not isinstance(layer.slots, PagedStore):
            return f"layer {i} is not in the paged layout (paged=False, or a codec the paged kernels cannot read)"
        if cuda and layer.device.type != "cuda":
            return (f"the cache is on {layer.device}, and CUDA graphs need the model on CUDA "
                    f"(capture=False runs the same step eagerly)")
    return None


class DecodeGraph:
    """Replays one captured decode step of ``model`` over ``cache`` (see the module docstring).

    ``max_new_tokens``: tokens to reserve room for at once; the graph is captured again (tensors
    moved; no step lost) whenever the cache has to grow past it. ``capture=False``
    runs the same static-buffer step eagerly on any device (what the graph replays, for tests and
    CPUs). ``forward``: what runs the model (default ``model`` itself)."""

    def __init__(self, model, cache, max_new_tokens: int = 256, capture: bool = True, forward=None):
        why = graph_blocker(cache, capture)
        if why is not None:
            raise ValueError(f"kvplug: DecodeGraph cannot capture this cache's decode step: {why}")
        if max_new_tokens < 1:
            raise ValueError(f"kvplug: DecodeGraph needs max_new_tokens >= 1, got {max_new_tokens}")
        first = cache.layers[0]
        self.model, self.cache, self.max_new_tokens, self.capture = model, cache, max_new_tokens, capture
        self.forward = model if forward is None else forward
        batch = first.next_pos.shape[0]
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=first.device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=first.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.steps = self.replays = self.captures = 0

    def _step(self) -> torch.Tensor:
        """The step as the graph holds it: positions read from the cache, logits of the last token."""
        self.positions.copy_(self.cache.layers[0].next_pos.view(-1, 1))
        out = self.forward(input_ids=self.tokens, position_ids=self.positions, past_key_values=self.cache,
                           use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _host(self) -> list[tuple[int, int]]:
        return [(layer.seen, layer.high) for layer in self.cache.layers]

    def _set_host(self, state: list[tuple[int, int]]) -> None:
        for layer, (seen, high) in zip(self.cache.layers, state):
            layer.seen, layer.high = seen, high

    def _reserve(self) -> bool:
        """Room for the next step in every layer (and ``max_new_tokens`` more when growing);
        True when a store had to grow (its tensors moved: capture again)."""
        grew = False
        for layer in self.cache.layers:
            if layer._bound_after(1) > layer.slots.capacity:
                layer.slots.reserve(layer.high + self.max_new_tokens)
                grew = True
        return grew

    def _record(self) -> None:
        """Capture the step: nothing runs on the device, so the host counters the capture moved
        go back to where they were."""
        before = self._host()
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.logits = self._step()
        finally:
            self._set_host(before)
        self.captures += 1

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, vocab]`` after feeding ``tokens`` (``[B]`` or ``[B, 1]``, one per sequence)."""
        if tokens.numel() != self.tokens.shape[0]:
            raise ValueError(f"kvplug: DecodeGraph was made for {self.tokens.shape[0]} sequences, got "
                             f"{tuple(tokens.shape)} tokens")
        self.tokens.copy_(tokens.view(-1, 1))
        grew = self._reserve()
        self.steps += 1
        if not self.capture:
            return self._step()
        if self.graph is None:  # compile and warm up on a side stream (as torch.cuda.graphs asks), eagerly
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self._step().clone()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            self._reserve()
            self._record()
            return logits
        if grew:
            self._record()
        self.graph.replay()
        for layer in self.cache.layers:
            layer.replayed(1)
        self.replays += 1
        return self.logits


@contextlib.contextmanager
def cuda_graphs(model, max_new_tokens: int = 256, capture: bool = True):
    """Within the block, ``model``'s one-token forward calls over a capturable kvplug cache (the
    decode steps of ``generate()``) replay a :class:`DecodeGraph`; every other call (prompts,
    other caches, a cache :func:`graph_blocker` refuses: logged once) runs as before. The step
    takes its positions from the cache (the real tokens before it, as ``generate()`` computes
    them from the mask) and ignores the mask, as kvplug's paged decode attention does. One graph
    at a time: a new cache replaces the last one's graph (until then it holds that cache).
    Yields a dict: ``graph`` (the current :class:`DecodeGraph` or None) and ``steps`` (decode
    steps it served, over all caches)."""
    original = model.forward
    state: dict = {"graph": None, "steps": 0, "refused": None}

    @functools.wraps(original)  # generate() passes what the signature names (position_ids among them)
    def forward(input_ids=None, past_key_values=None, **kwargs):
        if (input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] != 1 or kwargs.get("inputs_embeds") is not None
                or not hasattr(past_key_values, "strategy") or state["refused"] is past_key_values
                or not past_key_values.layers[0].prompt_stored()):
            return original(input_ids=input_ids, past_key_values=past_key_values, **kwargs)
        graph = state["graph"]
        if graph is None or graph.cache is not past_key_values:
            state["graph"] = None  # the last cache's graph goes before a new one is captured
            why = graph_blocker(past_key_values, capture)
            if why is not None:
                state["refused"] = past_key_values
                log.warning("kvplug: decode steps run eagerly (no CUDA graph): %s", why)
                return original(input_ids=input_ids, past_key_values=past_key_values, **kwargs)
            graph = state["graph"] = DecodeGraph(model, past_key_values, max_new_tokens, capture,
                                                            forward=original)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        state["steps"] += 1
        return CausalLMOutputWithPast(logits=graph(input_ids)[:, None], past_key_values=past_key_values)

    model.forward = forward
    try:
        yield state
    finally:
        del model.forward
        state["graph"] = state["refused"] = None
