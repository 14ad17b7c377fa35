"""On a GPU: the HF adapter's paged path (Triton kernels) against its reference path, on the
reference model: teacher-forced logits and greedy tokens.

    python benchmarks/gpu_paged_check.py
"""

import torch
from transformers import AutoModelForCausalLM

import kvplug.hf
from kvplug.eval import inputs
from kvplug.retrieval import load_heldout_ids
from transformers import AutoTokenizer

MODEL = "models/kvplug-ref"
tok = AutoTokenizer.from_pretrained(MODEL)
model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16).cuda().eval()
source = load_heldout_ids(MODEL, tok)
ids = inputs.perplexity_ids(source, 0, 4096, 4, 64, "cuda")
for spec in ("none", "int8", "int4", "int2", "snapkv(budget=25%)+int4", "streaming(sinks=4, window=1020)+int4"):
    logits, tokens = [], []
    for paged in (False, True):
        cache = kvplug.hf.cache(model, spec, paged=paged)
        with torch.no_grad():
            model(input_ids=ids[:, :4096], past_key_values=cache, logits_to_keep=1)
            steps = [model(input_ids=ids[:, t:t + 1], past_key_values=cache).logits[:, -1].float()
                     for t in range(4096, 4160)]
        logits.append(torch.stack(steps, 1))
        kind = type(cache.layers[0].slots).__name__
    rel = ((logits[0] - logits[1]).norm() / logits[0].norm()).item()
    agree = (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean().item()
    print(f"{spec:40s} {kind:11s} rel logits diff {rel:.2e}  same argmax {agree:.1%}")
