"""CacheGen's KV encoder: anchors and deltas, per-layer quantization, entropy coding.

CacheGen (Liu et al., "CacheGen: KV Cache Compression and Streaming for Fast Large Language Model
Serving", SIGCOMM 2024, arXiv 2310.07240) turns a context's K/V into a compact bitstream for
storage or the network, using three observations:

- **Token-wise locality**: nearby tokens' K/V are alike. Tokens are split into groups of
  ``group``; the first of each group is the anchor, and the others are coded as their difference
  from it.
- **Layer-wise sensitivity**: shallow layers matter more. Deltas of the first ``deep_from`` share
  of layers are quantized to ``bits``, the rest to ``deep_bits``; anchors always to ``bits``.
- **Skewed symbols**: the quantized values are entropy coded, with one Laplace model per channel
  (its scale the mean magnitude of that channel's symbols, stored beside the stream).

Here the coding is ``constriction``'s ANS coder (``constriction.stream.stack.AnsCoder``, a
quantized Laplace model). The paper's code uses ``torchac``'s arithmetic coder with per-channel
histograms; a two-parameter family avoids storing a histogram per channel.

Quantization is symmetric per channel (over batch rows, heads and tokens): ``step = max|x| /
(2^(b-1) - 1)``. Deltas are taken against the *decoded* anchor (closed loop), so a decoded value is
within half a delta step of the original: :meth:`CacheGen.bound`. Tensors in, tensors out; the
stream is a ``uint32`` tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvplug.errors import SpecError


def _coder():
    try:
        import constriction
    except ImportError:  # pragma: no cover - depends on the environment
        raise SpecError("cachegen needs the entropy coder constriction (pip install constriction)") from None
    return constriction


@dataclass(frozen=True)
class CacheGen:
    """CacheGen's encoder for one layer's K or V ``[B, H, T, D]`` (see the module docstring).

    ``bits`` (2..12): anchors and the first layers' deltas; ``deep_bits`` (2..12): the deltas of
    layers from ``deep_from`` (0..1, a share of the layers) on; ``group`` (1..256): tokens per
    anchor (1: every token is an anchor, no deltas)."""

    bits: int = 8
    deep_bits: int = 6
    deep_from: float = 0.5
    group: int = 10

    def __post_init__(self):
        for name in ("bits", "deep_bits"):
            if not 2 <= getattr(self, name) <= 12:
                raise SpecError(f"cachegen: {name}={getattr(self, name)} is out of range; allowed: 2..12")
        if not 1 <= self.group <= 256:
            raise SpecError(f"cachegen: group={self.group} is out of range; allowed: 1..256")
        if not 0 <= self.deep_from <= 1:
            raise SpecError(f"cachegen: deep_from={self.deep_from} is out of range; allowed: 0..1")

    def delta_bits(self, layer: int, num_layers: int) -> int:
        """Bits of layer ``layer``'s deltas."""
        return self.bits if layer < self.deep_from * num_layers else self.deep_bits

    def encode(self, x: torch.Tensor, layer: int, num_layers: int) -> dict[str, torch.Tensor]:
        """The stream of ``x`` ``[B, H, T, D]``: ``words`` (uint32), per-channel ``anchor_step``,
        ``delta_step``, ``anchor_spread``, ``delta_spread`` (float32 ``[D]``) and ``shape``."""
        constriction = _coder()
        x = x.detach().double().cpu()
        b, h, t, d = x.shape
        delta_bits = self.delta_bits(layer, num_layers)
        qa, step_a = _quantize(x[:, :, ::self.group], self.bits)  # anchors; steps as stored (float32)
        qd, step_d = _quantize((x - self._spread_anchors(qa * step_a, t))[:, :, self._deltas(t)], delta_bits)
        spread_a, spread_d = _spread(qa), _spread(qd)
        coder = constriction.stream.stack.AnsCoder()
        model_d, model_a = _model(constriction, delta_bits), _model(constriction, self.bits)
        if qd.numel():  # a stack: deltas first, so that anchors come out first
            coder.encode_reverse(*_symbols(qd, spread_d, model_d))
        coder.encode_reverse(*_symbols(qa, spread_a, model_a))
        words = torch.from_numpy(coder.get_compressed().view("int32").copy())  # uint32 words, as int32 bits
        return {"words": words, "anchor_step": step_a.float(),
                "delta_step": step_d.float(), "anchor_spread": spread_a.float(), "delta_spread": spread_d.float(),
                "shape": torch.tensor([b, h, t, d], dtype=torch.int64)}

    def decode(self, enc: dict[str, torch.Tensor], layer: int, num_layers: int) -> torch.Tensor:
        """``[B, H, T, D]`` float32 from :meth:`encode`'s stream."""
        constriction = _coder()
        b, h, t, d = (int(v) for v in enc["shape"])
        keep = self._deltas(t)
        coder = constriction.stream.stack.AnsCoder(enc["words"].numpy().view("uint32").copy())
        qa = _decode(coder, _model(constriction, self.bits), enc["anchor_spread"], (b, h, -(-t // self.group), d))
        out = self._spread_anchors(qa * enc["anchor_step"].double(), t)
        n_delta = int(keep.sum())
        if n_delta:
            qd = _decode(coder, _model(constriction, self.delta_bits(layer, num_layers)), enc["delta_spread"],
                         (b, h, n_delta, d))
            out[:, :, keep] += qd * enc["delta_step"].double()
        return out.float()

    def _deltas(self, t: int) -> torch.Tensor:
        """``[T]`` True for the tokens coded as deltas (all but each group's first)."""
        return torch.arange(t) % self.group != 0

    def _spread_anchors(self, anchors: torch.Tensor, t: int) -> torch.Tensor:
        """Each group's decoded anchor ``[B, H, A, D]`` repeated over its ``group`` tokens: ``[B, H, T, D]``."""
        return anchors.repeat_interleave(self.group, dim=2)[:, :, :t]

    @staticmethod
    def bound(enc: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per channel ``[D]``, the largest ``|decoded - original|``: half a delta step (half an
        anchor step for channels without deltas), plus float32 rounding."""
        half = torch.maximum(enc["delta_step"], enc["anchor_step"]).double() / 2
        return half * (1 + 1e-6) + 1e-6

    @staticmethod
    def nbytes(enc: dict[str, torch.Tensor]) -> int:
        """Bytes of the stream and its per-channel parameters."""
        return 4 * enc["words"].numel() + sum(enc[k].numel() * 4 for k in
                                              ("anchor_step", "delta_step", "anchor_spread", "delta_spread"))


def _quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel integers of ``x`` ``[..., D]`` and their step ``[D]`` (float64)."""
    top = (1 << (bits - 1)) - 1
    peak = x.abs().amax(dim=tuple(range(x.dim() - 1))) if x.numel() else torch.zeros(x.shape[-1], dtype=x.dtype)
    step = torch.where(peak > 0, peak / top, torch.ones_like(peak)).float().double()  # as stored
    return torch.clamp(torch.round(x / step), -top, top), step


def _spread(q: torch.Tensor) -> torch.Tensor:
    """The Laplace scale per channel ``[D]``: the mean magnitude of its symbols (at least 0.05)."""
    if not q.numel():
        return torch.full((q.shape[-1],), 1.0, dtype=torch.float64)
    return q.abs().mean(dim=tuple(range(q.dim() - 1))).clamp_min(0.05)


def _model(constriction, bits: int):
    top = (1 << (bits - 1)) - 1
    return constriction.stream.model.QuantizedLaplace(-top, top + 1)


def _scales(spread: torch.Tensor, rows: int):
    """Each element's Laplace scale, in memory order over ``rows`` rows of ``[D]`` channels,
    rounded to float32 as stored (so the encoder and the decoder use the same model)."""
    return spread.float().double().expand(rows, -1).reshape(-1).numpy()


def _symbols(q: torch.Tensor, spread: torch.Tensor, model):
    """``(symbols, model, means, scales)`` for ``encode_reverse``: every element of ``q`` in
    memory order, with its channel's spread."""
    import numpy as np

    scales = _scales(spread, q.numel() // q.shape[-1])
    return q.reshape(-1).to(torch.int32).numpy(), model, np.zeros_like(scales), scales


def _decode(coder, model, spread: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    import numpy as np

    scales = _scales(spread, math.prod(shape[:-1]))
    values = coder.decode(model, np.zeros_like(scales), scales)
    return torch.from_numpy(np.asarray(values, dtype=np.int64)).double().view(shape)
