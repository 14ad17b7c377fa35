"""store_kv (Triton, interpreter mode on CPU) against the core codec: bit-exact codes."""

import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from kvplug import quant  # noqa: E402
from kvplug.codecs.integer import Int4  # noqa: E402
from kvplug.triton_ops import PagedLayout, store_kv, store_kv_reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def layout_of(bits, bs, h, d, dtype=torch.float16, clips=(1.0, 1.0)):
    """``bits``: one width for K and V, ``(key bits, value bits)``, or ``(key bits, value bits,
    "sym")`` for the symmetric (scale-only) format; ``clips``: (key, value)."""
    kb, vb, *sym = bits if isinstance(bits, tuple) else (bits, bits)
    return PagedLayout(bs, h, d, kb, dtype, None if vb == kb else vb, False, *clips, symmetric=bool(sym))


def poisoned_cache(layout, num_blocks, gen):
    """A cache of random bytes (NaN scales) where nothing was stored: what is read unwritten shows."""
    cache = layout.allocate(num_blocks, DEV)
    if layout.quantized:
        cache.copy_(torch.randint(0, 256, cache.shape, dtype=torch.uint8, generator=gen))
        for role in (0, 1):
            layout.role_meta(cache, role).fill_(float("nan"))
    else:
        cache.fill_(float("nan"))
    return cache


def _inputs(t, h, d, dtype, gen):
    k = torch.randn(t, h, d, generator=gen) * torch.rand(t, h, 1, generator=gen) * 4
    v = torch.randn(t, h, d, generator=gen) + torch.randn(t, h, 1, generator=gen)
    k[0, 0] = 0.75                         # a constant head: scale rounds to 0 -> stored as 1
    v[1 % t, -1, :5] = 300.0               # an outlier
    return k.to(DEV, dtype), v.to(DEV, dtype)


@pytest.mark.parametrize("bits,d,bs,h,dtype,per_head,clips", [
    (16, 64, 16, 2, torch.float16, False, (1.0, 1.0)),
    (16, 128, 32, 3, torch.bfloat16, True, (1.0, 1.0)),
    (8, 64, 16, 2, torch.float16, False, (1.0, 1.0)),
    (8, 128, 64, 4, torch.bfloat16, True, (1.0, 1.0)),
    (4, 64, 32, 3, torch.float16, True, (1.0, 1.0)),
    (4, 128, 16, 2, torch.bfloat16, False, (1.0, 1.0)),
    (2, 64, 64, 2, torch.bfloat16, False, (1.0, 1.0)),
    (2, 128, 16, 4, torch.float16, True, (1.0, 1.0)),
    ((8, 4), 128, 16, 3, torch.bfloat16, True, (1.0, 1.0)),
    ((4, 2), 64, 32, 2, torch.float16, False, (1.0, 1.0)),
    ((2, 8), 64, 16, 2, torch.float16, True, (1.0, 1.0)),
    (2, 64, 16, 2, torch.bfloat16, False, (0.7, 0.55)),
    (4, 128, 32, 3, torch.float16, True, (0.9, 1.0)),
    ((4, 2), 64, 16, 2, torch.float16, True, (1.0, 0.6)),
    ((8, 2), 128, 16, 2, torch.bfloat16, False, (0.97, 0.8)),
    ((3, 2, "sym"), 64, 16, 2, torch.float16, True, (0.85, 1.0)),
    ((3, 4), 128, 32, 3, torch.bfloat16, False, (1.0, 1.0)),
    ((3, 8), 64, 16, 2, torch.float16, True, (0.9, 1.0)),
    ((8, 2, "sym"), 64, 16, 2, torch.bfloat16, True, (1.0, 0.8)),
    ((4, 4, "sym"), 128, 16, 2, torch.float16, False, (1.0, 1.0)),
])
def test_store_matches_core_codec(bits, d, bs, h, dtype, per_head, clips, gen):
    """Plain and clipped (``clips``: keys, values) formats: the kernel's bytes are the core codec's."""
    layout = layout_of(bits, bs, h, d, dtype, clips)
    nb, t = 6, 37
    cache = poisoned_cache(layout, nb, gen)
    ref = cache.clone()
    k, v = _inputs(t, h, d, dtype, gen)
    if per_head:
        slots = torch.stack([torch.randperm(nb * bs, generator=gen)[:t] for _ in range(h)], 1).int()
        slots[torch.rand(t, h, generator=gen) < 0.2] = -1
    else:
        slots = torch.randperm(nb * bs, generator=gen)[:t].int()
        slots[torch.rand(t, generator=gen) < 0.2] = -1
    slots = slots.to(DEV)
    store_kv(k, v, cache, slots, layout)
    store_kv_reference(k, v, ref, slots, layout)
    # whole tensor: written slots bit-exact, every other byte (the poison) untouched
    assert torch.equal(cache.view(torch.uint8), ref.view(torch.uint8))
    if clips != (1.0, 1.0):  # the clip reached the kernel: unclipped bytes differ
        plain = poisoned_cache(layout_of(bits, bs, h, d, dtype), nb, gen)
        store_kv(k, v, plain, slots, layout_of(bits, bs, h, d, dtype))
        assert not torch.equal(plain.view(torch.uint8), cache.view(torch.uint8))


