"""Plain-PyTorch references of the paged kernels (float32 by default), built on the core codecs."""

from __future__ import annotations

import torch

from kvplug import quant
from kvplug.codecs.integer import BY_BITS

from .layout import PagedLayout


def _per_head(x: torch.Tensor, b: int, h: int) -> torch.Tensor:
    x = x.long()
    return x[:, None].expand(b, h) if x.dim() == 1 else x


def _slots(slot_mapping: torch.Tensor, num_tokens: int, heads: int) -> torch.Tensor:
    s = slot_mapping.long()
    if s.dim() == 1:
        s = s[:, None].expand(num_tokens, heads)
    if tuple(s.shape) != (num_tokens, heads):
        raise ValueError(f"slot_mapping must be [num_tokens] or [num_tokens, num_kv_heads], got {tuple(slot_mapping.shape)}")
    return s


def store_kv_reference(k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                       slot_mapping: torch.Tensor, layout: PagedLayout) -> None:
    """Quantize ``k``, ``v`` (``[tokens, kv_heads, head_dim]``) with the core codec and write them
    in place into ``cache`` at ``slot_mapping`` (``[tokens]`` or ``[tokens, kv_heads]``; -1 skips)."""
    layout.check(cache)
    t, h, d = k.shape
    slots = _slots(slot_mapping, t, h)
    keep = slots >= 0
    tok, head = keep.nonzero(as_tuple=True)
    s = slots[tok, head]
    blk, off = s // layout.block_size, s % layout.block_size
    for kv, x in ((0, k), (1, v)):
        x = x[tok, head]                                   # [n, D]
        if not layout.quantized:
            cache[blk, kv, head, off] = x.to(cache.dtype)
            continue
        # per token, unrotated: the bytes the kernels read
        codec = BY_BITS[layout.role_bits(kv)](clip=layout.role_clip(kv), symmetric=layout.symmetric)
        enc = codec.encode(x, "key" if kv == 0 else "value")
        layout.role_codes(cache, kv)[blk, head, off] = enc["codes"]
        layout.role_meta(cache, kv)[blk, head, off] = torch.cat([enc[f] for f in ("scale", "zero") if f in enc], -1)


