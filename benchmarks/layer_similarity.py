"""How alike are adjacent layers' K/V? The premise of MiniCache, measured on any checkpoint.

For each pair of adjacent layers: quantiles of the angular distance (angle / pi) between the two
layers' K (and V) vectors of the same token and head, over a prompt of held-out text. MiniCache
merges pairs whose vectors point the same way (distance near 0); 0.5 means orthogonal.

    python benchmarks/layer_similarity.py [--model PATH] [--tokens 1024]
"""

import argparse
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from kvplug.eval.runner import REFERENCE_MODEL
from kvplug.retrieval import load_heldout_ids

QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REFERENCE_MODEL))
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = torch.tensor(load_heldout_ids(str(REFERENCE_MODEL), tok)[: args.tokens])[None]  # the shipped held-out text
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    print(f"angular distance between adjacent layers ({args.tokens} tokens), quantiles {QUANTILES}")
    for i in range(len(cache.layers) - 1):
        for role in ("keys", "values"):
            a, b = getattr(cache.layers[i], role).float(), getattr(cache.layers[i + 1], role).float()
            distance = torch.arccos(torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)) / math.pi
            q = torch.quantile(distance.flatten(), torch.tensor(QUANTILES))
            print(f"layers {i},{i + 1} {role:6}: " + "  ".join(f"{x:.3f}" for x in q.tolist()))


if __name__ == "__main__":
    main()
