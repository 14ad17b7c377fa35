"""Build the reference model's text corpus from pinned, permissively licensed PyPI wheels.

One command, CPU only, reproducible:

    python benchmarks/reference_model/build_corpus.py            # -> data/corpus/

What it does
  1. ``pip download --no-deps --only-binary=:all: PKG==VER`` for every entry of ``sources.json``
     (pure-Python ``py3-none-any`` wheels), into ``data/wheels/`` (skipped when already there),
     and checks each wheel's sha256 against the pinned value.
  2. Reads every ``*.py`` file inside each wheel, skipping vendored third-party code
     (``_vendor/``, ``vendor/``, ``vendored/``, ``_vendored/``), files that are not UTF-8, files over
     ``--max-file-bytes`` and files with very long lines (generated tables).
  3. Normalises line endings to ``\\n`` and deduplicates on the sha256 of the normalised text
     (first occurrence in the sorted (package, path) order wins).
  4. Splits BY FILE into train and held-out: a file is held out when
     ``int(sha256("package/path")[:8], 16) % 1000 < heldout_permille``. Held-out files are never
     used for the tokenizer or for training.
  5. Writes ``data/corpus/train.jsonl`` and ``data/corpus/heldout.jsonl`` (one JSON object per file:
     ``{"source": "pkg==ver:path", "text": ...}``) and ``data/corpus/manifest.json`` (the sources with
     license and wheel sha256, and per split the list of files with the sha256 of their text).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
VENDOR_PARTS = {"_vendor", "vendor", "vendored", "_vendored", "_vendored_packages"}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_wheels(sources: list[dict], wheel_dir: Path) -> None:
    wheel_dir.mkdir(parents=True, exist_ok=True)
    missing = [s for s in sources if not (wheel_dir / s["wheel"]).exists()]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "-d", str(wheel_dir)] + [f'{s["package"]}=={s["version"]}' for s in missing]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    for s in sources:
        path = wheel_dir / s["wheel"]
        if not path.exists():
            raise SystemExit(f"expected wheel {path} was not downloaded")
        digest = sha256_bytes(path.read_bytes())
        if digest != s["sha256"]:
            raise SystemExit(f"sha256 mismatch for {path}: {digest} != {s['sha256']}")


def is_heldout(key: str, permille: int) -> bool:
    return int(sha256_bytes(key.encode())[:8], 16) % 1000 < permille


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", default=str(HERE / "sources.json"))
    ap.add_argument("--data", default=str(REPO / "data"))
    ap.add_argument("--heldout-permille", type=int, default=25, help="share of files held out, per mille")
    ap.add_argument("--max-file-bytes", type=int, default=400_000)
    ap.add_argument("--max-line-chars", type=int, default=1000)
    args = ap.parse_args(argv)

    sources = json.loads(Path(args.sources).read_text())["sources"]
    data = Path(args.data)
    wheel_dir = data / "wheels"
    out_dir = data / "corpus"
    out_dir.mkdir(parents=True, exist_ok=True)
    fetch_wheels(sources, wheel_dir)

    seen: set[str] = set()
    stats = {"files_seen": 0, "skipped_vendor": 0, "skipped_decode": 0, "skipped_size": 0,
             "skipped_long_lines": 0, "skipped_empty": 0, "duplicates": 0}
    splits: dict[str, list[dict]] = {"train": [], "heldout": []}
    with open(out_dir / "train.jsonl", "w") as f_train, open(out_dir / "heldout.jsonl", "w") as f_held:
        for s in sorted(sources, key=lambda s: s["package"].lower()):
            with zipfile.ZipFile(wheel_dir / s["wheel"]) as z:
                names = sorted(n for n in z.namelist() if n.endswith(".py"))
                for name in names:
                    stats["files_seen"] += 1
                    if VENDOR_PARTS.intersection(name.split("/")[:-1]):
                        stats["skipped_vendor"] += 1
                        continue
                    raw = z.read(name)
                    if len(raw) > args.max_file_bytes:
                        stats["skipped_size"] += 1
                        continue
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        stats["skipped_decode"] += 1
                        continue
                    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
                    if not text.strip():
                        stats["skipped_empty"] += 1
                        continue
                    if max(len(line) for line in text.split("\n")) > args.max_line_chars:
                        stats["skipped_long_lines"] += 1
                        continue
                    digest = sha256_bytes(text.encode())
                    if digest in seen:
                        stats["duplicates"] += 1
                        continue
                    seen.add(digest)
                    src = f'{s["package"]}=={s["version"]}:{name}'
                    split = "heldout" if is_heldout(f'{s["package"]}/{name}', args.heldout_permille) else "train"
                    (f_held if split == "heldout" else f_train).write(json.dumps({"source": src, "text": text}) + "\n")
                    splits[split].append({"source": src, "sha256": digest, "bytes": len(text.encode())})

    summary = {k: {"files": len(v), "bytes": sum(e["bytes"] for e in v)} for k, v in splits.items()}
    manifest = {"sources": sources, "heldout_permille": args.heldout_permille,
                "max_file_bytes": args.max_file_bytes, "max_line_chars": args.max_line_chars,
                "stats": stats, "summary": summary, "files": splits}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(json.dumps({"stats": stats, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
