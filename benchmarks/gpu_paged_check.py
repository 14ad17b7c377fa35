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

# The kernel alone on the model's own tensors: each layer's last 8 prompt queries over its 4096
# prompt K/V, stored by store_kv; decode_attention against its float32 reference on the same
# cache (kernel error), and that reference against exact attention over the raw K/V (codec error).
from kvplug import triton_ops

cache = kvplug.hf.cache(model, "none", keep_prompt=True)
with torch.no_grad():
    model(input_ids=ids[:1, :4096], past_key_values=cache, logits_to_keep=1)
for i, layer in enumerate(cache.layers):
    keys, values, queries, _, scale = layer.prompt
    k, v = keys[0].transpose(0, 1).contiguous(), values[0].transpose(0, 1).contiguous()   # [T, H, D]
    q = queries[0, :, -8:].transpose(0, 1).contiguous()                                    # [8, Hq, D]
    t, h, d = k.shape
    exact = torch.softmax((q.float().view(8, h, -1, d) @ k.float().permute(1, 2, 0)) * scale, -1) @ v.float().transpose(0, 1)
    exact = exact.reshape(8, -1, d)
    cells = []
    for codec in ("none", "int8", "int4", "int2"):
        layout = triton_ops.PagedLayout.for_codec(codec, 16, h, d, model.dtype)
        paged = layout.allocate(t // 16, "cuda")
        triton_ops.store_kv(k, v, paged, torch.arange(t, device="cuda", dtype=torch.int32), layout)
        tables = torch.arange(t // 16, device="cuda", dtype=torch.int32).expand(8, -1).contiguous()
        lens = torch.full((8,), t, device="cuda", dtype=torch.int32)
        out = triton_ops.decode_attention(q, paged, layout, tables, lens, scale).float()
        ref = triton_ops.decode_attention_reference(q, paged, layout, tables, lens, scale)
        rel = lambda a, b: ((a - b).norm() / b.norm()).item()
        cells.append(f"{codec}: kernel {rel(out, ref):.1e} codec {rel(ref, exact):.1e}")
    print(f"layer {i}: " + " | ".join(cells))
