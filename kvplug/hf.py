"""``kvplug.hf``: the Hugging Face adapter (imports transformers), re-exported from kvplug.adapters.hf."""

from kvplug.adapters.hf import *  # noqa: F401,F403
from kvplug.adapters.hf import __all__  # noqa: F401
