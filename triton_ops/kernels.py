"""Triton kernels of the paged KV cache (imported lazily by :mod:`kvplug.triton_ops`).

* ``_store_kernel``: one program per token; quantizes K and V of all its KV heads (float32 math,
  exact division, as :mod:`kvplug.quant`) and writes codes + (scale, zero) at each head's slot.
* ``_decode_kernel``: one program per (sequence, KV head, split); the ``G`` query heads of a KV
  head share every K/V tile (GQA). Codes are read as int32 words (16-byte loads) and unpacked with
  word-wide mask/or operations into float16 bit patterns ``0x6400 | code`` (= 1024 + code, exact;
  no int->float conversions, two codes per instruction); the positions come out in a fixed
  permutation of head_dim, which q and the output follow (``_spread`` with MODE 1 gives it).
  K's scale and zero are factored out of the dot, ``q.k = s_k (q.c_k) + z_k sum(q)`` (exact
  float16 codes, float32 accumulation); V is dequantized to float16 in registers,
  ``c_v * s_v + z_v``, before ``p @ v``. Online softmax in base 2; partial results per split,
  merged by ``_reduce_kernel``.
  Queries are multiplied by the softmax scale and rounded to float16 for the tensor cores (a
  bfloat16 model's q beyond +-65504 / scale would overflow).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _quantize_store(x_ptr, stride_xt, stride_xh, t, offs_h, offs_d, ok, base, off, cache_ptr, meta_ptr,
                    meta_base, BITS: tl.constexpr, D: tl.constexpr, CB: tl.constexpr,
                    H_PAD: tl.constexpr):
    x = tl.load(x_ptr + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :],
                mask=ok[:, None], other=0.0)
    if BITS == 16:
        tl.store(cache_ptr + base[:, None] + off[:, None] * D + offs_d[None, :],
                 x.to(cache_ptr.dtype.element_ty), mask=ok[:, None])
    else:
        QMAX: tl.constexpr = (1 << BITS) - 1
        xf = x.to(tl.float32)
        lo = tl.min(xf, axis=1)
        hi = tl.max(xf, axis=1)
        scale = tl.math.div_rn(hi - lo, tl.full(lo.shape, QMAX, tl.float32)).to(tl.float16)
        scale = tl.where(scale == 0, 1.0, scale).to(tl.float16)
        zero = lo.to(tl.float16)
        q = tl.math.div_rn(xf - zero.to(tl.float32)[:, None],
                           tl.broadcast_to(scale.to(tl.float32)[:, None], xf.shape))
        q = tl.floor(q + 0.5)
        q = tl.minimum(tl.maximum(q, 0.0), QMAX).to(tl.int32)
        if BITS == 8:
            packed = q
        else:
            P: tl.constexpr = 8 // BITS
            q3 = tl.reshape(q, [H_PAD, P, CB])
            shifts = tl.arange(0, P) * BITS
            packed = tl.sum(q3 << shifts[None, :, None], axis=1)
        offs_c = tl.arange(0, CB)
        tl.store(cache_ptr + base[:, None] + off[:, None] * CB + offs_c[None, :],
                 packed.to(tl.uint8), mask=ok[:, None])
        mp = meta_ptr + meta_base + off * 2
        tl.store(mp, scale, mask=ok)
        tl.store(mp + 1, zero, mask=ok)


@triton.jit
def _store_kernel(k_ptr, v_ptr, slot_ptr, cache_ptr, meta_ptr,
                  stride_kt, stride_kh, stride_vt, stride_vh, stride_st, stride_sh,
                  stride_cblk, stride_ckv, stride_ch,
                  H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                  BITS: tl.constexpr, CB: tl.constexpr):
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
    meta_base = base // 2 + (BS * CB) // 2                  # float16 elements
    _quantize_store(k_ptr, stride_kt, stride_kh, t, offs_h, offs_d, ok, base, off, cache_ptr, meta_ptr,
                    meta_base, BITS, D, CB, H_PAD)
    _quantize_store(v_ptr, stride_vt, stride_vh, t, offs_h, offs_d, ok, base + stride_ckv, off, cache_ptr,
                    meta_ptr, meta_base + stride_ckv // 2, BITS, D, CB, H_PAD)


@triton.jit
def _piece(w, S: tl.constexpr, HF: tl.constexpr, BITS: tl.constexpr, CB: tl.constexpr,
           INDEX: tl.constexpr):
    """Half HF (low/high 16 bits) of ``((w >> S) & mask) | 0x64006400``: the code at bit
    ``S + 16 * HF`` of each int32 word as the float16 bit pattern ``0x6400 | code`` (= 1024 + code),
    int16; with INDEX (``w`` holds word numbers), that code's element index along head_dim under
    the planar packing."""
    if INDEX:
        POS: tl.constexpr = S + 16 * HF
        return w * 4 + (POS // 8) + ((POS % 8) // BITS) * CB
    else:
        MASK: tl.constexpr = ((1 << BITS) - 1) * 0x10001
        if S == 0:
            r = (w & MASK) | 0x64006400
        else:
            r = ((w >> S) & MASK) | 0x64006400    # both halves at once: the two int16s are r itself
        if HF == 0:
            return r.to(tl.int16)
        else:
            return (r >> 16).to(tl.int16)


@triton.jit
def _half(w, HF: tl.constexpr, BITS: tl.constexpr, CB: tl.constexpr, INDEX: tl.constexpr):
    """One half of every word at each of its 16 / BITS shifts: ``[N, W, 16 / BITS]``."""
    if BITS == 8:
        e = tl.join(_piece(w, 0, HF, BITS, CB, INDEX), _piece(w, 8, HF, BITS, CB, INDEX))
    elif BITS == 4:
        e = tl.join(tl.join(_piece(w, 0, HF, BITS, CB, INDEX), _piece(w, 4, HF, BITS, CB, INDEX)),
                    tl.join(_piece(w, 8, HF, BITS, CB, INDEX), _piece(w, 12, HF, BITS, CB, INDEX)))
    else:
        e = tl.join(tl.join(tl.join(_piece(w, 0, HF, BITS, CB, INDEX), _piece(w, 2, HF, BITS, CB, INDEX)),
                            tl.join(_piece(w, 4, HF, BITS, CB, INDEX), _piece(w, 6, HF, BITS, CB, INDEX))),
                    tl.join(tl.join(_piece(w, 8, HF, BITS, CB, INDEX), _piece(w, 10, HF, BITS, CB, INDEX)),
                            tl.join(_piece(w, 12, HF, BITS, CB, INDEX), _piece(w, 14, HF, BITS, CB, INDEX))))
    return e


@triton.jit
def _spread(w, BITS: tl.constexpr, CB: tl.constexpr, INDEX: tl.constexpr):
    """All 32 / BITS codes of each word of ``w`` ``[N, W]`` -> ``[N, W * 32 / BITS]``, in a fixed
    permutation of head_dim where the two halves of a shifted word stay adjacent (one half2
    register, no shuffles); the same call with INDEX gives the element index of each position."""
    e = tl.join(_half(w, 0, BITS, CB, INDEX), _half(w, 1, BITS, CB, INDEX))
    return tl.reshape(e, [w.shape[0], w.shape[1] * (32 // BITS)])


@triton.jit
def _codes_f16(w, BITS: tl.constexpr, CB: tl.constexpr):
    """int32 code words ``[N, W]`` -> the codes as exact float16 ``[N, D]`` (:func:`_spread` order)."""
    return _spread(w, BITS, CB, False).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def _decode_kernel(q_ptr, cache_ptr, words_ptr, meta_ptr, bt_ptr, lens_ptr, held_ptr, out_ptr, po_ptr, pml_ptr,
                   sm_scale, num_splits,
                   stride_qb, stride_qh, stride_ob, stride_oh, stride_btb, stride_lb, stride_lh,
                   stride_hb, stride_hh, stride_cblk, stride_ckv, stride_ch,
                   HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                   BS: tl.constexpr, BITS: tl.constexpr, CB: tl.constexpr, BLOCK_N: tl.constexpr,
                   SPLIT: tl.constexpr, HELD: tl.constexpr):
    """stride_c*: strides of the cache in storage elements; for a quantized cache (uint8) they are
    bytes, and the code words (int32) and metadata (float16) are read through views of it.
    With HELD a (sequence, head) reads slots ``[start, start + front)`` and its last ``window``
    slots (eviction's kept tokens): the loop runs over their count, ``i`` -> slot ``start + i``
    in the front run, ``recent + i - front`` after it."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    seq_len = tl.load(lens_ptr + b * stride_lb + h * stride_lh)
    if HELD:
        hp = held_ptr + b * stride_hb + h * stride_hh
        first = tl.load(hp)
        front_end = tl.load(hp + 1) + first
        n_front = tl.maximum(tl.minimum(front_end, seq_len) - first, 0)
        recent = tl.maximum(seq_len - tl.load(hp + 2), front_end)
        count = n_front + tl.maximum(seq_len - recent, 0)
    else:
        count = seq_len
    chunk = tl.cdiv(tl.cdiv(count, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, count)

    offs_g = tl.arange(0, G_PAD)
    gmask = offs_g < G
    if BITS == 16:
        offs_d = tl.arange(0, D)[None, :]
    else:
        W: tl.constexpr = CB // 4
        offs_w = tl.arange(0, W)
        offs_d = _spread(offs_w[None, :], BITS, CB, True)        # [1, D]: element of each position
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d,
                mask=gmask[:, None], other=0.0)
    if BITS == 16:
        qd = q
        s_mul = sm_scale * 1.4426950408889634
    else:
        qd = (q.to(tl.float32) * sm_scale).to(tl.float16)
        qsum = tl.sum(qd.to(tl.float32), axis=1)
        offs_m = tl.arange(0, 2)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    head_off = h.to(tl.int64) * stride_ch
    for n0 in range(start, end, BLOCK_N):
        offs_i = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_i < end
        if HELD:
            offs_n = tl.where(offs_i < n_front, first + offs_i, recent + offs_i - n_front)
        else:
            offs_n = offs_i
        blk = tl.load(bt_row + offs_n // BS, mask=nmask, other=0).to(tl.int64)
        row = blk * stride_cblk + head_off
        off = offs_n % BS
        if BITS == 16:
            kp = cache_ptr + (row + off * D)[:, None] + offs_d
            k = tl.load(kp, mask=nmask[:, None], other=0.0)
            v = tl.load(kp + stride_ckv, mask=nmask[:, None], other=0.0)
            s = tl.dot(qd, tl.trans(k)) * s_mul
        else:
            kp = words_ptr + (row // 4 + off * W)[:, None] + offs_w[None, :]
            kw = tl.load(kp, mask=nmask[:, None], other=0)
            vw = tl.load(kp + stride_ckv // 4, mask=nmask[:, None], other=0)
            mp = meta_ptr + (row // 2 + (BS * CB) // 2 + off * 2)[:, None] + offs_m[None, :]
            ks, kz = tl.split(tl.load(mp, mask=nmask[:, None], other=0.0).to(tl.float32))
            vs, vz = tl.split(tl.load(mp + stride_ckv // 2, mask=nmask[:, None], other=0.0))
            s = (tl.dot(qd, tl.trans(_codes_f16(kw, BITS, CB))) * ks[None, :]
                 + qsum[:, None] * kz[None, :]) * 1.4426950408889634
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if BITS == 16:
            acc += tl.dot(p.to(v.dtype), v)
        else:
            # V dequantized to float16 in registers (one rounding, as an fp16 cache would hold it).
            # Folding the scale into p instead (p * s_v) loses it: p * s_v underflows float16 and
            # the zero-point sum then cancels against the dot (seen on the H100, not on the CPU).
            v16 = _codes_f16(vw, BITS, CB) * vs[:, None] + vz[:, None]
            acc += tl.dot(p.to(tl.float16), v16)
        m_i = m_new

    qh = h * G + offs_g
    if not SPLIT:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + qh[:, None] * stride_oh + offs_d,
                 o.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
    else:
        part = (b.to(tl.int64) * (HKV * G) + qh) * num_splits + split      # [G_PAD]
        tl.store(po_ptr + part[:, None] * D + offs_d, acc, mask=gmask[:, None])
        tl.store(pml_ptr + part * 2, m_i, mask=gmask)
        tl.store(pml_ptr + part * 2 + 1, l_i, mask=gmask)


@triton.jit
def _reduce_kernel(po_ptr, pml_ptr, out_ptr, num_splits, stride_ob, stride_oh,
                   HQ: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr):
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
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    l_tot = tl.sum(w * l, axis=0)
    o = tl.load(po_ptr + part[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0)
    num = tl.sum(o * w[:, None], axis=0)
    res = num / tl.where(l_tot > 0, l_tot, 1.0)
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + offs_d, res.to(out_ptr.dtype.element_ty))