def _decode(layout: PagedLayout, role: int, codes: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """float32 values of packed ``codes`` ``[..., code_bytes]`` with their ``meta`` ``[..., 1 or 2]``."""
    bits = layout.role_bits(role)
    c = quant.unpack(codes, bits)
    if layout.symmetric:
        return quant.symmetric_decode(c, meta[..., :1], bits)
    return quant.affine_decode(c, meta[..., :1], meta[..., 1:])


def gather_kv(cache: torch.Tensor, layout: PagedLayout, block_tables: torch.Tensor, max_len: int,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized K and V, ``[batch, kv_heads, max_len, head_dim]`` in ``dtype``, of the first
    ``max_len`` slots of each sequence's blocks."""
    bs = layout.block_size
    t = torch.arange(max_len, device=cache.device)
    blk = block_tables.long()[:, t // bs]                 # [B, L]
    off = (t % bs)[None, :].expand_as(blk)
    out = []
    for kv in (0, 1):
        if layout.quantized:
            codes = layout.role_codes(cache, kv)           # [NB, H, BS, CB]
            meta = layout.role_meta(cache, kv)             # [NB, H, BS, 2]
            c = codes[blk, :, off].permute(0, 2, 1, 3)     # [B, H, L, CB]
            m = meta[blk, :, off].permute(0, 2, 1, 3)      # [B, H, L, 2]
            x = _decode(layout, kv, c, m)
        else:
            x = cache[:, kv][blk, :, off].permute(0, 2, 1, 3)
        out.append(x.to(dtype))
    return out[0], out[1]


def decode_attention_reference(q: torch.Tensor, cache: torch.Tensor, layout: PagedLayout,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor,
                               sm_scale: float | None = None,
                               compute_dtype: torch.dtype = torch.float32,
                               held: torch.Tensor | None = None, return_lse: bool = False,
                               tail: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                               logits: torch.Tensor | None = None):
    """Attention of one query token per sequence over its dequantized paged K/V.

    q ``[batch, q_heads, head_dim]``; ``seq_lens`` ``[batch]`` or ``[batch, kv_heads]``; ``held``
    (optional, ``[..., 3]`` of ``(start, front, window)``) as :func:`kvplug.triton_ops.decode_attention`.
    Returns ``[batch, q_heads, head_dim]`` in ``compute_dtype``; a head with nothing to read gives zeros.
    ``return_lse``: also the natural log-sum-exp of each query head's logits, ``[batch, q_heads]``
    (-inf where nothing is read), as ``(out, lse)``. ``tail``: ``(keys, values, counts)``, dense
    tokens attended besides the paged ones, as :func:`kvplug.triton_ops.decode_attention` takes them.
    ``logits`` (``[batch, q_heads, W]``): entry ``i`` receives the scaled logit of the paged token
    read ``i``-th (the front run, then the window), for ``i < W``, as the kernel's ``logits``;
    other entries are left as they are.
    """
    layout.check(cache)
    b, hq, d = q.shape
    h = layout.num_kv_heads
    g = hq // h
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale
    lens = _per_head(seq_lens, b, h)
    max_len = int(lens.max()) if lens.numel() else 0
    if max_len == 0 and tail is None:
        out = torch.zeros(b, hq, d, dtype=compute_dtype, device=q.device)
        return (out, torch.full((b, hq), float("-inf"), dtype=compute_dtype, device=q.device)) if return_lse else out
    k, v = gather_kv(cache, layout, block_tables, max_len, compute_dtype)   # [B, H, L, D]
    pos = torch.arange(max_len, device=q.device)[None, None, :]
    valid = pos < lens[:, :, None]                          # [B, H, L]
    if held is not None:
        start, front, window = (_per_head(held[..., i], b, h)[:, :, None] for i in range(3))
        recent = torch.maximum(lens[:, :, None] - window, start + front)
        valid &= ((pos >= start) & (pos < start + front)) | (pos >= recent)
    if tail is not None:                                    # dense tokens besides the pages
        tk, tv, tn = tail
        n = tk.shape[2]
        k, v = torch.cat([k, tk.to(compute_dtype)], 2), torch.cat([v, tv.to(compute_dtype)], 2)
        held_rows = torch.arange(n, device=q.device)[None, None, :] < _per_head(tn, b, h)[:, :, None]
        valid = torch.cat([valid, held_rows], 2)
    k = k.masked_fill(~valid[..., None], 0.0)              # slots past a head's length: never read
    v = v.masked_fill(~valid[..., None], 0.0)
    qf = q.to(compute_dtype).view(b, h, g, d)
    s = torch.einsum("bhgd,bhld->bhgl", qf, k) * sm_scale
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    if logits is not None:
        paged, w = valid[..., :max_len], logits.shape[2]
        order = paged.cumsum(-1) - 1                        # read order of the paged tokens
        bi, hi, li = (paged & (order < w)).nonzero(as_tuple=True)
        logits.view(b, h, g, w)[bi, hi, :, order[bi, hi, li]] = s[bi, hi, :, li].to(logits.dtype)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)           # all -inf rows (length 0) -> 0
    o = torch.einsum("bhgl,bhld->bhgd", p, v).reshape(b, hq, d)
    return (o, torch.logsumexp(s, dim=-1).reshape(b, hq)) if return_lse else o


def paged_attention_reference(q: torch.Tensor, cache: torch.Tensor, layout: PagedLayout,
                              block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                              seq_lens: torch.Tensor, sm_scale: float | None = None,
                              compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Causal attention of a varlen batch over its dequantized paged K/V, sequence by sequence.

    q ``[tokens, q_heads, head_dim]``: sequence s owns rows ``query_start_loc[s] ..
    query_start_loc[s+1] - 1``, at positions ``seq_lens[s] - q_len ..``; each attends to the
    cache's positions up to its own. Returns ``[tokens, q_heads, head_dim]`` in ``compute_dtype``.
    """
    layout.check(cache)
    t, hq, d = q.shape
    h = layout.num_kv_heads
    g = hq // h
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale
    out = torch.zeros(t, hq, d, dtype=compute_dtype, device=q.device)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for s, length in enumerate(lens):
        a, b = starts[s], starts[s + 1]
        if b == a:
            continue
        k, v = gather_kv(cache, layout, block_tables[s:s + 1], length, compute_dtype)   # [1, H, L, D]
        qs = q[a:b].to(compute_dtype).view(b - a, h, g, d)
        sc = torch.einsum("nhgd,hld->nhgl", qs, k[0]) * sm_scale
        pos = torch.arange(length - (b - a), length, device=q.device)
        sees = torch.arange(length, device=q.device)[None, :] <= pos[:, None]          # [n, L]
        p = torch.softmax(sc.masked_fill(~sees[:, None, None, :], float("-inf")), dim=-1)
        out[a:b] = torch.einsum("nhgl,hld->nhgd", p, v[0]).reshape(b - a, hq, d)
    return out


def dequantize_kv_reference(cache: torch.Tensor, layout: PagedLayout, block_tables: torch.Tensor,
                            seq_lens: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoded K and V of each sequence's first ``seq_lens[s]`` slots, concatenated:
    ``[sum(seq_lens), kv_heads, head_dim]`` in ``dtype`` (:func:`gather_kv`, sequence by sequence)."""
    ks, vs = [], []
    for s, length in enumerate(seq_lens.tolist()):
        if length == 0:
            continue
        k, v = gather_kv(cache, layout, block_tables[s:s + 1], length, dtype)       # [1, H, L, D]
        ks.append(k[0].transpose(0, 1))
        vs.append(v[0].transpose(0, 1))
    h, d = layout.num_kv_heads, layout.head_dim
    empty = torch.zeros(0, h, d, dtype=dtype, device=cache.device)
    return torch.cat(ks or [empty]), torch.cat(vs or [empty])


def gather_rows_reference(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``gather_rows`` in PyTorch, on ``src``'s device: ``out[r, j] = src[r, index[r, j]]``."""
    return src.gather(1, index.to(src.device).long()[..., None].expand(-1, -1, src.shape[-1]))


def copy_token_rows_reference(rows: torch.Tensor, cache: torch.Tensor, layout: PagedLayout,
                              block_tables: torch.Tensor, host_index: torch.Tensor, page_slots: torch.Tensor, *,
                              to_pages: bool) -> None:
    """``copy_token_rows`` in PyTorch (rows on any device; moved through ``cache``'s)."""
    layout.check(cache)
    b, h, n = host_index.shape
    if n == 0:
        return
    bs = layout.block_size
    item = layout.storage_dtype.itemsize
    s0, _, s2 = (x * item for x in layout.strides())
    pages = cache.view(torch.uint8).reshape(-1)
    slot = page_slots.long().to(cache.device)  # [B, H, n]
    tables = block_tables.long().to(cache.device)
    block = tables.gather(1, (slot // bs).reshape(b, h * n)).view(b, h, n)
    head = torch.arange(h, device=cache.device)
    at = block * s0 + head[None, :, None] * s2  # [B, H, n]
    t = host_index.long().to(rows.device)
    flat_rows = rows.reshape(rows.shape[0], b * h, -1)
    r = torch.arange(b * h, device=rows.device).view(b, h, 1).expand(b, h, n)
    for src_off, length, base, step in layout.token_row_segments():
        span = torch.arange(length, device=cache.device)
        where = (at + base + (slot % bs) * step)[..., None] + span  # [B, H, n, length]
        if to_pages:
            pages[where] = flat_rows[t, r, src_off:src_off + length].to(cache.device)
        else:
            flat_rows[t, r, src_off:src_off + length] = pages[where].to(rows.device)
