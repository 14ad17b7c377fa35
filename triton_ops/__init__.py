"""Triton kernels shared by the HF and vLLM adapters: quantize-and-store into a paged KV cache and
attention that reads the compressed cache directly.

Layout: :class:`PagedLayout` (one tensor per layer). Kernels: :func:`store_kv`,
:func:`paged_attention` (any mix of decode rows and prefill chunks; a decode-only batch goes to
:func:`decode_attention`, its one-token specialisation), :func:`dequantize_kv` (the decoded K/V
of sequences, packed, for a dense varlen attention kernel); their plain-PyTorch references:
:func:`store_kv_reference`, :func:`paged_attention_reference`, :func:`decode_attention_reference`,
:func:`dequantize_kv_reference`. :func:`gather_rows` copies indexed rows out of a (possibly
host-resident) tensor and :func:`copy_token_rows` moves tokens between host-resident *token rows*
and a paged cache, for offloaded caches.
Triton is imported only when a kernel is called, so this module imports without it (and
``import kvplug`` never imports it). Keys and values may differ in width (``PagedLayout.value_bits``).
Rotated codecs (``rotate=true``, ``PagedLayout.rotated``) are handled by the caller: rotate q
before and the attention output after (:func:`kvplug.rotation.rotate`).
"""

from __future__ import annotations

import torch

from kvplug import quant

from .layout import PagedLayout
from .reference import (copy_token_rows_reference, decode_attention_reference, dequantize_kv_reference, gather_kv,
                        gather_rows_reference, paged_attention_reference, store_kv_reference)

__all__ = ["PagedLayout", "store_kv", "decode_attention", "paged_attention", "dequantize_kv", "store_kv_reference",
           "decode_attention_reference", "paged_attention_reference", "dequantize_kv_reference", "gather_kv",
           "default_num_splits", "DECODE_TUNING", "gather_rows", "merge_attention",
           "gather_rows_reference", "copy_token_rows", "copy_token_rows_reference"]


def _kernels():
    try:
        from . import kernels
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("kvplug.triton_ops kernels need triton (pip install 'kvplug[triton]'); "
                          "the *_reference functions work without it") from e
    return kernels


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def store_kv(k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
             layout: PagedLayout) -> None:
    """Quantize this step's ``k``, ``v`` and write them into ``cache`` in one pass (in place).

    k, v: ``[num_tokens, num_kv_heads, head_dim]`` float16/bfloat16 (last dim contiguous).
    slot_mapping: int ``[num_tokens]`` (one slot for all heads, vLLM) or
    ``[num_tokens, num_kv_heads]`` (a slot per head); slot = block * block_size + offset; -1 skips.
    Codes are bit-identical to the core codec (:mod:`kvplug.quant`).
    """
    layout.check(cache)
    t, h, d = k.shape
    if v.shape != k.shape or h != layout.num_kv_heads or d != layout.head_dim:
        raise ValueError(f"store_kv: k {tuple(k.shape)} / v {tuple(v.shape)} do not match {layout}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("store_kv: k and v need a contiguous last dimension")
    if slot_mapping.dim() == 1:
        st, sh = slot_mapping.stride(0), 0
    elif tuple(slot_mapping.shape) == (t, h):
        st, sh = slot_mapping.stride()
    else:
        raise ValueError(f"store_kv: slot_mapping must be [{t}] or [{t}, {h}], got {tuple(slot_mapping.shape)}")
    if slot_mapping.shape[0] != t:
        raise ValueError(f"store_kv: slot_mapping has {slot_mapping.shape[0]} rows for {t} tokens")
    if t == 0:
        return
    kern = _kernels()
    meta = cache.view(torch.float16) if layout.quantized else cache
    kern._store_kernel[(t,)](
        k, v, slot_mapping, cache, meta,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), st, sh,
        *layout.strides(), *_clips(layout), H=h, H_PAD=_pow2(h), D=d, BS=layout.block_size, **_widths(layout),
        KCENTRED=layout.key_clip != 1.0 and not layout.symmetric,
        VCENTRED=layout.value_clip != 1.0 and not layout.symmetric,
        num_warps=4 if h * d >= 1024 else 2)


