"""The "learned" grain of the contract: a part whose parameters are tensors shipped with a plugin.

A learned part (``attention_gate``, or a third party's) keeps its trained tensors in a small
safetensors file, never a pickle: safetensors holds only tensors and a flat string metadata
table, so loading a file cannot run code. The metadata says which part the file is for and the
shape of the model it was trained on; the part checks that shape against the model it meets
(``LearnedWeights.check``) and refuses another in one line, since gates trained for one model's
layers and heads rank nothing meaningful in another's.

Where a file is named:

- ``"name"`` (no slash, no suffix): a file shipped with a Python package, looked up as
  ``<package>/weights/<part>-<name>.safetensors`` (kvplug's own: ``kvplug/weights/``); a plugin
  passes its own package to :func:`load`, so a third party ships weights the same way;
- ``"package:file.safetensors"``: ``file.safetensors`` inside an importable package;
- a filesystem path ending in ``.safetensors``.

To write one: :func:`save` (used by the training scripts and the tests).
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from dataclasses import dataclass, field

import torch

from kvplug.errors import SpecError

SUFFIX = ".safetensors"


@dataclass(frozen=True, eq=False)
class LearnedWeights:
    """The tensors of one learned part and the metadata they were saved with."""

    part: str
    source: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str] = field(default_factory=dict)

    def check(self, **model) -> None:
        """Raise :class:`SpecError` (one line) unless every ``key=value`` of ``model`` (the shape
        of the model the part now runs on: layers, KV heads, head size, ...) equals the value
        the file was trained for."""
        wrong = [k for k, v in model.items() if self.meta.get(k) != str(v)]
        if wrong:
            trained = ", ".join(f"{k}={self.meta.get(k, '?')}" for k in model)
            here = ", ".join(f"{k}={v}" for k, v in model.items())
            what = self.meta.get("trained_for", "another model")
            raise SpecError(f"{self.part}: weights {self.source} were trained for {what} ({trained}); "
                            f"this model has {here}")

    def on(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The tensors on ``device`` in ``dtype`` (cached per device and dtype)."""
        return _moved(self, str(device), dtype)


class LearnedPart:
    """What a learned part declares (mixed into its :class:`~kvplug.parts.Part` class): a
    ``weights`` field naming its file (see the module docstring) and the tensors a file for a
    model of a given shape holds, so tools and tests can make or check one without knowing the
    part (``tests/conftest.py`` writes random ones for the tiny test models this way)."""

    weights: str

    @classmethod
    def weight_shapes(cls, num_layers: int, num_kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
        """Name -> shape of each tensor, for a model of this many layers, KV heads and head size."""
        raise NotImplementedError


@functools.lru_cache(maxsize=32)
def _moved(weights: LearnedWeights, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(device=device, dtype=dtype) for k, v in weights.tensors.items()}


def resolve(name: str, part: str, package: str = "kvplug") -> str:
    """The file ``name`` means for ``part`` (see the module docstring)."""
    if not name:
        raise SpecError(f"{part}: no weights named")
    if name.endswith(SUFFIX) and ":" in name and not os.path.isabs(name) and "/" not in name.split(":", 1)[0]:
        pkg, rel = name.split(":", 1)
        return _in_package(pkg, rel, part)
    if os.sep in name or "/" in name or name.endswith(SUFFIX):
        if not name.endswith(SUFFIX):
            raise SpecError(f"{part}: weights {name!r} are not a {SUFFIX} file (pickled weights are refused: "
                            "loading them could run code)")
        if not os.path.isfile(name):
            raise SpecError(f"{part}: weights file {name} does not exist")
        return name
    return _in_package(package, f"weights/{part}-{name}{SUFFIX}", part)


def _in_package(package: str, rel: str, part: str) -> str:
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise SpecError(f"{part}: weights {package}:{rel}: no package {package!r}") from None
    path = root.joinpath(rel)
    if not path.is_file():
        shipped = sorted(p.name for p in root.joinpath("weights").iterdir()) if root.joinpath("weights").is_dir() else []
        raise SpecError(f"{part}: no weights {rel} in package {package}"
                        + (f" (shipped: {', '.join(shipped)})" if shipped else ""))
    return str(path)


def _read(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise SpecError(f"cannot read weights {path}: {str(e).splitlines()[0]}") from None
    return tensors, meta


def load(name: str, part: str, *, package: str = "kvplug", tensors: dict[str, tuple[int, ...] | int] | None = None
         ) -> LearnedWeights:
    """The weights ``name`` of ``part``. ``tensors`` names the tensors the part needs and their
    number of dimensions (or full shape); a file without them, or saved for another part, is
    refused in one line. A file is read and checked once (again when it is rewritten), and the
    same :class:`LearnedWeights` comes back, so :meth:`LearnedWeights.on`'s copies are made once."""
    path = resolve(name, part, package)
    st = os.stat(path)
    return _checked(path, (st.st_mtime_ns, st.st_size), name, part, tuple(sorted((tensors or {}).items())))


@functools.lru_cache(maxsize=16)
def _checked(path: str, stamp: tuple[int, int], name: str, part: str, wanted: tuple) -> LearnedWeights:
    found, meta = _read(path)
    if meta.get("part", part) != part:
        raise SpecError(f"{part}: weights {name} were saved for the part {meta['part']!r}")
    for t, want in wanted:
        if t not in found:
            raise SpecError(f"{part}: weights {name} have no tensor {t!r} (they hold: {', '.join(sorted(found))})")
        shape = tuple(found[t].shape)
        if (isinstance(want, int) and len(shape) != want) or (isinstance(want, tuple) and shape != want):
            raise SpecError(f"{part}: weights {name}: tensor {t!r} has shape {shape}, expected {want}")
        if not torch.isfinite(found[t].float()).all():
            raise SpecError(f"{part}: weights {name}: tensor {t!r} holds NaN or Inf")
    return LearnedWeights(part=part, source=name, tensors=found, meta=meta)


def save(path: str, part: str, tensors: dict[str, torch.Tensor], **meta) -> None:
    """Write ``tensors`` (contiguous, on the CPU) with ``part`` and ``meta`` (values as strings)."""
    from safetensors.torch import save_file

    if not path.endswith(SUFFIX):
        raise SpecError(f"{part}: weights are written as {SUFFIX} files, not {path}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path,
              metadata={"part": part, **{k: str(v) for k, v in meta.items()}})
