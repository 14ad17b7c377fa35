"""Hugging Face transformers adapter: a compressed ``Cache`` and the ``kvplug`` attention function.

    cache = kvplug.hf.cache(model, "snapkv(budget=25%)+int4")
    model.generate(**inputs, past_key_values=cache)

    with kvplug.hf.compress(model, "int4"):
        model.generate(**inputs)
"""

from .api import SUPPORTED, cache, check_model, compress
from .cache import KVPlugCache
from .layer import KVPlugLayer

__all__ = ["cache", "compress", "check_model", "KVPlugCache", "KVPlugLayer", "SUPPORTED"]
