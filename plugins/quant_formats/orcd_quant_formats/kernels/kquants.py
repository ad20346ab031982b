"""Weight tiles of the K-quants Q4_K, Q5_K and Q6_K (layouts in ``..kquants``), fp32 ``(BN, G, L)``.

A tile covers ``G`` sub-blocks of one super-block (``G * L`` divides 256; callers step through whole super-blocks
and rows are whole super-blocks long, so no tile is partial): Q4_K/Q5_K sub-blocks of 32 (``L = 32``), Q6_K
sub-blocks of 16 (``L = 16``). Values follow gguf's float32 operations (``(d*sc)*q - (dmin*m)``, ``(d*sc)*q``), so
tiles are bit-exact with the reference dequantizers.

The ``*_dot`` functions serve decode: for a ``(BN, NB)`` grid of (weight row, unit) pairs, the sum over the unit
(64 values, a quarter of a super-block) of ``w * x`` for one row of ``x``. Codes
are read as uint16 words (every field sits at an even offset) and decoded with ``magic`` (see ``common``) at their
bit positions; sub-block scales (and mins, through the sum of x over the sub-block) are applied once per sub-block:
``sum_i ((d sc) q_i - dmin m) x_i = (d sc) sum_i q_i x_i - (dmin m) sum_i x_i``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from orcd_quant_formats.kernels.common import as_u16, f16_u16, load_bytes, load_f16, load_u16, unmagic, x_at


@triton.jit
def sub_blocks(w_ptr, row_off, k0, TYPE_SIZE: tl.constexpr, SUB: tl.constexpr, G: tl.constexpr):
    """A pointer to each row's super-block ``(BN, 1, 1)`` and the index of each sub-block in it ``(1, G, 1)``."""
    block = w_ptr + row_off[:, None, None] + (k0 // 256) * TYPE_SIZE
    return block, (k0 % 256) // SUB + tl.arange(0, G)[None, :, None]


@triton.jit
def scale_min(block, s):
    """Sub-block ``s``'s 6-bit scale and min from the 12 packed bytes at offset 4 (see ``unpack_scale_min``)."""
    j = s % 4
    a = load_bytes(block + 4 + j)
    b = load_bytes(block + 8 + j)
    c = load_bytes(block + 12 + j)
    low = s < 4
    sc = tl.where(low, a & 63, (c & 15) | ((a >> 6) << 4))
    mn = tl.where(low, b & 63, (c >> 4) | ((b >> 6) << 4))
    return sc, mn


@triton.jit
def scaled_with_min(block, s, q):
    sc, mn = scale_min(block, s)
    dl = load_f16(block) * sc.to(tl.float32)
    ml = load_f16(block + 2) * mn.to(tl.float32)
    return q.to(tl.float32) * dl - ml


@triton.jit
def q4_k_tile(w_ptr, row_off, k0, K, G: tl.constexpr):
    block, s = sub_blocks(w_ptr, row_off, k0, 144, 32, G)
    j = tl.arange(0, 32)[None, None, :]
    q = (load_bytes(block + 16 + (s // 2) * 32 + j) >> ((s % 2) * 4)) & 15
    return scaled_with_min(block, s, q)


@triton.jit
def q5_k_tile(w_ptr, row_off, k0, K, G: tl.constexpr):
    block, s = sub_blocks(w_ptr, row_off, k0, 176, 32, G)
    j = tl.arange(0, 32)[None, None, :]
    low = (load_bytes(block + 48 + (s // 2) * 32 + j) >> ((s % 2) * 4)) & 15
    high = (load_bytes(block + 16 + j) >> s) & 1
    return scaled_with_min(block, s, low | (high << 4))


@triton.jit
def q6_k_tile(w_ptr, row_off, k0, K, G: tl.constexpr):
    # Value v = 16 u + i of the super-block (sub-block u): half h = v // 128, field f = (v % 128) // 32 and byte
    # j = v % 32; its low 4 bits are nibble f // 2 of ql[64 h + 32 (f % 2) + j], its high 2 bits field f of
    # qh[32 h + j].
    block, u = sub_blocks(w_ptr, row_off, k0, 210, 16, G)
    h = u // 8
    f = (u % 8) // 2
    j = (u % 2) * 16 + tl.arange(0, 16)[None, None, :]
    low = (load_bytes(block + h * 64 + (f % 2) * 32 + j) >> ((f // 2) * 4)) & 15
    high = (load_bytes(block + 128 + h * 32 + j) >> (f * 2)) & 3
    q = (low | (high << 4)) - 32
    sc = tl.load(block + 192 + u).to(tl.int8, bitcast=True).to(tl.float32)
    return q.to(tl.float32) * (load_f16(block + 208) * sc)


# --- decode: per-unit dot products ------------------------------------------------------------------------------
#
# The decode kernel walks K-quant rows in units of 64 values, four per super-block, so that a step holds few enough
# values per thread to stay in registers: ``base`` points at the super-block, ``u`` ``(1, NB)`` is the unit in it
# (0..3), ``xs`` ``(NB,)`` points at x for the super-block's first value.


@triton.jit
def _q45_k_dot(base, u, xs, magic, HIGH_BIT: tl.constexpr):
    """Q4_K (``HIGH_BIT`` False: codes at 16) or Q5_K (bit 4 from ``qh`` at 16, codes at 48). Unit ``u`` is qs bytes
    32 u .. 32 u + 31: low nibbles are sub-block 2u, high nibbles sub-block 2u + 1; word j holds values 2j (bits 0-3)
    and 2j + 1 (8-11) of the first, 2j (4-7) and 2j + 1 (12-15) of the second."""
    d = f16_u16(as_u16(base))
    dmin = f16_u16(as_u16(base) + 1)
    qs16 = as_u16(base + (48 if HIGH_BIT else 16) + 32 * u)
    xb = xs + 64 * u
    a0 = tl.zeros(base.shape, tl.float32)
    a8 = tl.zeros(base.shape, tl.float32)
    b4 = tl.zeros(base.shape, tl.float32)
    b12 = tl.zeros(base.shape, tl.float32)
    xa = tl.zeros(base.shape, tl.float32)
    xz = tl.zeros(base.shape, tl.float32)
    for j in tl.static_range(16):
        w = load_u16(qs16 + j)
        if HIGH_BIT:
            # qh byte i holds bit 4 of value 32 s + i in its bit s: sub-blocks 2u and 2u + 1 are bits 2u, 2u + 1
            hu = load_u16(as_u16(base + 16) + j) >> (2 * u)
            h0 = ((hu << 4) & 0x10) | magic
            h8 = ((hu << 4) & 0x1000) | magic
            h4 = ((hu << 7) & 0x100) | magic
            h12 = ((hu << 7) & 0x10000) | magic
        else:
            h0 = magic
            h8 = magic
            h4 = magic
            h12 = magic
        x0 = x_at(xb, 2 * j)
        x1 = x_at(xb, 2 * j + 1)
        x32 = x_at(xb, 32 + 2 * j)
        x33 = x_at(xb, 33 + 2 * j)
        a0 += unmagic((w & 0xF) | h0, 0.0) * x0
        a8 += unmagic((w & 0xF00) | h8, 0.0) * x1
        b4 += unmagic((w & 0xF0) | h4, 0.0) * x32
        b12 += unmagic((w & 0xF000) | h12, 0.0) * x33
        xa += x0 + x1
        xz += x32 + x33
    sc_a, mn_a = scale_min(base, 2 * u)
    sc_b, mn_b = scale_min(base, 2 * u + 1)
    total = (d * sc_a.to(tl.float32)) * (a0 + a8 * (1.0 / 256)) - (dmin * mn_a.to(tl.float32)) * xa
    return total + (d * sc_b.to(tl.float32)) * (b4 * (1.0 / 16) + b12 * (1.0 / 4096)) - (dmin * mn_b.to(tl.float32)) * xz


@triton.jit
def q4_k_dot(base, u, xs, magic):
    return _q45_k_dot(base, u, xs, magic, False)


@triton.jit
def q5_k_dot(base, u, xs, magic):
    return _q45_k_dot(base, u, xs, magic, True)


@triton.jit
def q6_k_dot(base, u, xs, magic):
    # Value v = 128 h + 32 f + i (half h, field f): low 4 bits are nibble f // 2 of ql[64 h + 32 (f % 2) + i], high
    # 2 bits field f of qh[32 h + i]. Unit u = 2h + f (f in 0, 1) is the ql bytes 64 h + 32 f .. + 31: word t (bytes
    # j0 = 2t, 2t + 1) holds values 32 f + j0 (bits 0-3), 32 (f + 2) + j0 (4-7), 32 f + j0 + 1 (8-11),
    # 32 (f + 2) + j0 + 1 (12-15), and the qh word at 32 h + j0 their high bits at 2f, 2f + 4, 2f + 8, 2f + 12: one
    # shift by 4 - 2f puts each above its nibble. Sub-blocks of 16: 8h + 2f (+1 for j0 >= 16), +4 for fields f + 2.
    h = u // 2
    f = u % 2
    ql16 = as_u16(base + 64 * h + 32 * f)
    qh16 = as_u16(base + 128 + 32 * h)
    xb = xs + 128 * h + 32 * f
    d = f16_u16(as_u16(base + 208))
    total = tl.zeros(base.shape, tl.float32)
    for half in tl.static_range(2):
        a0 = tl.zeros(base.shape, tl.float32)
        a4 = tl.zeros(base.shape, tl.float32)
        a8 = tl.zeros(base.shape, tl.float32)
        a12 = tl.zeros(base.shape, tl.float32)
        for t in tl.static_range(8 * half, 8 * half + 8):
            w = load_u16(ql16 + t)
            hs = (load_u16(qh16 + t) << 4) >> (2 * f)
            a0 += unmagic((w & 0xF) | ((hs & 0x30) | magic), 32.0) * x_at(xb, 2 * t)
            a4 += unmagic((w & 0xF0) | ((hs & 0x300) | magic), 32.0 * 16) * x_at(xb, 64 + 2 * t)
            a8 += unmagic((w & 0xF00) | ((hs & 0x3000) | magic), 32.0 * 256) * x_at(xb, 2 * t + 1)
            a12 += unmagic((w & 0xF000) | ((hs & 0x30000) | magic), 32.0 * 4096) * x_at(xb, 65 + 2 * t)
        sub = 8 * h + 2 * f + half
        sc_a = tl.load(base + 192 + sub).to(tl.int8, bitcast=True).to(tl.float32)
        sc_b = tl.load(base + 196 + sub).to(tl.int8, bitcast=True).to(tl.float32)
        total += (d * sc_a) * (a0 + a8 * (1.0 / 256)) + (d * sc_b) * (a4 * (1.0 / 16) + a12 * (1.0 / 4096))
    return total
