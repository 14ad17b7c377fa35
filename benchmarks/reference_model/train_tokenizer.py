"""Train the byte-level BPE tokenizer of the reference model on the TRAIN split only.

    python benchmarks/reference_model/train_tokenizer.py        # -> models/kvplug-ref/tokenizer.json

Byte-level BPE (HF ``tokenizers``): every digit is its own token (``Digits(individual_digits=True)``
before the GPT-2 style byte-level split), so numbers, e.g. the values of the lookup task in
``kvplug.retrieval``, are spelled one digit per token. One special token, ``<|endoftext|>`` (id 0),
separates files and serves as BOS/EOS/PAD. Writes ``tokenizer.json``, ``tokenizer_config.json``
and ``special_tokens_map.json`` so ``AutoTokenizer.from_pretrained(out_dir)`` works offline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
EOT = "<|endoftext|>"


def iter_texts(path: Path, max_bytes: int):
    total = 0
    with open(path) as f:
        for line in f:
            text = json.loads(line)["text"]
            total += len(text)
            yield text
            if max_bytes and total >= max_bytes:
                return


def main(argv: list[str] | None = None) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(REPO / "data" / "corpus" / "train.jsonl"))
    ap.add_argument("--out", default=str(REPO / "models" / "kvplug-ref"))
    ap.add_argument("--vocab-size", type=int, default=6144)
    ap.add_argument("--max-bytes", type=int, default=0, help="train on at most this many characters (0: all)")
    args = ap.parse_args(argv)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size, min_frequency=2, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(iter_texts(Path(args.corpus), args.max_bytes), trainer=trainer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                   unk_token=None, model_max_length=8192)
    fast.save_pretrained(str(out))
    print(f"vocab {tok.get_vocab_size()} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
