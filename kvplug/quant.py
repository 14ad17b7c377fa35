"""Affine integer quantization and bit packing, the one format every integer codec and kernel shares.

The format (the Triton kernels in ``kvplug.triton_ops`` reproduce it bit for bit):

* values are quantized in groups; per group ``scale = fp16((max - min) / (2**bits - 1))`` and
  ``zero = fp16(min)``, computed in float32 then rounded to float16; a group whose scale rounds to
  0 (a constant group) stores ``scale = 1`` so that every element decodes to ``zero`` exactly;
* with ``clip < 1`` the codes span only ``clip`` of the range, centred on its middle:
  ``scale = fp16((max - min) / span)``, ``zero = fp16(min + (max - min) / centre)`` with
  ``span = fp32((2**bits - 1) / clip)`` and ``centre = fp32(2 / (1 - clip))`` (the elements beyond
  clamp to the end codes; :func:`clip_constants`). At 2 bits the min-max step of a 64-element
  Gaussian head is about 1.6 sigma where about 1 sigma minimises the squared error;
* ``code = clamp(floor((x - zero) / scale + 0.5), 0, 2**bits - 1)`` in float32 arithmetic, using
  the stored (float16-rounded) scale and zero, so decode sees exactly what encode assumed;
* ``x_hat = code * scale + zero`` in float32;
* codes are packed *planar* along the last axis: for ``n`` codes of ``bits`` each, byte ``j`` of
  the ``n * bits / 8`` packed bytes holds element ``j + k * (n * bits / 8)`` at bit ``k * bits``,
  ``k = 0 .. 8 / bits - 1``. A kernel unpacks one plane with a shift and a mask, no shuffles.
  3-bit codes are the 2-bit packing of their low two bits (``n / 4`` bytes) followed by the 1-bit
  packing of their high bit (``n / 8`` bytes);
* the *symmetric* variant stores a scale only (:func:`symmetric_scale`): levels
  ``(code - (2**bits - 1) / 2) * scale``, the zero implied by the scale.
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16
FP16_MAX = torch.finfo(torch.float16).max


def check_finite(x: torch.Tensor, what: str) -> None:
    """Refuse NaN/Inf and values beyond float16 metadata range, with one clear line."""
    if not torch.isfinite(x).all():
        raise ValueError(f"{what}: cannot quantize NaN or Inf values")
    if x.numel() and x.abs().max() > FP16_MAX:
        raise ValueError(f"{what}: values beyond +-{FP16_MAX:.0f} do not fit the float16 scale/zero")


def affine_params(
    x: torch.Tensor, bits: int, dim: int = -1, valid: torch.Tensor | None = None, clip: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (float16) of ``x`` reduced over ``dim`` (kept as size 1).

    ``valid`` (broadcastable to ``x``) excludes elements, e.g. empty slots, from the range.
    ``clip`` < 1 spans the codes over that fraction of each group's range, centred on its middle
    (the elements beyond clamp to the end codes); see :func:`clip_constants`.
    """
    xf = x.float()
    if valid is None:
        lo, hi = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    else:
        lo = xf.masked_fill(~valid, float("inf")).amin(dim, keepdim=True)
        hi = xf.masked_fill(~valid, float("-inf")).amax(dim, keepdim=True)
        empty = torch.isinf(lo)
        lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    span, centre = clip_constants(bits, clip)
    # divide by a tensor: CUDA turns division by a Python scalar into a multiply by its reciprocal,
    # which is not correctly rounded, and the kernels (and the CPU) divide exactly
    r = hi - lo
    scale = (r / torch.full_like(hi, span)).to(SCALE_DTYPE)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    if clip != 1.0:
        lo = lo + r / torch.full_like(hi, centre)
    return scale, lo.to(SCALE_DTYPE)


