"""Triton kernels of the paged KV cache (imported lazily by :mod:`kvplug.triton_ops`).

* ``_store_kernel``: one program per token; quantizes K and V of all its KV heads (float32 math,
  exact division, as :mod:`kvplug.quant`) and writes codes + (scale, zero) at each head's slot.
* ``_decode_kernel`` (codec none) and ``_decode_planes_kernel`` (int8/int4/int2): one program per
  (sequence, KV head, split); the ``G`` query heads of a KV head share every K/V tile (GQA).
  Online softmax in base 2; partial results per split, merged by ``_reduce_kernel``. Which slots a
  program reads (a length, or eviction's held runs) is :func:`_span` / :func:`_slot` /
  :func:`_tile_rows`, shared.
* ``_varlen_kernel``: causal attention of decode rows and prefill chunks mixed, over the cache.
* ``_dequant_kernel``: the decoded K/V of sequences' slots, packed (for a dense attention kernel).
* The quantized kernels' unpacking (:func:`_planes`) and tile loads (:func:`_quant_tile`) are
  shared; their design, numerics and measurements are in ``_decode_planes_kernel``'s docstring
  and in benchmarks/decode_attention_notes.md.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pack_plane(q, H_PAD: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr):
    """int32 codes ``[H_PAD, N]`` of BITS -> their planar bytes ``[H_PAD, N * BITS / 8]`` (int32)."""
    P: tl.constexpr = 8 // BITS
    q3 = tl.reshape(q, [H_PAD, P, N // P])
    shifts = tl.arange(0, P) * BITS
    return tl.sum(q3 << shifts[None, :, None], axis=1)


@triton.jit
def _quantize_store(x_ptr, stride_xt, stride_xh, t, offs_h, offs_d, ok, base, off, cache_ptr, meta_ptr,
                    meta_base, span, centre, BITS: tl.constexpr, D: tl.constexpr, CB: tl.constexpr,
                    H_PAD: tl.constexpr, CENTRED: tl.constexpr, META: tl.constexpr):
    """Quantize one role's heads of token ``t`` and write codes and metadata: ``span`` and
    ``centre`` are :func:`kvplug.quant.clip_constants` (``span = 2**BITS - 1`` and not CENTRED
    for the plain min-max format); META = 1: the symmetric format (a scale alone, ``span`` of
    :func:`kvplug.quant.symmetric_span`). Divisions only, so no multiply-add is fused and the
    bytes equal the core codec's. 3 bits: the 2-bit packing of the low bits, then the 1-bit
    packing of the high bit."""
    x = tl.load(x_ptr + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :],
                mask=ok[:, None], other=0.0)
    if BITS == 16:
        tl.store(cache_ptr + base[:, None] + off[:, None] * D + offs_d[None, :],
                 x.to(cache_ptr.dtype.element_ty), mask=ok[:, None])
    else:
        QMAX: tl.constexpr = (1 << BITS) - 1
        xf = x.to(tl.float32)
        if META == 1:
            m = tl.max(tl.abs(xf), axis=1)
            scale = tl.math.div_rn(m, tl.zeros(m.shape, tl.float32) + span).to(tl.float16)
            zero32 = scale.to(tl.float32) * (-QMAX / 2)          # exact: an 11-bit scale times (2^b - 1)/2
            div = tl.where(scale == 0, 1.0, scale).to(tl.float16)
        else:
            lo = tl.min(xf, axis=1)
            hi = tl.max(xf, axis=1)
            r = hi - lo
            scale = tl.math.div_rn(r, tl.zeros(lo.shape, tl.float32) + span).to(tl.float16)
            scale = tl.where(scale == 0, 1.0, scale).to(tl.float16)
            if CENTRED:
                zero = (lo + tl.math.div_rn(r, tl.zeros(lo.shape, tl.float32) + centre)).to(tl.float16)
            else:
                zero = lo.to(tl.float16)
            zero32 = zero.to(tl.float32)
            div = scale
        q = tl.math.div_rn(xf - zero32[:, None], tl.broadcast_to(div.to(tl.float32)[:, None], xf.shape))
        q = tl.floor(q + 0.5)
        q = tl.minimum(tl.maximum(q, 0.0), QMAX).to(tl.int32)
        at = cache_ptr + base[:, None] + off[:, None] * CB
        if BITS == 8:
            tl.store(at + tl.arange(0, CB)[None, :], q.to(tl.uint8), mask=ok[:, None])
        elif BITS == 3:
            LO: tl.constexpr = D // 4
            tl.store(at + tl.arange(0, LO)[None, :], _pack_plane(q & 3, H_PAD, D, 2).to(tl.uint8), mask=ok[:, None])
            tl.store(at + LO + tl.arange(0, D // 8)[None, :], _pack_plane(q >> 2, H_PAD, D, 1).to(tl.uint8),
                     mask=ok[:, None])
        else:
            tl.store(at + tl.arange(0, CB)[None, :], _pack_plane(q, H_PAD, D, BITS).to(tl.uint8), mask=ok[:, None])
        mp = meta_ptr + meta_base + off * META
        tl.store(mp, scale, mask=ok)
        if META == 2:
            tl.store(mp + 1, zero, mask=ok)


@triton.jit
def _store_kernel(k_ptr, v_ptr, slot_ptr, cache_ptr, meta_ptr,
                  stride_kt, stride_kh, stride_vt, stride_vh, stride_st, stride_sh,
                  stride_cblk, stride_ckv, stride_ch, kspan, kcentre, vspan, vcentre,
                  H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                  KBITS: tl.constexpr, KCB: tl.constexpr, VBITS: tl.constexpr, VCB: tl.constexpr,
                  KLB: tl.constexpr, KPW: tl.constexpr, META: tl.constexpr, KCENTRED: tl.constexpr, VCENTRED: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D)
    hmask = offs_h < H
    slot = tl.load(slot_ptr + t * stride_st + offs_h * stride_sh, mask=hmask, other=-1).to(tl.int64)
    ok = hmask & (slot >= 0)
    slot = tl.where(ok, slot, 0)
    blk = slot // BS
    off = slot % BS
    base = blk * stride_cblk + offs_h * stride_ch          # storage elements (bytes if quantized)
    _quantize_store(k_ptr, stride_kt, stride_kh, t, offs_h, offs_d, ok, base, off, cache_ptr, meta_ptr,
                    base // 2 + (BS * KCB) // 2, kspan, kcentre, KBITS, D, KCB, H_PAD, KCENTRED, META)  # float16
    _quantize_store(v_ptr, stride_vt, stride_vh, t, offs_h, offs_d, ok, base + stride_ckv, off, cache_ptr,
                    meta_ptr, (base + stride_ckv) // 2 + (BS * VCB) // 2, vspan, vcentre, VBITS, D, VCB, H_PAD,
                    VCENTRED, META)


@triton.jit
def _span(lens_ptr, held_ptr, num_splits, stride_lb, stride_lh, stride_hb, stride_hh,
          HKV: tl.constexpr, BLOCK_N: tl.constexpr, HELD: tl.constexpr):
    """This program's (sequence, KV head) and the range ``[start, end)`` of the tokens it reads,
    counted in held tokens; with HELD the ``(first, n_front, recent)`` that :func:`_slot` maps
    them with."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    seq_len = tl.load(lens_ptr + b * stride_lb + h * stride_lh).to(tl.int32)  # int32 or int64 lengths
    if HELD:
        hp = held_ptr + b * stride_hb + h * stride_hh
        first = tl.load(hp)
        front_end = tl.load(hp + 1) + first
        n_front = tl.maximum(tl.minimum(front_end, seq_len) - first, 0)
        recent = tl.maximum(seq_len - tl.load(hp + 2), front_end)
        count = n_front + tl.maximum(seq_len - recent, 0)
    else:
        first = 0
        n_front = seq_len
        recent = 0
        count = seq_len
    chunk = tl.cdiv(tl.cdiv(count, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, count)
    return b, h, split, start, end, first, n_front, recent


@triton.jit
def _slot(offs_i, first, n_front, recent, HELD: tl.constexpr):
    """Held token ``i`` -> its slot in the sequence: ``first + i`` in the front run, then the
    recent window (``recent + i - n_front``)."""
    if HELD:
        return tl.where(offs_i < n_front, first + offs_i, recent + offs_i - n_front)
    else:
        return offs_i


@triton.jit
def _tile_rows(n0, end, bt_row, head_off, first, n_front, recent, stride_cblk, BS: tl.constexpr,
               BLOCK_N: tl.constexpr, HELD: tl.constexpr):
    """The tile of held tokens ``[n0, n0 + BLOCK_N)``: its mask (``< end``), each token's
    (block, head) row in the cache (storage elements) and its offset in the block."""
    offs_i = n0 + tl.arange(0, BLOCK_N)
    nmask = offs_i < end
    offs_n = _slot(offs_i, first, n_front, recent, HELD)
    blk = tl.load(bt_row + offs_n // BS, mask=nmask, other=0).to(tl.int64)
    return nmask, blk * stride_cblk + head_off, offs_n % BS


@triton.jit
def _store_logits(s, n0, nmask, gmask, b, qh, lg_ptr, lg_w, stride_lgb, BLOCK_N: tl.constexpr):
    """A tile's scores ``s`` ``[BLOCK_N, G_PAD]`` (base 2: ``q . k * sm_scale * log2(e)``) as
    natural logits into ``lg_ptr[b, qh, i]`` (float32, ``lg_w`` per query head) for the held tokens
    ``i = n0 ..`` of the tile below ``lg_w`` (the score pass eviction reads while generating)."""
    offs_i = n0 + tl.arange(0, BLOCK_N)
    lmask = (nmask & (offs_i < lg_w))[:, None] & gmask[None, :]
    tl.store(lg_ptr + b.to(tl.int64) * stride_lgb + qh[None, :].to(tl.int64) * lg_w + offs_i[:, None],
             s * 0.6931471805599453, mask=lmask)


@triton.jit
def _store_partial(acc, m_i, l_i, b, qh, split, num_splits, out_ptr, po_ptr, pml_ptr, stride_ob, stride_oh,
                   offs_d, gmask, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr,
                   LAST: tl.constexpr):
    """Write a ``[G_PAD, W]`` piece of the output (columns ``offs_d``): normalised into ``out``, or
    with SPLIT unnormalised into the split partials (and, with LAST, this split's max and sum)."""
    if not SPLIT:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + qh[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
    else:
        part = (b.to(tl.int64) * (HKV * G) + qh) * num_splits + split      # [G_PAD]
        tl.store(po_ptr + part[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None])
        if LAST:
            tl.store(pml_ptr + part * 2, m_i, mask=gmask)
            tl.store(pml_ptr + part * 2 + 1, l_i, mask=gmask)


@triton.jit
def _decode_kernel(q_ptr, cache_ptr, bt_ptr, lens_ptr, held_ptr, out_ptr, po_ptr, pml_ptr,
                   sm_scale, num_splits,
                   stride_qb, stride_qh, stride_ob, stride_oh, stride_btb, stride_lb, stride_lh,
                   stride_hb, stride_hh, stride_cblk, stride_ckv, stride_ch, lg_ptr, lg_w, stride_lgb,
                   HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                   BS: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HELD: tl.constexpr,
                   LOGITS: tl.constexpr):
    """Decode attention over a float16/bfloat16 paged cache (codec none): ``s = q k^T``, ``p v``
    on the tensor cores with the G query rows of a KV head padded to G_PAD. stride_c*: the
    cache's strides in elements. With LOGITS each held token's logit goes to ``lg_ptr`` (:func:`_store_logits`)."""
    b, h, split, start, end, first, n_front, recent = _span(lens_ptr, held_ptr, num_splits, stride_lb, stride_lh,
                                                            stride_hb, stride_hh, HKV, BLOCK_N, HELD)
    offs_g = tl.arange(0, G_PAD)
    gmask = offs_g < G
    qh = h * G + offs_g
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + qh[:, None] * stride_qh + offs_d[None, :],
                mask=gmask[:, None], other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    head_off = h.to(tl.int64) * stride_ch
    for n0 in range(start, end, BLOCK_N):
        nmask, row, off = _tile_rows(n0, end, bt_row, head_off, first, n_front, recent, stride_cblk, BS, BLOCK_N, HELD)
        kp = cache_ptr + (row + off * D)[:, None] + offs_d[None, :]
        k = tl.load(kp, mask=nmask[:, None], other=0.0)
        v = tl.load(kp + stride_ckv, mask=nmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * (sm_scale * 1.4426950408889634)
        s = tl.where(nmask[None, :], s, float("-inf"))
        if LOGITS:
            _store_logits(tl.trans(s), n0, nmask, gmask, b, qh, lg_ptr, lg_w, stride_lgb, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    _store_partial(acc, m_i, l_i, b, qh, split, num_splits, out_ptr, po_ptr, pml_ptr, stride_ob, stride_oh,
                   offs_d, gmask, HKV, G, D, SPLIT, True)


@triton.jit
def _reduce_kernel(po_ptr, pml_ptr, out_ptr, lse_ptr, q_ptr, tk_ptr, tv_ptr, tn_ptr, num_splits, stride_ob, stride_oh,
                   stride_qb, stride_qh, stride_tb, stride_th, stride_tn, stride_nb, stride_nh, sm_scale,
                   HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr, LSE: tl.constexpr,
                   TAIL: tl.constexpr, N_PAD: tl.constexpr):
    """Combine the splits' partials of one (sequence, query head) into the output; with TAIL also
    attend over the KV head's dense tail (``tk_ptr``/``tv_ptr`` rows ``0 .. n - 1``, ``n`` read
    from ``tn_ptr``: the newest tokens, held apart from the pages) in the same softmax, float32;
    with LSE also write the natural log-sum-exp of all its logits (-inf when it read no token) to
    ``lse_ptr`` (contiguous ``[batch, HQ]``). The partials' maxima are in log2 units (logits
    times log2(e))."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // HQ
    hq = pid % HQ
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D)
    smask = offs_s < num_splits
    part = pid * num_splits + offs_s
    m = tl.load(pml_ptr + part * 2, mask=smask, other=float("-inf"))
    l = tl.load(pml_ptr + part * 2 + 1, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)
    if TAIL:
        h = hq // G
        n = tl.load(tn_ptr + b * stride_nb + h * stride_nh).to(tl.int32)
        offs_n = tl.arange(0, N_PAD)
        nmask = offs_n < n
        q = tl.load(q_ptr + b * stride_qb + hq * stride_qh + offs_d).to(tl.float32)
        rows = b * stride_tb + h * stride_th + offs_n[:, None] * stride_tn + offs_d[None, :]
        kt = tl.load(tk_ptr + rows, mask=nmask[:, None], other=0.0).to(tl.float32)
        st = tl.sum(kt * q[None, :], axis=1) * (sm_scale * 1.4426950408889634)
        st = tl.where(nmask, st, float("-inf"))
        m_max = tl.maximum(m_max, tl.max(st, axis=0))
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    l_tot = tl.sum(w * l, axis=0)
    o = tl.load(po_ptr + part[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0)
    num = tl.sum(o * w[:, None], axis=0)
    if TAIL:
        pt = tl.exp2(st - m_max)
        l_tot += tl.sum(pt, axis=0)
        vt = tl.load(tv_ptr + rows, mask=nmask[:, None], other=0.0).to(tl.float32)
        num += tl.sum(vt * pt[:, None], axis=0)
    res = num / tl.where(l_tot > 0, l_tot, 1.0)
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + offs_d, res.to(out_ptr.dtype.element_ty))
    if LSE:
        lse = tl.where(l_tot > 0, (m_max + tl.log2(tl.where(l_tot > 0, l_tot, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        tl.store(lse_ptr + pid, lse)


# ---- planar unpacking ---------------------------------------------------------------------------
# The packing is planar (:mod:`kvplug.quant`): plane j of a head's codes, elements
# ``[j * CB, (j + 1) * CB)`` of head_dim, sits at bits ``[j * BITS, (j + 1) * BITS)`` of the CB
# bytes. Masking plane j in place and or-ing the float16 exponent of 1024 gives ``1024 + 2^(j*BITS) c``
# exactly (the mantissa has 10 bits); subtracting 1024 leaves ``2^(j*BITS) c``, whose power of two is
# folded into q (keys) or the scale (values). On the GPU one ``prmt`` spreads two bytes into the low
# bytes of a half2 with 0x64 above them and one ``and`` per plane masks them: 1.5 (int8: 1) integer
# instructions per two codes, no shifts, no conversions, no shuffles between halves.

@triton.jit
def _plane_bits(x, J: tl.constexpr, BITS: tl.constexpr):
    """Plane J of the uint8 codes ``x`` as float16 ``1024 + 2^(J*BITS) c`` (portable ops)."""
    MASK: tl.constexpr = ((1 << BITS) - 1) << (J * BITS)
    return ((x.to(tl.int32) & MASK) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _planes(x, BITS: tl.constexpr, ASM: tl.constexpr, PURE: tl.constexpr):
    """uint8 codes ``[N, CB]`` -> a tuple of the 8 / BITS planes as float16 ``1024 + 2^(j*BITS) c``,
    each ``[N, CB]``. ASM: ``prmt`` + ``and`` in PTX (GPU); otherwise the same values from portable
    ops (the interpreter). PURE=False keeps Triton from moving a layout conversion above the asm
    (for V it would then gather single bytes into the transposed mma operand: ~60% more
    instructions in the loop)."""
    if ASM:
        if BITS == 8:
            return tl.inline_asm_elementwise("prmt.b32 $0, $2, 0x64646464, 0x4140; prmt.b32 $1, $2, 0x64646464, 0x4342;",
                                             "=r,=r,r", [x], dtype=(tl.float16,), is_pure=PURE, pack=4)
        elif BITS == 4:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 t0, t1; prmt.b32 t0, $4, 0x64646464, 0x4140; prmt.b32 t1, $4, 0x64646464, 0x4342;"
                " and.b32 $0, t0, 0xFF0FFF0F; and.b32 $1, t1, 0xFF0FFF0F;"
                " and.b32 $2, t0, 0xFFF0FFF0; and.b32 $3, t1, 0xFFF0FFF0; }",
                "=r,=r,=r,=r,r", [x], dtype=(tl.float16, tl.float16), is_pure=PURE, pack=4)
        else:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 t0, t1; prmt.b32 t0, $8, 0x64646464, 0x4140; prmt.b32 t1, $8, 0x64646464, 0x4342;"
                " and.b32 $0, t0, 0xFF03FF03; and.b32 $1, t1, 0xFF03FF03;"
                " and.b32 $2, t0, 0xFF0CFF0C; and.b32 $3, t1, 0xFF0CFF0C;"
                " and.b32 $4, t0, 0xFF30FF30; and.b32 $5, t1, 0xFF30FF30;"
                " and.b32 $6, t0, 0xFFC0FFC0; and.b32 $7, t1, 0xFFC0FFC0; }",
                "=r,=r,=r,=r,=r,=r,=r,=r,r", [x], dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                is_pure=PURE, pack=4)
    else:
        if BITS == 8:
            return (_plane_bits(x, 0, BITS),)
        elif BITS == 4:
            return _plane_bits(x, 0, BITS), _plane_bits(x, 1, BITS)
        else:
            return _plane_bits(x, 0, BITS), _plane_bits(x, 1, BITS), _plane_bits(x, 2, BITS), _plane_bits(x, 3, BITS)


@triton.jit
def _high_planes(hx, KPW: tl.constexpr, ASM: tl.constexpr):
    """The high bits of 3-bit keys as four float16 planes ``1024 + 4^j b`` (``[N, KPW]`` each),
    aligned with the planes of their 2-bit part. ``hx`` ``[N, KPW]`` holds in column i the
    high-bit byte ``i % (KPW / 2)`` (the 1-bit packing: element ``e`` at bit ``e // (head_dim / 8)``
    of byte ``e % (head_dim / 8)``), so plane j's element i is at bit ``2j`` of its byte in the
    first half of the columns and at bit ``2j + 1`` in the second: the second half is shifted right
    by one, then the bits 0, 2, 4, 6 masked in place as the 2-bit planes are (:func:`_planes`).
    On the GPU one ``and`` and one ``shr`` per four bytes (the four columns of a register lie in
    one half; the bit shifted in from the next byte lands on bit 7, which no plane reads), then
    the 2-bit path's ``prmt`` and ``and``."""
    sel = tl.broadcast_to((tl.arange(0, KPW) >= KPW // 2).to(tl.uint8)[None, :], hx.shape)
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 s, x, t0, t1; and.b32 s, $9, 1; shr.b32 x, $8, s;"
            " prmt.b32 t0, x, 0x64646464, 0x4140; prmt.b32 t1, x, 0x64646464, 0x4342;"
            " and.b32 $0, t0, 0xFF01FF01; and.b32 $1, t1, 0xFF01FF01;"
            " and.b32 $2, t0, 0xFF04FF04; and.b32 $3, t1, 0xFF04FF04;"
            " and.b32 $4, t0, 0xFF10FF10; and.b32 $5, t1, 0xFF10FF10;"
            " and.b32 $6, t0, 0xFF40FF40; and.b32 $7, t1, 0xFF40FF40; }",
            "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [hx, sel], dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
            is_pure=True, pack=4)
    else:
        x = hx.to(tl.int32) >> sel.to(tl.int32)
        return (((x & 1) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True),
                ((x & 4) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True),
                ((x & 16) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True),
                ((x & 64) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True))


@triton.jit
def _meta(meta_ptr, row, off, nmask, BS: tl.constexpr, CB: tl.constexpr, BITS: tl.constexpr,
          META: tl.constexpr):
    """float32 (scale, zero) of each token of a tile, ``row`` its role's row in bytes; META = 1:
    the symmetric format's scale, its zero ``-(2^BITS - 1) / 2 * scale``."""
    if META == 1:
        sc = tl.load(meta_ptr + row // 2 + (BS * CB) // 2 + off, mask=nmask, other=0.0).to(tl.float32)
        return sc, sc * (-((1 << BITS) - 1) / 2)
    else:
        mp = meta_ptr + (row // 2 + (BS * CB) // 2 + off * 2)[:, None] + tl.arange(0, 2)[None, :]
        return tl.split(tl.load(mp, mask=nmask[:, None], other=0.0).to(tl.float32))


@triton.jit
def _quant_tile(cache_ptr, meta_ptr, row, off, nmask, stride_ckv, offs_kc, offs_vc, BS: tl.constexpr,
                KCB: tl.constexpr, VCB: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
                KPW: tl.constexpr, META: tl.constexpr, ASM: tl.constexpr):
    """One tile of a quantized cache: K's planes (``1024 + 2^(j*KBITS) c``, float16; 3-bit keys:
    four planes ``1024 + 4^j c`` as 2-bit keys have, their high bit added in), V's raw
    code bytes (unpacked where they are used) and the float32 (scale, zero) of K and V, per token.
    ``row``: each token's (block, head) K row in bytes (its V row ``stride_ckv`` further), ``off``
    its offset in the block; ``offs_kc``: ``arange(KPW)``."""
    kat = cache_ptr + (row + off * KCB)[:, None]
    kx = tl.load(kat + offs_kc[None, :], mask=nmask[:, None], other=0)
    vrow = row + stride_ckv
    vx = tl.load(cache_ptr + (vrow + off * VCB)[:, None] + offs_vc[None, :], mask=nmask[:, None], other=0)
    ks, kz = _meta(meta_ptr, row, off, nmask, BS, KCB, KBITS, META)
    vs, vz = _meta(meta_ptr, vrow, off, nmask, BS, VCB, VBITS, META)
    if KBITS == 3:  # plane j: 1024 + 4^j (low + 4 high), exact in float16 (an integer below 2048)
        hx = tl.load(kat + KPW + (offs_kc % (KPW // 2))[None, :], mask=nmask[:, None], other=0)
        lo = _planes(kx, 2, ASM, True)
        hi = _high_planes(hx, KPW, ASM)
        kpl = (lo[0] + (hi[0] * 4.0 - 4096.0), lo[1] + (hi[1] * 4.0 - 4096.0), lo[2] + (hi[2] * 4.0 - 4096.0),
               lo[3] + (hi[3] * 4.0 - 4096.0))
    else:
        kpl = _planes(kx, KBITS, ASM, True)
    return kpl, vx, ks, kz, vs, vz


@triton.jit
def _key_queries(q_ptrs, qmask, sm_scale, qsum, AXIS: tl.constexpr, KLB: tl.constexpr, KPW: tl.constexpr):
    """q's planes for the key planes of :func:`_quant_tile`, times the softmax scale and log2(e),
    float16 (plane j of KPW elements at ``q_ptrs + j * KPW``; ``qmask`` broadcast against it),
    each divided by its key plane's power of two (KLB: the keys' first-part bits, 2 for 3-bit keys);
    and ``qsum`` (zeros) plus ``sum(q)`` in float32, reduced over AXIS (the head_dim axis of ``q_ptrs``)."""
    NP: tl.constexpr = 8 // KLB
    qs = ()
    for j in tl.static_range(NP):
        qj = (tl.load(q_ptrs + j * KPW, mask=qmask, other=0.0).to(tl.float32)
              * (sm_scale * 1.4426950408889634)).to(tl.float16)
        qsum += tl.sum(qj.to(tl.float32), axis=AXIS)
        qs = qs + ((qj.to(tl.float32) * (1.0 / (1 << (j * KLB)))).to(tl.float16),)
    return qs, qsum


@triton.jit
def _decode_planes_kernel(q_ptr, cache_ptr, meta_ptr, bt_ptr, lens_ptr, held_ptr, out_ptr, po_ptr, pml_ptr,
                          sm_scale, num_splits,
                          stride_qb, stride_qh, stride_ob, stride_oh, stride_btb, stride_lb, stride_lh,
                          stride_hb, stride_hh, stride_cblk, stride_ckv, stride_ch, lg_ptr, lg_w, stride_lgb,
                          HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                          BS: tl.constexpr, KBITS: tl.constexpr, KCB: tl.constexpr, VBITS: tl.constexpr,
                          VCB: tl.constexpr, KLB: tl.constexpr, KPW: tl.constexpr, META: tl.constexpr, BLOCK_N: tl.constexpr,
                          SPLIT: tl.constexpr, HELD: tl.constexpr, ASM: tl.constexpr, LOGITS: tl.constexpr):
    """Decode attention over an int8/int4/int2 paged cache, transposed, one plane of codes at a time.
    Keys at KBITS (KCB code bytes per token), values at VBITS (VCB); below, BITS and CB stand for
    the role's.

    stride_c*: the cache's strides in bytes; its (scale, zero) pairs are read through the float16
    view ``meta_ptr``. Tokens are the rows of both products, so the 16 rows of an mma are 16 real
    tokens and the G query heads of a KV head its columns (padded to G_PAD >= 8):
    ``S^T = K Q^T`` and ``O^T += C_V^T W``. Per tile the codes are loaded as bytes
    ``[BLOCK_N, CB]``; plane j (head_dim elements ``[j*CB, (j+1)*CB)``) is unpacked by
    :func:`_planes` to ``1024 + 2^(j*BITS) c`` in float16 (exact).

    Keys: ``s = s_k (q . c) + z_k sum(q)``, q in float16 times the softmax scale and log2(e), plane j
    of q divided by ``2^(j*BITS)`` (exact), float32 accumulation over the planes. Values: their scale
    goes into the weights, ``w = p s_v 2^(BITS-1)`` in float16 (cannot overflow for a V that float16
    holds), the codes are centred, ``2^(j*BITS) (c - 2^(BITS-1))``, and the zero point,
    ``sum_t p_t (z_t + 2^(BITS-1) s_t)``, is summed in float32 beside; the plane's power of two and
    ``2^(BITS-1)`` are divided out once at the end (exact). Centring keeps the large zero point
    (a row's minimum) out of the float16 products, which an uncentred fold loses on the GPU
    (``test_decode_long_diffuse_context``). With LOGITS each held token's logit goes to ``lg_ptr``
    (:func:`_store_logits`).
    """
    KNP: tl.constexpr = 8 // KLB      # key planes (3 bits: the 2-bit part's)
    VNP: tl.constexpr = 8 // VBITS
    C0: tl.constexpr = 1 << (VBITS - 1)
    b, h, split, start, end, first, n_front, recent = _span(lens_ptr, held_ptr, num_splits, stride_lb, stride_lh,
                                                            stride_hb, stride_hh, HKV, BLOCK_N, HELD)
    offs_g = tl.arange(0, G_PAD)
    gmask = offs_g < G
    qh = h * G + offs_g
    offs_kc = tl.arange(0, KPW)
    offs_vc = tl.arange(0, VCB)
    # q^T, plane by plane: [KPW, G_PAD]
    q_col = q_ptr + b.to(tl.int64) * stride_qb + qh[None, :] * stride_qh + offs_kc[:, None]
    qs, qsum = _key_queries(q_col, gmask[None, :], sm_scale, tl.zeros([G_PAD], tl.float32), 0, KLB, KPW)
    accs = ()
    for j in tl.static_range(VNP):
        accs = accs + (tl.zeros([VCB, G_PAD], tl.float32),)
    zacc = tl.zeros([BLOCK_N, G_PAD], tl.float32)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    head_off = h.to(tl.int64) * stride_ch
    for n0 in range(start, end, BLOCK_N):
        nmask, row, off = _tile_rows(n0, end, bt_row, head_off, first, n_front, recent, stride_cblk, BS, BLOCK_N, HELD)
        kpl, vx, ks, kz, vs, vz = _quant_tile(cache_ptr, meta_ptr, row, off, nmask, stride_ckv, offs_kc, offs_vc, BS,
                                              KCB, VCB, KBITS, VBITS, KPW, META, ASM)
        s = tl.zeros([BLOCK_N, G_PAD], tl.float32)
        for j in tl.static_range(KNP):
            s = tl.dot(kpl[j] - 1024.0, qs[j], s)
        s = s * ks[:, None] + kz[:, None] * qsum[None, :]
        s = tl.where(nmask[:, None], s, float("-inf"))
        if LOGITS:
            _store_logits(s, n0, nmask, gmask, b, qh, lg_ptr, lg_w, stride_lgb, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, axis=0)
        w16 = (p * (vs * C0)[:, None]).to(tl.float16)
        zacc = zacc * alpha[None, :] + p * (vz + C0 * vs)[:, None]
        vpl = _planes(vx, VBITS, ASM, False)
        new = ()
        for j in tl.static_range(VNP):
            cj = vpl[j] - (1024.0 + C0 * (1 << (j * VBITS)))
            new = new + (tl.dot(tl.trans(cj), w16, accs[j] * alpha[None, :]),)
        accs = new
        m_i = m_new
    zsum = tl.sum(zacc, axis=0)
    for j in tl.static_range(VNP):
        o = tl.trans(accs[j] * (1.0 / (C0 * (1 << (j * VBITS)))) + zsum[None, :])      # [G_PAD, VCB]
        _store_partial(o, m_i, l_i, b, qh, split, num_splits, out_ptr, po_ptr, pml_ptr, stride_ob, stride_oh,
                       j * VCB + offs_vc, gmask, HKV, G, D, SPLIT, j == VNP - 1)


@triton.jit
def _varlen_kernel(q_ptr, cache_ptr, meta_ptr, bt_ptr, qsl_ptr, lens_ptr, out_ptr, sm_scale,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_btb, stride_cblk, stride_ckv, stride_ch,
                   HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, KBITS: tl.constexpr,
                   KCB: tl.constexpr, VBITS: tl.constexpr, VCB: tl.constexpr, KLB: tl.constexpr, KPW: tl.constexpr,
                   META: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr):
    """Causal attention of a varlen batch (decode rows and prefill chunks mixed) over a paged cache.

    Grid ``(num_seqs * HKV, query tiles)``: a program takes BLOCK_Q query tokens of one sequence and
    the G query heads of one KV head, ``M = BLOCK_Q * G`` rows (row = token * G + head). Sequence s
    owns tokens ``qsl[s] .. qsl[s+1]-1`` of q, at positions ``seq_len - q_len ..``; every key
    position ``<=`` a token's own is read from the cache, its own chunk included (stored before
    this call). Keys and values as :func:`_decode_planes_kernel` (planes, the scale and zero of K
    factored out, V's scale in the weights with centred codes) in the usual orientation, queries
    as rows; keys at KBITS (KCB code bytes), values at VBITS (VCB); 16 bits: the float16/bfloat16
    cache of codec none (KCB = VCB = D). No splits: a program loops over its whole causal range.
    """
    QUANT: tl.constexpr = KBITS != 16
    KNP: tl.constexpr = 8 // KLB if QUANT else 1
    VNP: tl.constexpr = 8 // VBITS if QUANT else 1
    M: tl.constexpr = BLOCK_Q * G
    pid = tl.program_id(0)
    qtile = tl.program_id(1)
    s = pid // HKV
    h = pid % HKV
    q0 = tl.load(qsl_ptr + s)
    q_len = tl.load(qsl_ptr + s + 1) - q0
    if qtile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(lens_ptr + s).to(tl.int32)
    ctx = seq_len - q_len
    offs_r = tl.arange(0, M)
    tok = qtile * BLOCK_Q + offs_r // G                  # token within the sequence's chunk
    rmask = tok < q_len
    pos = ctx + tok                                      # its position
    qh = h * G + offs_r % G
    offs_kc = tl.arange(0, KPW)
    offs_vc = tl.arange(0, VCB)
    q_row = q_ptr + (q0 + tok).to(tl.int64)[:, None] * stride_qt + qh[:, None] * stride_qh + offs_kc[None, :]
    if QUANT:
        qs, qsum = _key_queries(q_row, rmask[:, None], sm_scale, tl.zeros([M], tl.float32), 1, KLB, KPW)
    else:
        qs = ((tl.load(q_row, mask=rmask[:, None], other=0.0).to(tl.float32)
               * (sm_scale * 1.4426950408889634)).to(tl.float16),)
    accs = ()
    for j in tl.static_range(VNP):
        accs = accs + (tl.zeros([M, VCB], tl.float32),)
    zacc = tl.zeros([M], tl.float32)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    bt_row = bt_ptr + s.to(tl.int64) * stride_btb
    head_off = h.to(tl.int64) * stride_ch
    end = tl.minimum(seq_len, ctx + (qtile + 1) * BLOCK_Q)   # the tile's last token sees up to here
    for n0 in range(0, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        blk = tl.load(bt_row + offs_n // BS, mask=nmask, other=0).to(tl.int64)
        row = blk * stride_cblk + head_off
        off = offs_n % BS
        see = (offs_n[None, :] <= pos[:, None]) & nmask[None, :]
        if not QUANT:
            kp = cache_ptr + (row + off * D)[:, None] + offs_kc[None, :]
            k = tl.load(kp, mask=nmask[:, None], other=0.0)
            v = tl.load(kp + stride_ckv, mask=nmask[:, None], other=0.0)
            sc = tl.dot(qs[0], tl.trans(k.to(tl.float16)))
        else:
            kpl, vx, ks, kz, vs, vz = _quant_tile(cache_ptr, meta_ptr, row, off, nmask, stride_ckv, offs_kc, offs_vc,
                                                  BS, KCB, VCB, KBITS, VBITS, KPW, META, ASM)
            sc = tl.zeros([M, BLOCK_N], tl.float32)
            for j in tl.static_range(KNP):
                sc = tl.dot(qs[j], tl.trans(kpl[j] - 1024.0), sc)
            sc = sc * ks[None, :] + qsum[:, None] * kz[None, :]
        sc = tl.where(see, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)     # a padded row sees nothing
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        new = ()
        if not QUANT:
            new = (tl.dot(p.to(tl.float16), v.to(tl.float16), accs[0] * alpha[:, None]),)
        else:
            C0: tl.constexpr = 1 << (VBITS - 1)
            w16 = (p * (vs * C0)[None, :]).to(tl.float16)
            zacc = zacc * alpha + tl.sum(p * (vz + C0 * vs)[None, :], axis=1)
            vpl = _planes(vx, VBITS, ASM, False)
            for j in tl.static_range(VNP):
                cj = vpl[j] - (1024.0 + C0 * (1 << (j * VBITS)))
                new = new + (tl.dot(w16, cj, accs[j] * alpha[:, None]),)
        accs = new
        m_i = m_new
    out_row = out_ptr + (q0 + tok).to(tl.int64)[:, None] * stride_ot + qh[:, None] * stride_oh + offs_vc[None, :]
    norm = tl.where(l_i > 0, l_i, 1.0)
    for j in tl.static_range(VNP):
        if not QUANT:
            o = accs[j]
        else:
            o = accs[j] * (1.0 / ((1 << (VBITS - 1)) * (1 << (j * VBITS)))) + zacc[:, None]
        tl.store(out_row + j * VCB, (o / norm[:, None]).to(out_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _dequant_role(cache_ptr, meta_ptr, dst, row, off, tmask, out_row, BS: tl.constexpr, D: tl.constexpr,
                  BITS: tl.constexpr, LB: tl.constexpr, CB: tl.constexpr, META: tl.constexpr):
    """One role's tile of :func:`_dequant_kernel`: ``row`` its (block, head) row, ``CB`` its code
    bytes, ``LB`` the bits of its first packed part (3 bits: the 2-bit part's planes, then the high bit)."""
    if BITS == 16:
        offs_d = tl.arange(0, D)
        x = tl.load(cache_ptr + (row + off * D)[:, None] + offs_d[None, :], mask=tmask[:, None], other=0.0)
        tl.store(dst + out_row + offs_d[None, :], x.to(dst.dtype.element_ty), mask=tmask[:, None])
    else:
        scale, zero = _meta(meta_ptr, row, off, tmask, BS, CB, BITS, META)
        PW: tl.constexpr = D * LB // 8
        offs_c = tl.arange(0, PW)
        at = cache_ptr + (row + off * CB)[:, None]
        codes = tl.load(at + offs_c[None, :], mask=tmask[:, None], other=0).to(tl.int32)
        if BITS == 3:
            high = tl.load(at + PW + (offs_c % (PW // 2))[None, :], mask=tmask[:, None], other=0).to(tl.int32)
        for j in tl.static_range(8 // LB):
            c = (codes >> (j * LB)) & ((1 << LB) - 1)
            if BITS == 3:
                c = c | (((high >> (2 * j + (offs_c >= PW // 2).to(tl.int32))[None, :]) & 1) << 2)
            x = c.to(tl.float32) * scale[:, None] + zero[:, None]
            tl.store(dst + out_row + j * PW + offs_c[None, :], x.to(dst.dtype.element_ty), mask=tmask[:, None])


@triton.jit
def _dequant_kernel(cache_ptr, meta_ptr, bt_ptr, lens_ptr, cu_ptr, k_ptr, v_ptr,
                    stride_btb, stride_cblk, stride_ckv, stride_ch, stride_ot, stride_oh,
                    HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, KBITS: tl.constexpr, KCB: tl.constexpr,
                    VBITS: tl.constexpr, VCB: tl.constexpr, KLB: tl.constexpr, KPW: tl.constexpr, META: tl.constexpr,
                    BLOCK_T: tl.constexpr):
    """Decoded K and V of sequences' first ``seq_len`` slots, packed: sequence s's token t goes to
    row ``cu[s] + t`` of ``k``/``v`` ``[rows, HKV, D]`` (their dtype). Grid ``(num_seqs, tiles of
    BLOCK_T tokens, HKV)``. Values as the core codec decodes them, ``code * scale + zero`` in float32,
    then rounded once to the output dtype; 16 bits copies the ``none`` cache."""
    s = tl.program_id(0)
    t0 = tl.program_id(1) * BLOCK_T
    h = tl.program_id(2)
    length = tl.load(lens_ptr + s).to(tl.int32)
    if t0 >= length:
        return
    base = tl.load(cu_ptr + s).to(tl.int64)
    offs_t = t0 + tl.arange(0, BLOCK_T)
    tmask = offs_t < length
    blk = tl.load(bt_ptr + s.to(tl.int64) * stride_btb + offs_t // BS, mask=tmask, other=0).to(tl.int64)
    row = blk * stride_cblk + h.to(tl.int64) * stride_ch
    off = offs_t % BS
    out_row = (base + offs_t).to(tl.int64)[:, None] * stride_ot + h * stride_oh
    _dequant_role(cache_ptr, meta_ptr, k_ptr, row, off, tmask, out_row, BS, D, KBITS, KLB, KCB, META)
    _dequant_role(cache_ptr, meta_ptr, v_ptr, row + stride_ckv, off, tmask, out_row, BS, D, VBITS, VBITS, VCB, META)


@triton.jit
def _gather_rows_kernel(src_ptr, idx_ptr, out_ptr, k, w, stride_sr, stride_ss, stride_ir, stride_or, stride_ok,
                        BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr):
    """One program per (row, block of BLOCK_K indices): ``out[r, j, :] = src[r, idx[r, j], :]``.
    ``src`` may be pinned host memory (read through unified addressing over the bus)."""
    r = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs_k < k
    rows = tl.load(idx_ptr + r * stride_ir + offs_k, mask=kmask, other=0).to(tl.int64)
    for w0 in range(0, w, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        m = kmask[:, None] & (offs_w[None, :] < w)
        x = tl.load(src_ptr + r.to(tl.int64) * stride_sr + rows[:, None] * stride_ss + offs_w[None, :], mask=m)
        tl.store(out_ptr + r.to(tl.int64) * stride_or + offs_k[:, None] * stride_ok + offs_w[None, :], x, mask=m)


@triton.jit
def _token_rows_kernel(rows_ptr, cache_ptr, host_idx_ptr, slot_ptr, bt_ptr, seg_ptr, n, num_heads, width,
                       stride_rs, stride_rr, stride_ir, stride_pr, stride_bb, stride_c0, stride_c2, BS: tl.constexpr,
                       NSEG: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, TO_PAGES: tl.constexpr):
    """One program per ((sequence, head) row r, block of BLOCK_K tokens j < n): token row
    ``rows[host_idx[r, j], r]`` <-> the token at slot ``slots[r, j]`` of sequence ``r // H``'s
    block table, head ``r % H`` (bytes; ``seg`` int64 [NSEG, 4] as
    ``PagedLayout.token_row_segments``). A token row is read or written whole (``width`` bytes in
    one contiguous access: ``rows`` may be pinned host memory, where small accesses waste the bus);
    each byte's place in the page comes from the segment it falls in."""
    r = tl.program_id(0)
    b = r // num_heads
    h = r % num_heads
    offs_j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    jmask = offs_j < n
    t = tl.load(host_idx_ptr + r * stride_ir + offs_j, mask=jmask, other=0).to(tl.int64)
    slot = tl.load(slot_ptr + r * stride_pr + offs_j, mask=jmask, other=0)
    block = tl.load(bt_ptr + b * stride_bb + slot // BS, mask=jmask, other=0).to(tl.int64)
    offs_l = tl.arange(0, BLOCK_R)
    base = tl.zeros([BLOCK_R], dtype=tl.int64)
    step = tl.zeros([BLOCK_R], dtype=tl.int64)
    for s in tl.static_range(NSEG):  # byte l of the row -> (offset in the block-head, bytes per slot)
        src_off = tl.load(seg_ptr + s * 4)
        length = tl.load(seg_ptr + s * 4 + 1)
        inside = (offs_l >= src_off) & (offs_l < src_off + length)
        base = tl.where(inside, tl.load(seg_ptr + s * 4 + 2) + offs_l - src_off, base)
        step = tl.where(inside, tl.load(seg_ptr + s * 4 + 3), step)
    m = jmask[:, None] & (offs_l[None, :] < width)
    at_row = rows_ptr + t[:, None] * stride_rs + r.to(tl.int64) * stride_rr + offs_l[None, :]
    at_page = (cache_ptr + block[:, None] * stride_c0 + h.to(tl.int64) * stride_c2 + base[None, :]
               + (slot % BS).to(tl.int64)[:, None] * step[None, :])
    if TO_PAGES:
        tl.store(at_page, tl.load(at_row, mask=m), mask=m)
    else:
        tl.store(at_row, tl.load(at_page, mask=m), mask=m)
