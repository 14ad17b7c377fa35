"""Generate with and without KV-cache compression and print what each strategy keeps.

    python examples/hf_generate.py                       # the shipped reference model
    python examples/hf_generate.py --model PATH_OR_HUB_ID --specs "int4,snapkv(budget=25%)+int4"
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import kvplug.hf
from kvplug.config import split_specs

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "kvplug-ref"
DEFAULT_SPECS = "none,int8,int4,kivi(bits=2),snapkv(budget=25%)+int4,streaming(sinks=4, window=252)"


def dynamic_cache_bytes(cache: DynamicCache) -> int:
    return sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in cache.layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="local path or hub id")
    parser.add_argument("--specs", default=DEFAULT_SPECS, help="comma-separated strategies (kvplug list)")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length taken from --prompt-file")
    parser.add_argument("--prompt-file", default=str(DEFAULT_MODEL / "heldout.txt"))
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    console = Console()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").to(args.device).eval()
    text = Path(args.prompt_file).read_text(errors="replace")[: args.prompt_tokens * 16]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.prompt_tokens].to(args.device)
    console.print(f"model {args.model}: prompt of {ids.shape[1]} tokens, {args.new_tokens} new tokens, greedy")

    def run(cache):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                 do_sample=False, past_key_values=cache, pad_token_id=tokenizer.eos_token_id)
        return out[0, ids.shape[1]:], time.perf_counter() - start

    baseline = DynamicCache(config=model.config)
    reference, seconds = run(baseline)
    full = dynamic_cache_bytes(baseline)
    table = Table(title="KV cache after generation (all layers)")
    for col in ("strategy", "tokens kept", "KV bytes", "vs DynamicCache", "same tokens", "seconds", "continuation"):
        table.add_column(col)
    snippet = lambda toks: repr(tokenizer.decode(toks[:24]))[:60]  # noqa: E731
    table.add_row("DynamicCache", "-", f"{full:,}", "1.00x", "-", f"{seconds:.1f}", snippet(reference))
    for spec in split_specs(args.specs):
        cache = kvplug.hf.cache(model, spec)
        tokens, seconds = run(cache)
        same = (tokens == reference).float().mean().item()
        table.add_row(spec, f"{cache.kept_tokens():,}", f"{cache.stored_bytes():,}",
                      f"{full / cache.stored_bytes():.2f}x", f"{same:.0%}", f"{seconds:.1f}", snippet(tokens))
    console.print(table)


if __name__ == "__main__":
    main()
