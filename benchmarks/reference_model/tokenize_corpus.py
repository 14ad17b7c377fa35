"""Tokenize the corpus with the shipped tokenizer into uint16 shards.

    python benchmarks/reference_model/tokenize_corpus.py

Reads ``data/corpus/{train,heldout}.jsonl`` and ``models/kvplug-ref/tokenizer.json``; writes
  - ``data/tokens/train.bin``   uint16 little-endian token ids, files in a fixed pseudo-random order
    (sorted by sha256 of their source name), each file preceded by ``<|endoftext|>`` (id 0), cut
    at ``--max-train-tokens`` (whole files only) so the shard stays small enough to carry to the GPU;
  - ``data/tokens/heldout.bin`` the same for the held-out split (never trained on);
  - ``data/tokens/meta.json``   counts and the list of files in each shard;
  - ``models/kvplug-ref/heldout.txt`` the held-out files joined by ``<|endoftext|>`` (a sample that
    ships with the model, so evaluation runs from a fresh clone without rebuilding the corpus).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from array import array
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
EOT = "<|endoftext|>"


def load_docs(path: Path) -> list[dict]:
    with open(path) as f:
        docs = [json.loads(line) for line in f]
    docs.sort(key=lambda d: hashlib.sha256(d["source"].encode()).hexdigest())
    return docs


def encode_docs(tok, docs: list[dict], max_tokens: int, eot_id: int) -> tuple[array, list[str]]:
    out = array("H")
    used: list[str] = []
    batch = 256
    for i in range(0, len(docs), batch):
        chunk = docs[i:i + batch]
        encs = tok.encode_batch([d["text"] for d in chunk])
        for d, e in zip(chunk, encs):
            ids = e.ids
            if max_tokens and len(out) + len(ids) + 1 > max_tokens:
                return out, used
            out.append(eot_id)
            out.extend(ids)
            used.append(d["source"])
    return out, used


def main(argv: list[str] | None = None) -> int:
    from tokenizers import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(REPO / "data" / "corpus"))
    ap.add_argument("--model-dir", default=str(REPO / "models" / "kvplug-ref"))
    ap.add_argument("--out", default=str(REPO / "data" / "tokens"))
    ap.add_argument("--max-train-tokens", type=int, default=20_000_000)
    ap.add_argument("--max-heldout-sample-bytes", type=int, default=1_990_000)
    args = ap.parse_args(argv)

    tok = Tokenizer.from_file(str(Path(args.model_dir) / "tokenizer.json"))
    assert tok.get_vocab_size() <= 65535
    eot_id = tok.token_to_id(EOT)
    corpus = Path(args.corpus)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"tokenizer_vocab": tok.get_vocab_size(), "eot_id": eot_id}
    for split, limit in (("train", args.max_train_tokens), ("heldout", 0)):
        docs = load_docs(corpus / f"{split}.jsonl")
        ids, used = encode_docs(tok, docs, limit, eot_id)
        with open(out / f"{split}.bin", "wb") as f:
            ids.tofile(f)  # machine order; little-endian on x86/arm64
        nbytes = sum(len(d["text"].encode()) for d in docs if d["source"] in set(used))
        meta[split] = {"tokens": len(ids), "files": len(used), "files_available": len(docs),
                       "text_bytes": nbytes, "sources": used}
        print(f"{split}: {len(ids)} tokens from {len(used)}/{len(docs)} files ({nbytes} bytes)")
        if split == "heldout":
            sample, size = [], 0
            for d in docs:
                b = len(d["text"].encode()) + len(EOT)
                if size + b > args.max_heldout_sample_bytes:
                    break
                sample.append(d["text"])
                size += b
            (Path(args.model_dir) / "heldout.txt").write_text("".join(EOT + t for t in sample))
            meta["heldout_sample_files"] = len(sample)
            print(f"heldout sample: {len(sample)} files, {size} bytes -> {args.model_dir}/heldout.txt")
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
