"""kvplug: KV-cache compression declared once, run in HF transformers and vLLM.

``import kvplug`` loads only the framework-neutral core (torch, pluggy); the engines load with
their adapters: ``kvplug.hf`` (transformers), ``kvplug.adapters.vllm`` (vLLM).
"""

from kvplug.config import parse, resolve
from kvplug.errors import SpecError
from kvplug.registry import default_registry
from kvplug.strategy import Strategy

__all__ = ["parse", "resolve", "SpecError", "Strategy", "default_registry"]
__version__ = "0.1.0"