def clip_constants(bits: int, clip: float) -> tuple[float, float]:
    """The two float32 divisors of a clipped range: ``scale = fp16((max - min) / span)`` and
    ``zero = fp16(min + (max - min) / centre)``, with ``span = (2**bits - 1) / clip`` and
    ``centre = 2 / (1 - clip)`` (so the codes cover ``clip`` of the range, centred). Divisions
    only, no multiply-add that a compiler could fuse: the kernels reproduce them bit for bit.
    ``clip = 1`` gives ``span = 2**bits - 1`` and no centring (``zero = fp16(min)``)."""
    _check_clip(clip)
    span = float(torch.tensor((2**bits - 1) / clip, dtype=torch.float32))
    centre = float(torch.tensor(2.0 / (1.0 - clip), dtype=torch.float32)) if clip < 1.0 else float("inf")
    return span, centre


def symmetric_scale(x: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    """Scale (float16) of the symmetric format of ``x`` over its last axis (kept as size 1):
    ``scale = fp16(max|x| / span)``, ``span = fp32((2**bits - 1) / (2 clip))``. The levels
    ``code * scale + zero`` with the implied zero :func:`symmetric_zero` are symmetric about 0,
    none at 0 itself (a mid-rise quantizer), so ``max|x|`` (times ``clip``) sits on the outer
    levels. A head whose scale rounds to 0 stores 0 and decodes to 0; its codes are those of
    divisor 1."""
    m = x.float().abs().amax(-1, keepdim=True)
    return (m / torch.full_like(m, symmetric_span(bits, clip))).to(SCALE_DTYPE)


def symmetric_zero(scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The implied zero of the symmetric format, ``-(2**bits - 1) / 2 * scale`` in float32 (exact:
    an 11-bit scale times a number of at most 8 significant bits); not stored."""
    return scale.float() * (-(2**bits - 1) / 2)


def symmetric_span(bits: int, clip: float) -> float:
    """The float32 divisor of the symmetric scale: ``(2**bits - 1) / (2 clip)``."""
    _check_clip(clip)
    return float(torch.tensor((2**bits - 1) / (2.0 * clip), dtype=torch.float32))


def _check_clip(clip: float) -> None:
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip={clip} must be in (0, 1]")


def symmetric_codes(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ``x`` for the float16 ``scale`` of :func:`symmetric_scale` (broadcast)."""
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale)
    return affine_codes(x, divisor, symmetric_zero(scale, bits), bits)


def symmetric_decode(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 values of symmetric ``codes``: ``code * scale + zero``, zero implied by the scale."""
    return affine_decode(codes, scale, symmetric_zero(scale, bits))


def affine_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (uint8) of ``x`` for the given float16 scale/zero (broadcast)."""
    q = torch.floor((x.float() - zero.float()) / scale.float() + 0.5)
    return q.clamp_(0, 2**bits - 1).to(torch.uint8)


def affine_decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """float32 values of ``codes`` (broadcast against scale/zero)."""
    return codes.float() * scale.float() + zero.float()


def first_part_bits(bits: int) -> int:
    """Width of the part of a code :func:`pack` writes first: 2 for 3-bit codes (their low bits;
    the high bit follows as a 1-bit packing), ``bits`` otherwise. The paged layout and kernels
    size and unpack a role's planes by it."""
    return 2 if bits == 3 else bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes of ``bits`` along the last axis, planar (see module docstring); 3 bits
    are the 2-bit packing of the low two bits followed by the 1-bit packing of the high bit."""
    if bits == 8:
        return codes
    if bits == 3:
        low = first_part_bits(bits)
        return torch.cat([pack(codes & (1 << low) - 1, low), pack(codes >> low, 1)], -1)
    per_byte = 8 // bits
    n = codes.shape[-1]
    if n % per_byte:
        raise ValueError(f"cannot pack {n} {bits}-bit codes: length must be a multiple of {per_byte}")
    planes = codes.reshape(*codes.shape[:-1], per_byte, n // per_byte).to(torch.int32)
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32).unsqueeze(-1)
    return (planes << shifts).sum(-2).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`."""
    if bits == 8:
        return packed
    if bits == 3:
        low = first_part_bits(bits)
        first = packed.shape[-1] * 8 // 3 * low // 8  # bytes of the low part
        return unpack(packed[..., :first], low) | (unpack(packed[..., first:], 1) << low)
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.int32).unsqueeze(-1)
    planes = (packed.to(torch.int32).unsqueeze(-2) >> shifts) & (2**bits - 1)
    return planes.reshape(*packed.shape[:-1], -1).to(torch.uint8)
