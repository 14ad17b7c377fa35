"""Layer-Condensed KV models (``kvplug_lckv``, :mod:`kvplug.adapters.hf.lckv`) in vLLM: refused in one line.

Serving LCKV in vLLM needs a model class that vLLM runs (its layers reading one layer's paged
K/V, each query against the earlier tokens' top-layer K/V plus a zero dummy, and a prompt in
parallel passes) and one KV-cache group shared by every layer; kvplug does not register one yet.
So that a user who points vLLM at such a checkpoint is told so, and not that transformers is out
of date, the plugin registers the checkpoint's config with transformers and its architecture with
vLLM's ``ModelRegistry`` (a supported API) as :class:`LckvNotServed`, and the start-up check
(:func:`check_model`) stops the engine in the user's process with one line.
"""

from __future__ import annotations

import torch

ARCHITECTURE = "LckvForCausalLM"
MODEL_TYPE = "kvplug_lckv"
MESSAGE = ("kvplug_lckv (Layer-Condensed KV, arXiv 2405.10637) does not run in vLLM yet: kvplug registers "
           "no vLLM model for it (every layer reading one layer's KV); run it with transformers "
           "(import kvplug.hf; AutoModelForCausalLM.from_pretrained(...))")


class LckvNotServed(torch.nn.Module):
    """Stands in vLLM's registry for :data:`ARCHITECTURE` so start-up reaches kvplug's check; it
    never builds (the check refuses first; a process that skipped it is refused here)."""

    def __init__(self, *, vllm_config=None, prefix: str = ""):
        raise RuntimeError(MESSAGE)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise RuntimeError(MESSAGE)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor):  # pragma: no cover
        raise RuntimeError(MESSAGE)

    def compute_logits(self, hidden_states: torch.Tensor):  # pragma: no cover
        raise RuntimeError(MESSAGE)


def check_model(vllm_config) -> None:
    """Raise ``ValueError(MESSAGE)`` when ``vllm_config``'s model is a kvplug_lckv checkpoint."""
    model_config = getattr(vllm_config, "model_config", None)
    hf_config = getattr(model_config, "hf_config", None)
    if getattr(hf_config, "model_type", None) == MODEL_TYPE:
        raise ValueError(MESSAGE)