def test_three_bit_keys_and_symmetric_scales_sit_where_the_layout_says(gen):
    """``mixed(key=3, value=2, symmetric=true)`` counted by hand at head_dim 64, block 16: per
    head a K row of 16 x 24 code bytes (16 bytes of low bits, then 8 of high bits) and 16 float16
    scales, then a V row of 16 x 16 code bytes and 16 scales; element e of a key: low bits at bit
    2 (e // 16) of byte e % 16, high bit at bit e // 8 of byte 16 + e % 8; its value
    ``(code - 3.5) * scale`` from the bytes read back, within half a step of the input."""
    bs, h, d, nb = 16, 2, 64, 3
    layout = layout_of((3, 2, "sym"), bs, h, d)
    assert layout.bytes_per_token() == h * ((24 + 2) + (16 + 2))
    cache = poisoned_cache(layout, nb, gen)
    k, v = _inputs(7, h, d, torch.float16, gen)
    slots = torch.randperm(nb * bs, generator=gen)[:7].to(DEV)
    store_kv(k, v, cache, slots, layout)
    flat = cache.view(-1).cpu().long()
    rk, rv = bs * 26, bs * 18
    for t, slot in enumerate(slots.tolist()):
        b, o = divmod(slot, bs)
        for head in range(h):
            row = (b * h + head) * (rk + rv)
            code = flat[row + o * 24:row + (o + 1) * 24]
            scale = flat[row + bs * 24 + 2 * o:row + bs * 24 + 2 * o + 2].to(torch.uint8).view(torch.float16).double()
            x = k[t, head].cpu().double()
            for e in range(d):
                c = ((code[e % 16] >> (2 * (e // 16))) & 3) | (((code[16 + e % 8] >> (e // 8)) & 1) << 2)
                want = min(7, max(0, int(torch.floor(x[e] / scale + 3.5 + 0.5))))
                assert int(c) == want or abs(float(x[e] / scale + 4.0) - round(float(x[e] / scale + 4.0))) < 1e-3
                assert abs(float((c - 3.5) * scale) - float(x[e])) <= 0.5 * float(scale) + 1e-3 * float(x.abs().max())
            vcode = flat[row + rk + o * 16:row + rk + (o + 1) * 16]
            vscale = flat[row + rk + bs * 16 + 2 * o:row + rk + bs * 16 + 2 * o + 2].to(torch.uint8).view(torch.float16)
            xv = v[t, head].cpu().double()
            for e in range(d):
                c = (vcode[e % 16] >> (2 * (e // 16))) & 3
                assert abs(float((c - 1.5) * vscale.double()) - float(xv[e])) <= 0.5 * float(vscale) * 1.001 + 1e-6


@pytest.mark.parametrize("kbits, vbits", [(8, 4), (4, 2)])
def test_two_widths_sit_where_the_layout_says(kbits, vbits, gen):
    """Head-major rows, counted by hand: block b, head h, offset o has its key codes at byte
    ``(b * H + h) * (rk + rv) + o * kcb`` and its (scale, zero) after the block's codes, its value
    codes ``rk`` further, where ``r = bs * (cb + 4)``; the bytes are the core codec's."""
    from kvplug.codecs.mixed import Mixed

    bs, h, d, nb = 16, 3, 64, 4
    layout = layout_of((kbits, vbits), bs, h, d)
    cache = poisoned_cache(layout, nb, gen)
    k, v = _inputs(9, h, d, torch.float16, gen)
    slots = torch.randperm(nb * bs, generator=gen)[:9].to(DEV)
    store_kv(k, v, cache, slots, layout)
    flat = cache.view(-1).cpu()
    kcb, vcb = d * kbits // 8, d * vbits // 8
    rk, rv = bs * (kcb + 4), bs * (vcb + 4)
    assert layout.page_bytes() == h * (rk + rv)
    codec = Mixed(key=kbits, value=vbits)
    for t, slot in enumerate(slots.tolist()):
        b, o = divmod(slot, bs)
        for head in range(h):
            row = (b * h + head) * (rk + rv)
            for x, role, start, cb in ((k, "key", row, kcb), (v, "value", row + rk, vcb)):
                enc = codec.encode(x[t, head].cpu()[None], role)
                assert torch.equal(flat[start + o * cb:start + (o + 1) * cb], enc["codes"][0]), (t, head, role)
                meta = flat[start + bs * cb + 4 * o:start + bs * cb + 4 * (o + 1)].view(torch.float16)
                assert torch.equal(meta, torch.cat([enc["scale"][0], enc["zero"][0]])), (t, head, role)


def test_store_int4_decodes_close_to_input(gen):
    layout = PagedLayout(16, 2, 128, 4, torch.float16)
    cache = poisoned_cache(layout, 2, gen)
    k, v = _inputs(20, 2, 128, torch.float16, gen)
    slots = torch.arange(20, device=DEV, dtype=torch.int32) + 5
    store_kv(k, v, cache, slots, layout)
    blk, off = (slots // 16).long(), (slots % 16).long()
    codes = layout.codes(cache)[blk, 1, :, off]           # [20, 2, 64]
    meta = layout.meta(cache)[blk, 1, :, off]
    enc = Int4().encode(v, "value")
    assert torch.equal(codes, enc["codes"])
    x = quant.affine_decode(quant.unpack(codes, 4), meta[..., :1], meta[..., 1:])
    err = (x - v.float()).abs() / meta[..., :1].float()
    assert err.max() <= 0.5 + 1e-3                          # at most half a step


def test_layout_sizes():
    for bits in (16, 8, 4, 2):
        lay = PagedLayout(16, 8, 128, bits)
        c = lay.allocate(3)
        assert c.numel() * c.element_size() == 3 * lay.page_bytes()
        if bits != 16:
            assert lay.codes(c).shape == (3, 2, 8, 16, 128 * bits // 8)
            assert lay.scale(c).shape == (3, 2, 8, 16)
            assert lay.bytes_per_token() == 2 * 8 * (128 * bits // 8 + 4)
    assert PagedLayout.for_codec("int4", 16, 8, 128).bits == 4
    mixed = PagedLayout.for_codec("mixed(key=8, value=4, rotate=true)", 16, 8, 128)
    assert (mixed.bits, mixed.vbits, mixed.rotated) == (8, 4, True)
    assert mixed.bytes_per_token() == 8 * ((128 + 4) + (64 + 4))
    with pytest.raises(ValueError, match="no paged kernel layout"):
        PagedLayout.for_codec(Int4(group=32), 16, 8, 128)
    with pytest.raises(ValueError, match="no paged kernel layout"):
        PagedLayout.for_codec("fp8", 16, 8, 128)
    with pytest.raises(ValueError, match="both are quantized or neither"):
        PagedLayout(16, 8, 128, 16, value_bits=4)
    clipped = PagedLayout.for_codec("mixed(key=4, value=2, key_clip=0.9, value_clip=0.6)", 16, 8, 64)
    assert (clipped.key_clip, clipped.value_clip) == (0.9, 0.6)
    assert clipped.bytes_per_token() == PagedLayout.for_codec("mixed(key=4, value=2)", 16, 8, 64).bytes_per_token()
    assert PagedLayout.for_codec("int2(clip=0.7)", 16, 8, 64).role_clip(1) == 0.7
    with pytest.raises(ValueError, match="clip and symmetric apply to quantized layouts only"):
        PagedLayout(16, 8, 128, 16, key_clip=0.5)
    with pytest.raises(ValueError, match=r"value_clip=0.0 must be in \(0, 1\]"):
        PagedLayout(16, 8, 128, 4, value_clip=0.0)


def test_import_kvplug_does_not_import_triton():
    code = ("import sys, kvplug, kvplug.triton_ops; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
