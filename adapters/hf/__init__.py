"""Hugging Face transformers adapter: a compressed ``Cache`` and the ``kvplug`` attention function.

    cache = kvplug.hf.cache(model, "snapkv(budget=25%)+int4")
    model.generate(**inputs, past_key_values=cache)

    with kvplug.hf.compress(model, "int4"):
        model.generate(**inputs)

    blob = cache.to_bytes(model)              # after a prompt: the compressed cache as bytes
    again = kvplug.hf.load(model, blob)       # continues generating as the saved cache would

    with kvplug.hf.cuda_graphs(model):        # generate()'s decode steps replayed as a CUDA graph
        model.generate(**inputs, past_key_values=kvplug.hf.cache(model, "int4"))
"""

from .api import SUPPORTED, cache, check_model, compress
from .cache import KVPlugCache
from .documents import DocumentStore
from .graphs import DecodeGraph, cuda_graphs, graph_blocker
from .layer import KVPlugLayer
from .lckv import LckvConfig, LckvForCausalLM, register as _register_lckv
from .persist import load

_register_lckv()  # kvplug_lckv checkpoints load through AutoModelForCausalLM, no trust_remote_code

__all__ = ["cache", "compress", "check_model", "load", "DocumentStore", "DecodeGraph", "cuda_graphs", "graph_blocker", "KVPlugCache", "KVPlugLayer", "LckvConfig", "LckvForCausalLM",
           "SUPPORTED"]