def _clips(layout: PagedLayout) -> tuple[float, float, float, float]:
    """The store kernel's divisors per role, ``(kspan, kcentre, vspan, vcentre)``
    (:func:`kvplug.quant.clip_constants`; a 16-bit layout ignores them; an unclipped role's
    centre is unused, passed as 1)."""
    out = []
    for role in (0, 1):
        bits, clip = layout.role_bits(role), layout.role_clip(role)
        if bits == 16:
            span, centre = 1.0, 1.0
        elif layout.symmetric:
            span, centre = quant.symmetric_span(bits, clip), 1.0
        else:
            span, centre = quant.clip_constants(bits, clip)
        out += [span, centre if centre != float("inf") else 1.0]
    return tuple(out)


def _widths(layout: PagedLayout) -> dict:
    """The kernels' per-role constants: bits and code bytes of keys and values (16 bits: head_dim);
    KLB, the bits of the keys' first packed part (:func:`kvplug.quant.first_part_bits`: 2 for
    3-bit keys), whose ``8 // KLB`` planes of KPW elements the kernels read (KPW: that part's
    bytes); META, float16 metadata per token and role (2: scale and zero, 1: the symmetric
    format's scale)."""
    kcb, vcb = (layout.role_code_bytes(r) if layout.quantized else layout.head_dim for r in (0, 1))
    klb = quant.first_part_bits(layout.bits)
    kpw = layout.head_dim * klb // 8 if layout.quantized else kcb
    return dict(KBITS=layout.bits, KCB=kcb, VBITS=layout.vbits, VCB=vcb, KLB=klb, KPW=kpw,
                META=max(1, layout.meta_bytes // 2))


def default_num_splits(batch: int, num_kv_heads: int, max_len: int, block_n: int,
                       num_sms: int = 132, programs_per_sm: int = 4) -> int:
    """Splits of the context so that about ``programs_per_sm`` programs per multiprocessor fill
    the GPU (what can be resident at once), each split at least ``4 * block_n`` tokens long; a
    power of two, rounded down."""
    progs = batch * num_kv_heads
    want = max(1, (programs_per_sm * num_sms) // progs)
    most = max(1, max_len // (4 * block_n))
    return 1 << (min(want, most).bit_length() - 1)


#: Launch settings of :func:`decode_attention` by layout bits, from the H200 sweeps of 2026-12-01
#: (docs/BENCHMARKS.md): (block_n, num_warps, num_stages, maxnreg, programs per SM that the default
#: splits aim at: about what fits at once, 128 registers and 10-19 KB of shared memory a one-warp
#: program; fp16 as measured on the H100, four programs per SM).
DECODE_TUNING = {16: (64, 4, 2, None, 4), 8: (32, 1, 2, 128, 8), 4: (32, 1, 2, 128, 16), 3: (32, 1, 2, 128, 16),
                 2: (32, 1, 2, 128, 16)}


def decode_attention(q: torch.Tensor, cache: torch.Tensor, layout: PagedLayout,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     sm_scale: float | None = None, *, held: torch.Tensor | None = None,
                     num_splits: int | None = None, block_n: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None,
                     maxnreg: int | None = 0, out: torch.Tensor | None = None,
                     logits: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                     tail: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One decode step of attention over a paged (compressed) KV cache.

    q: ``[batch, num_q_heads, head_dim]`` (num_q_heads a multiple of num_kv_heads, GQA).
    block_tables: int32 ``[batch, max_blocks]``. seq_lens: int32 or int64 ``[batch]`` or
    ``[batch, num_kv_heads]`` (a length per head: tokens ``0..len-1`` of the sequence's slots).
    held (optional): int32 ``[batch, 3]`` or ``[batch, num_kv_heads, 3]``, ``(start, front, window)``:
    read only slots ``[start, start + front)`` and the last ``window`` before the length (from
    ``start + front`` on): the tokens eviction keeps (snapkv: ``(P - K, K, large)``; streaming:
    ``(0, sinks, window)``). A head with nothing to read gives zeros.
    Returns ``[batch, num_q_heads, head_dim]`` in q's dtype.
    Tuning knobs (defaults per layout in ``DECODE_TUNING``, measured on the H200): ``num_splits`` (default
    :func:`default_num_splits` from the block table's capacity, no host sync), ``block_n`` (tokens
    per tile), ``num_warps``, ``num_stages``, ``maxnreg`` (registers per thread the compiler may
    use, CUDA only; 0 = the layout's default, None = no limit).
    ``out`` (optional, like q, or float32 of q's shape) receives the result.
    ``logits`` (optional, float32 ``[batch, num_q_heads, W]``, contiguous): entry ``i`` receives
    ``q . k_i * sm_scale`` of held token ``i`` (in the order read: the front run, then the window;
    all tokens without ``held``) for ``i < W``, as the kernel computed it; entries of tokens not
    read are left as they are. Decode-time eviction's score update reads it (no second pass).
    ``lse`` (optional, float32 ``[batch, num_q_heads]``, contiguous) receives the natural
    log-sum-exp of each query head's scaled logits over the tokens read (-inf where none), so the
    result can be merged with attention over tokens held elsewhere (:func:`merge_attention`; a
    full-precision residual window). It runs the split path even for one split.
    ``tail`` (optional): ``(keys, values, counts)``, dense K/V ``[batch, num_kv_heads, N, head_dim]``
    (any float dtype, in the basis q is given in; last dimension contiguous, keys and values with
    the same strides) of which each head's first ``counts`` (int ``[batch]`` or
    ``[batch, num_kv_heads]``) rows are tokens attended *besides* the paged ones, in the same
    softmax (float32, by the reduce kernel): a residual window of the newest tokens held in the
    model dtype. Order does not matter; a causal caller passes only tokens the query sees.
    """
    b, hq, d, h, g = _check_q(q, cache, layout, "decode_attention")
    sm_scale = d ** -0.5 if sm_scale is None else float(sm_scale)
    lb, lh = _per_sequence_strides(seq_lens, b, h, "seq_lens")
    hb, hh = (0, 0) if held is None else _per_sequence_strides(held, b, h, "held", 3)
    if block_tables.dim() != 2 or block_tables.shape[0] != b or block_tables.stride(-1) != 1:
        raise ValueError("decode_attention: block_tables must be [batch, max_blocks] with contiguous rows")
    if out is None:
        out = torch.empty_like(q)
    if b == 0:
        return out
    # two widths: the narrower role's settings (k8v4 at (8, 32K) on the H200: 130 us with int4's
    # programs per SM, 160 with int8's; docs/BENCHMARKS.md)
    t_bn, t_warps, t_stages, t_maxnreg, t_progs = DECODE_TUNING[min(layout.bits, layout.vbits)]
    block_n = block_n or t_bn
    num_warps = num_warps or t_warps
    num_stages = num_stages or t_stages
    maxnreg = t_maxnreg if maxnreg == 0 else maxnreg
    max_len = block_tables.shape[1] * layout.block_size
    splits = num_splits or default_num_splits(b, h, max_len, block_n, _num_sms(q.device), t_progs)
    if lse is not None and (lse.dtype != torch.float32 or tuple(lse.shape) != (b, hq) or not lse.is_contiguous()):
        raise ValueError(f"decode_attention: lse must be contiguous float32 [{b}, {hq}], got "
                         f"{lse.dtype} {tuple(lse.shape)}")
    if tail is not None:
        tk, tv, tn = tail
        if tk.dim() != 4 or tuple(tk.shape[:2]) != (b, h) or tk.shape[3] != d or tv.shape != tk.shape \
                or tv.stride() != tk.stride() or tk.stride(-1) != 1:
            raise ValueError(f"decode_attention: tail keys and values must be [{b}, {h}, N, {d}] with the same "
                             f"strides and a contiguous last dimension, got {tuple(tk.shape)} / {tuple(tv.shape)}")
        nb, nh = _per_sequence_strides(tn, b, h, "tail counts")
    split = splits > 1 or lse is not None or tail is not None  # the reduce kernel writes lse and reads the tail
    kern = _kernels()
    cs = layout.strides()
    if split:
        po = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
        pml = torch.empty(b, hq, splits, 2, dtype=torch.float32, device=q.device)
    else:
        po = pml = out
    if logits is not None and (logits.dtype != torch.float32 or logits.dim() != 3 or logits.shape[:2] != (b, hq)
                               or not logits.is_contiguous()):
        raise ValueError(f"decode_attention: logits must be contiguous float32 [{b}, {hq}, W], got "
                         f"{logits.dtype} {tuple(logits.shape)}")
    lg = (out, 0, 0) if logits is None else (logits, logits.shape[2], logits.stride(0))
    args = (block_tables, seq_lens, seq_lens if held is None else held, out, po, pml, sm_scale, splits,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
            lb, lh, hb, hh, cs[0], cs[1], cs[2], *lg)
    const = dict(HKV=h, G=g, D=d, BS=layout.block_size, BLOCK_N=block_n, SPLIT=split,
                 HELD=held is not None, LOGITS=logits is not None, num_warps=num_warps, num_stages=num_stages)
    if maxnreg and q.device.type == "cuda":
        const["maxnreg"] = maxnreg
    if layout.quantized:
        # the interpreter runs the same arithmetic without the PTX
        kern._decode_planes_kernel[(b * h, splits)](
            q, cache, cache.view(torch.float16), *args, G_PAD=max(8, _pow2(g)), **_widths(layout),
            ASM=q.device.type == "cuda", **const)
    else:
        kern._decode_kernel[(b * h, splits)](q, cache, *args, G_PAD=max(16, _pow2(g)), **const)
    if split:
        tk, tv, tn, ts, nb, nh, n_pad = (out, out, seq_lens, (0, 0, 0), 0, 0, 1) if tail is None else \
            (tk, tv, tn, tk.stride()[:3], nb, nh, max(2, _pow2(tk.shape[2])))
        kern._reduce_kernel[(b * hq,)](po, pml, out, out if lse is None else lse, q, tk, tv, tn, splits,
                                       out.stride(0), out.stride(1), q.stride(0), q.stride(1), *ts, nb, nh, sm_scale,
                                       HQ=hq, G=g, D=d, S_PAD=_pow2(splits), LSE=lse is not None, TAIL=tail is not None,
                                       N_PAD=n_pad, num_warps=4)
    return out


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                    lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over two disjoint sets of tokens merged into attention over both:
    ``out_*`` ``[..., D]`` each normalised over its own tokens, ``lse_*`` ``[...]`` the natural
    log-sum-exp of its logits (-inf for an empty set, whose output is ignored). Float32 result
    (plain PyTorch: a few element-wise ops per head)."""
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    finite = torch.isfinite(lse)
    wa = torch.where(finite, torch.exp(lse_a.float() - lse), 0.0)[..., None]
    wb = torch.where(finite, torch.exp(lse_b.float() - lse), 0.0)[..., None]
    return (torch.where(wa > 0, out_a.float(), 0.0) * wa + torch.where(wb > 0, out_b.float(), 0.0) * wb)


def paged_attention(q: torch.Tensor, cache: torch.Tensor, layout: PagedLayout, block_tables: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, sm_scale: float | None = None, *,
                    max_query_len: int | None = None, out: torch.Tensor | None = None,
                    block_n: int = 32, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """Causal attention of a varlen batch over a paged (compressed) KV cache: decode rows of one
    token and prefill chunks of many, mixed in one launch, GQA-aware, reading the codes in place.

    q: ``[tokens, num_q_heads, head_dim]``; sequence s owns rows ``query_start_loc[s] ..
    query_start_loc[s+1] - 1`` (int32 ``[num_seqs + 1]``, vLLM's ``query_start_loc``), at
    positions ``seq_lens[s] - q_len .. seq_lens[s] - 1``; every token attends to the cache's
    positions up to its own, so its own chunk must be stored first (:func:`store_kv`): a chunk, a
    prefix-cache hit's remainder and a decode step all attend over what the cache holds, and the
    result does not depend on how a prompt was split. ``max_query_len`` (a host int, as vLLM's
    metadata has it; None reads it, a device sync): 1 with one row per sequence runs
    :func:`decode_attention` instead. Returns ``[tokens, num_q_heads, head_dim]`` in q's dtype.
    """
    t, hq, d, h, g = _check_q(q, cache, layout, "paged_attention")
    n = _check_varlen("paged_attention", block_tables, seq_lens, query_start_loc, "query_start_loc")
    if out is None:
        out = torch.empty_like(q)
    if t == 0 or n == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_query_len == 1 and t == n:
        return decode_attention(q, cache, layout, block_tables, seq_lens, sm_scale, out=out)
    sm_scale = d ** -0.5 if sm_scale is None else float(sm_scale)
    block_q = max(1, 64 // g)
    cs = layout.strides()
    _kernels()._varlen_kernel[(n * h, _cdiv(max_query_len, block_q))](
        q, cache, cache.view(torch.float16) if layout.quantized else cache, block_tables, query_start_loc, seq_lens,
        out, sm_scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        cs[0], cs[1], cs[2], HKV=h, G=g, D=d, BS=layout.block_size, **_widths(layout), BLOCK_Q=block_q,
        BLOCK_N=block_n,
        ASM=q.device.type == "cuda", num_warps=num_warps, num_stages=num_stages)
    return out


def dequantize_kv(cache: torch.Tensor, layout: PagedLayout, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                  cu_seqlens: torch.Tensor, *, total: int, max_seq_len: int,
                  dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoded K and V of each sequence's first ``seq_lens[s]`` slots, packed one sequence
    after another: ``[total, num_kv_heads, head_dim]`` each, sequence s at rows ``cu_seqlens[s] ..``
    (int32 ``[num_seqs + 1]``, the ``cu_seqlens_k`` of a varlen attention kernel). ``total`` and
    ``max_seq_len`` are host ints (``cu_seqlens[-1]`` and the longest length; no device sync).
    Values are the core codec's ``code * scale + zero`` (float32) rounded to ``dtype`` (default the
    layout's), so a dense kernel over them attends over what the cache holds.
    """
    layout.check(cache)
    n = _check_varlen("dequantize_kv", block_tables, seq_lens, cu_seqlens, "cu_seqlens")
    h, d = layout.num_kv_heads, layout.head_dim
    dtype = dtype or layout.dtype
    k = torch.empty(total, h, d, dtype=dtype, device=cache.device)
    v = torch.empty_like(k)
    if total == 0 or n == 0 or max_seq_len == 0:
        return k, v
    block_t = 64
    cs = layout.strides()
    _kernels()._dequant_kernel[(n, _cdiv(max_seq_len, block_t), h)](
        cache, cache.view(torch.float16) if layout.quantized else cache, block_tables, seq_lens, cu_seqlens, k, v,
        block_tables.stride(0), cs[0], cs[1], cs[2], k.stride(0), k.stride(1), HKV=h, D=d, BS=layout.block_size,
        **_widths(layout), BLOCK_T=block_t, num_warps=4)
    return k, v


def gather_rows(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[r, j, :] = src[r, index[r, j], :]`` for ``src`` ``[R, S, W]`` (rows contiguous in the
    last dimension), ``index`` int ``[R, K]`` (each < S) on the kernel's device; ``out`` ``[R, K, W]``
    (made when None). ``src`` may be pinned host memory while ``index`` and ``out`` are on the GPU:
    the kernel reads just the indexed rows over the bus (unified addressing), no host-side gather
    and no device sync. Reference: :func:`gather_rows_reference`.
    """
    r, s, w = src.shape
    if index.dim() != 2 or index.shape[0] != r or index.stride(-1) != 1:
        raise ValueError(f"gather_rows: index must be [{r}, K] with contiguous rows, got {tuple(index.shape)}")
    if src.stride(-1) != 1:
        raise ValueError("gather_rows: src needs a contiguous last dimension")
    k = index.shape[1]
    if out is None:
        out = torch.empty(r, k, w, dtype=src.dtype, device=index.device)
    if tuple(out.shape) != (r, k, w) or out.dtype != src.dtype or out.stride(-1) != 1:
        raise ValueError(f"gather_rows: out must be [{r}, {k}, {w}] {src.dtype} with a contiguous last dimension")
    if r == 0 or k == 0 or w == 0:
        return out
    block_k = 32
    block_w = min(_pow2(w), 128)
    _kernels()._gather_rows_kernel[(r, _cdiv(k, block_k))](
        src, index, out, k, w, src.stride(0), src.stride(1), index.stride(0), out.stride(0), out.stride(1),
        BLOCK_K=block_k, BLOCK_W=block_w, num_warps=4)
    return out


def copy_token_rows(rows: torch.Tensor, cache: torch.Tensor, layout: PagedLayout, block_tables: torch.Tensor,
                    host_index: torch.Tensor, page_slots: torch.Tensor, *, to_pages: bool) -> None:
    """Copy tokens between *token rows* and a paged cache, in place, for every (sequence, KV head).

    rows: uint8 ``[S, B, H, layout.token_row_bytes()]`` (:meth:`PagedLayout.token_row_bytes`),
    may be pinned host memory (the kernel reads or writes it over the bus, no staging copy);
    host_index: int ``[B, H, n]``, the row of each token; page_slots: int ``[B, H, n]``, its slot
    (``block_tables`` ``[B, nb]`` index ``slot // block_size``, offset ``slot % block_size``) in its
    sequence's blocks, for its head. ``to_pages``: rows -> cache (a fetch), else cache -> rows (a
    write-back).
    Reference: :func:`copy_token_rows_reference`.
    """
    layout.check(cache)
    s, b, h, width = rows.shape
    if rows.dtype != torch.uint8 or width != layout.token_row_bytes() or h != layout.num_kv_heads \
            or not rows.is_contiguous():
        raise ValueError(f"copy_token_rows: rows must be contiguous uint8 [S, {b}, {layout.num_kv_heads}, "
                         f"{layout.token_row_bytes()}], got {tuple(rows.shape)} {rows.dtype}")
    if host_index.dim() != 3 or tuple(host_index.shape[:2]) != (b, h) or host_index.stride(-1) != 1:
        raise ValueError(f"copy_token_rows: host_index must be [{b}, {h}, n] with contiguous rows, "
                         f"got {tuple(host_index.shape)}")
    if tuple(page_slots.shape) != tuple(host_index.shape) or page_slots.stride(-1) != 1:
        raise ValueError(f"copy_token_rows: page_slots must be shaped like host_index {tuple(host_index.shape)}, "
                         f"got {tuple(page_slots.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != b or block_tables.stride(-1) != 1:
        raise ValueError(f"copy_token_rows: block_tables must be [{b}, max_blocks] with contiguous rows")
    n = host_index.shape[2]
    if n == 0:
        return
    segments = layout.token_row_segments()
    key = (layout, host_index.device)
    if key not in _SEGMENTS:  # kept per layout: a host-to-device copy per call would cost more than the kernel
        _SEGMENTS[key] = torch.tensor(segments, dtype=torch.int64, device=host_index.device)
    seg = _SEGMENTS[key]
    item = layout.storage_dtype.itemsize
    s0, _, s2 = layout.strides()
    block_k = 32
    flat, slots = host_index.reshape(b * h, n), page_slots.reshape(b * h, n)
    _kernels()._token_rows_kernel[(b * h, _cdiv(n, block_k))](
        rows, cache.view(torch.uint8), flat, slots, block_tables, seg, n, h, width, b * h * width, width,
        flat.stride(0), slots.stride(0), block_tables.stride(0), s0 * item, s2 * item, BS=layout.block_size,
        NSEG=len(segments), BLOCK_K=block_k, BLOCK_R=_pow2(width), TO_PAGES=to_pages, num_warps=4)


def _check_varlen(name: str, block_tables: torch.Tensor, seq_lens: torch.Tensor, starts: torch.Tensor,
                  starts_name: str) -> int:
    """The number of sequences of a varlen batch whose ``seq_lens`` ``[n]``, ``starts`` ``[n + 1]``
    (``starts_name`` in the message) and ``block_tables`` ``[n, max_blocks]`` agree, or a one-line error."""
    n = seq_lens.shape[0]
    if seq_lens.dim() != 1 or tuple(starts.shape) != (n + 1,):
        raise ValueError(f"{name}: seq_lens must be [num_seqs] and {starts_name} [num_seqs + 1], got "
                         f"{tuple(seq_lens.shape)} and {tuple(starts.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != n or block_tables.stride(-1) != 1:
        raise ValueError(f"{name}: block_tables must be [num_seqs, max_blocks] with contiguous rows")
    return n


def _check_q(q: torch.Tensor, cache: torch.Tensor, layout: PagedLayout, name: str) -> tuple[int, ...]:
    """``(rows, q heads, head_dim, kv heads, group)`` of a query that fits ``layout``'s cache, or a
    one-line error."""
    layout.check(cache)
    rows, hq, d = q.shape
    h = layout.num_kv_heads
    if d != layout.head_dim or hq % h:
        raise ValueError(f"{name}: q {tuple(q.shape)} does not match {layout}")
    if q.stride(-1) != 1:
        raise ValueError(f"{name}: q needs a contiguous last dimension")
    return rows, hq, d, h, hq // h


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _per_sequence_strides(x: torch.Tensor, b: int, h: int, name: str, last: int | None = None) -> tuple[int, int]:
    """Strides (sequence, head) of a per-sequence ``[b]`` or per-head ``[b, h]`` int tensor (each
    entry ``last`` contiguous ints when given)."""
    shape = tuple(x.shape) if last is None else tuple(x.shape[:-1])
    if last is not None and (x.shape[-1] != last or x.stride(-1) != 1):
        raise ValueError(f"decode_attention: {name} needs a contiguous last dimension of {last}, got {tuple(x.shape)}")
    if shape == (b,):
        return x.stride(0), 0
    if shape == (b, h):
        return x.stride(0), x.stride(1)
    want = "" if last is None else f", {last}"
    raise ValueError(f"decode_attention: {name} must be [{b}{want}] or [{b}, {h}{want}], got {tuple(x.shape)}")


_SMS: dict = {}
_SEGMENTS: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]
