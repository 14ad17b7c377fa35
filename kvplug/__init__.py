"""kvplug: KV-cache compression declared once, run in HF transformers and vLLM."""
