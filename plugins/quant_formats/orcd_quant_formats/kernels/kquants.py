"""Q4_K, Q5_K and Q6_K (layouts in ``..kquants``): decode dot products and tl.dot tiles.

Rows are walked in units of 64 values, four per super-block, so that a step holds few enough values per thread to
stay in registers. Both kinds of function work on a grid of (weight row, unit) pairs (1-D for decode, ``(BN, NB)``
for tl.dot): ``base`` points at each pair's super-block and ``u`` is the unit in it. Codes are read as uint16 words
(every field sits at an even offset) and decoded with ``unmagic`` (see ``common``) at their bit positions.

- ``*_dot`` (decode): the unit's ``sum w x`` for one row of x (``xb``: pointers to x at each super-block's first
  value). Sub-block scales and mins are applied once per sub-block:
  ``sum_i ((d sc) q_i - dmin m) x_i = (d sc) sum_i q_i x_i - (dmin m) sum_i x_i``.
- ``*_tile`` (tl.dot): the weights as ``(BN, NB * 64)`` (Q6_K: units of 128, half a super-block, so that a unit
  is contiguous in K) in x's dtype ``DT``, in K's natural order (joined word by word, one ``tl.permute``: see
  ``legacy``). Each weight follows gguf's float32 operations (``(d sc) q - dmin m``, ``(d sc) q``: exact products,
  one rounding), so it equals the reference dequantizer's to the bit before the cast to ``DT``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from orcd_quant_formats.kernels.common import as_u16, f16_u16, j4, j16, load_bytes, load_u16, unmagic, x_at


@triton.jit
def scale_min(block, s):
    """Sub-block ``s``'s 6-bit scale and min (``s`` a tensor; the packing of ``unpack_scale_min``) as fp32."""
    j = s % 4
    a = load_bytes(block + 4 + j)
    b = load_bytes(block + 8 + j)
    c = load_bytes(block + 12 + j)
    low = s < 4
    sc = tl.where(low, a & 63, (c & 15) | ((a >> 6) << 4))
    mn = tl.where(low, b & 63, (c >> 4) | ((b >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


# Q4_K / Q5_K: unit u is code bytes 32u .. 32u + 31 (at 16 for Q4_K, 48 for Q5_K): low nibbles are sub-block 2u,
# high nibbles sub-block 2u + 1 (32 values each). Word j holds values 2j (bits 0-3) and 2j + 1 (8-11) of the first,
# 2j (4-7) and 2j + 1 (12-15) of the second. Q5_K's bit 4 of value 32s + i is bit s of qh[i] (at 16).


@triton.jit
def _q45_word(base, u, J, magic, HIGH_BIT: tl.constexpr):
    """Word ``J``'s values ``q << 4k`` as fp32: (sub-block 2u: 2J, 2J + 1; sub-block 2u + 1: 2J, 2J + 1)."""
    w = load_u16(as_u16(base + (48 if HIGH_BIT else 16) + 32 * u) + J)
    if HIGH_BIT:
        hu = load_u16(as_u16(base + 16) + J) >> (2 * u)
        h0 = ((hu << 4) & 0x10) | magic
        h8 = ((hu << 4) & 0x1000) | magic
        h4 = ((hu << 7) & 0x100) | magic
        h12 = ((hu << 7) & 0x10000) | magic
    else:
        h0 = magic
        h8 = magic
        h4 = magic
        h12 = magic
    return (unmagic((w & 0xF) | h0, 0.0), unmagic((w & 0xF00) | h8, 0.0),
            unmagic((w & 0xF0) | h4, 0.0), unmagic((w & 0xF000) | h12, 0.0))


@triton.jit
def _q45_k_dot(base, u, xs, magic, HIGH_BIT: tl.constexpr, part, PARTS: tl.constexpr):
    xb = xs + 64 * u
    a0 = tl.zeros(base.shape, tl.float32)
    a8 = tl.zeros(base.shape, tl.float32)
    b4 = tl.zeros(base.shape, tl.float32)
    b12 = tl.zeros(base.shape, tl.float32)
    xa = tl.zeros(base.shape, tl.float32)
    xz = tl.zeros(base.shape, tl.float32)
    W: tl.constexpr = 16 // PARTS
    for jj in tl.static_range(W):
        j = part * W + jj
        v0, v8, v4, v12 = _q45_word(base, u, j, magic, HIGH_BIT)
        x0 = x_at(xb, 2 * j)
        x1 = x_at(xb, 2 * j + 1)
        x32 = x_at(xb, 32 + 2 * j)
        x33 = x_at(xb, 33 + 2 * j)
        a0 += v0 * x0
        a8 += v8 * x1
        b4 += v4 * x32
        b12 += v12 * x33
        xa += x0 + x1
        xz += x32 + x33
    d = f16_u16(as_u16(base))
    dmin = f16_u16(as_u16(base) + 1)
    sc_a, mn_a = scale_min(base, 2 * u)
    sc_b, mn_b = scale_min(base, 2 * u + 1)
    total = (d * sc_a) * (a0 + a8 * (1.0 / 256)) - (dmin * mn_a) * xa
    return total + (d * sc_b) * (b4 * (1.0 / 16) + b12 * (1.0 / 4096)) - (dmin * mn_b) * xz


@triton.jit
def q4_k_dot(base, u, xs, magic, part, PARTS: tl.constexpr):
    return _q45_k_dot(base, u, xs, magic, False, part, PARTS)


@triton.jit
def q5_k_dot(base, u, xs, magic, part, PARTS: tl.constexpr):
    return _q45_k_dot(base, u, xs, magic, True, part, PARTS)


@triton.jit
def _q45_tile_word(base, u, J: tl.constexpr, magic, dla, mla, dlb, mlb, HIGH_BIT: tl.constexpr, DT: tl.constexpr):
    v0, v8, v4, v12 = _q45_word(base, u, J, magic, HIGH_BIT)
    w = j4(v0 * dla - mla, v8 * (dla * (1.0 / 256)) - mla, v4 * (dlb * (1.0 / 16)) - mlb,
           v12 * (dlb * (1.0 / 4096)) - mlb)
    return w.to(DT)


@triton.jit
def _q45_k_tile(base, u, magic, HIGH_BIT: tl.constexpr, DT: tl.constexpr):
    d = f16_u16(as_u16(base))
    dmin = f16_u16(as_u16(base) + 1)
    sc_a, mn_a = scale_min(base, 2 * u)
    sc_b, mn_b = scale_min(base, 2 * u + 1)
    a, ma, b, mb = d * sc_a, dmin * mn_a, d * sc_b, dmin * mn_b
    w = j16(_q45_tile_word(base, u, 0, magic, a, ma, b, mb, HIGH_BIT, DT),
            _q45_tile_word(base, u, 1, magic, a, ma, b, mb, HIGH_BIT, DT),
            _q45_tile_word(base, u, 2, magic, a, ma, b, mb, HIGH_BIT, DT),
            _q45_tile_word(base, u, 3, magic, a, ma, b, mb, HIGH_BIT, DT),
            _q45_tile_word(base, u, 4, magic, a, ma, b, mb, HIGH_BIT, DT),
            _q45_tile_word(base, u, 5, magic, a, ma, b, mb, HIGH_BIT, DT),
            _q45_tile_word(base, u, 6, magic, a, ma, b, mb, HIGH_BIT, DT),
            _q45_tile_word(base, u, 7, magic, a, ma, b, mb, HIGH_BIT, DT),
            _q45_tile_word(base, u, 8, magic, a, ma, b, mb, HIGH_BIT, DT),
            _q45_tile_word(base, u, 9, magic, a, ma, b, mb, HIGH_BIT, DT),
            _q45_tile_word(base, u, 10, magic, a, ma, b, mb, HIGH_BIT, DT),
            _q45_tile_word(base, u, 11, magic, a, ma, b, mb, HIGH_BIT, DT),
            _q45_tile_word(base, u, 12, magic, a, ma, b, mb, HIGH_BIT, DT),
            _q45_tile_word(base, u, 13, magic, a, ma, b, mb, HIGH_BIT, DT),
            _q45_tile_word(base, u, 14, magic, a, ma, b, mb, HIGH_BIT, DT),
            _q45_tile_word(base, u, 15, magic, a, ma, b, mb, HIGH_BIT, DT))
    # axes (BN, NB, P, Q, R, S, T, U) with value = P + 2 (R + 2S + 4T + 8U) + 32 Q: natural order Q, U, T, S, R, P
    return tl.reshape(tl.permute(w, (0, 1, 3, 7, 6, 5, 4, 2)), (base.shape[0], base.shape[1] * 64))


@triton.jit
def q4_k_tile(base, u, magic, DT: tl.constexpr):
    return _q45_k_tile(base, u, magic, False, DT)


@triton.jit
def q5_k_tile(base, u, magic, DT: tl.constexpr):
    return _q45_k_tile(base, u, magic, True, DT)


# Q6_K: value v = 128h + 32f + i (half h, field f) has its low 4 bits in nibble f // 2 of ql[64h + 32 (f % 2) + i]
# and its high 2 bits in field f of qh[32h + i]. Unit u = 2h + f (f in 0, 1) is the ql bytes 64h + 32f .. + 31:
# word t (bytes j0 = 2t, 2t + 1) holds values 32f + j0 (bits 0-3), 32 (f + 2) + j0 (4-7), 32f + j0 + 1 (8-11) and
# 32 (f + 2) + j0 + 1 (12-15); the qh word at 32h + j0 holds their high bits at 2f, 2f + 4, 2f + 8, 2f + 12, and
# one shift by 4 - 2f puts each above its nibble. Sub-blocks of 16: 8h + 2f (+1 for t >= 8) for the low fields, 4
# more for the high ones. x offsets are from the unit's first value, 128h + 32f.


@triton.jit
def _q6_word(base, u, T, magic):
    """Word ``T``'s values ``(q - 32) << 4k`` as fp32: (32f + 2T, 32f + 2T + 1, 32 (f + 2) + 2T, + 1)."""
    h = u // 2
    f = u % 2
    w = load_u16(as_u16(base + 64 * h + 32 * f) + T)
    hs = (load_u16(as_u16(base + 128 + 32 * h) + T) << 4) >> (2 * f)
    return (unmagic((w & 0xF) | ((hs & 0x30) | magic), 32.0),
            unmagic((w & 0xF00) | ((hs & 0x3000) | magic), 32.0 * 256),
            unmagic((w & 0xF0) | ((hs & 0x300) | magic), 32.0 * 16),
            unmagic((w & 0xF000) | ((hs & 0x30000) | magic), 32.0 * 4096))


@triton.jit
def _q6_scales(base, u, HALF):
    """``d * sc`` for the low-field and high-field sub-blocks of words ``8 HALF .. 8 HALF + 7``."""
    sub = 8 * (u // 2) + 2 * (u % 2) + HALF
    d = f16_u16(as_u16(base + 208))
    sa = tl.load(base + 192 + sub).to(tl.int8, bitcast=True).to(tl.float32)
    sb = tl.load(base + 196 + sub).to(tl.int8, bitcast=True).to(tl.float32)
    return d * sa, d * sb


@triton.jit
def q6_k_dot(base, u, xs, magic, part, PARTS: tl.constexpr):
    """Words ``part * W ..`` (``W = 16 / PARTS``) of unit ``u``; a part lies within one half of the words (one pair
    of sub-block scales) unless it is the whole unit."""
    xb = xs + 128 * (u // 2) + 32 * (u % 2)
    total = tl.zeros(base.shape, tl.float32)
    HALVES: tl.constexpr = 2 if PARTS == 1 else 1
    W: tl.constexpr = 16 // PARTS // HALVES
    for hh in tl.static_range(HALVES):
        t0 = part * (16 // PARTS) + 8 * hh
        a0 = tl.zeros(base.shape, tl.float32)
        a8 = tl.zeros(base.shape, tl.float32)
        a4 = tl.zeros(base.shape, tl.float32)
        a12 = tl.zeros(base.shape, tl.float32)
        for jj in tl.static_range(W):
            t = t0 + jj
            v0, v8, v4, v12 = _q6_word(base, u, t, magic)
            a0 += v0 * x_at(xb, 2 * t)
            a8 += v8 * x_at(xb, 2 * t + 1)
            a4 += v4 * x_at(xb, 64 + 2 * t)
            a12 += v12 * x_at(xb, 65 + 2 * t)
        dla, dlb = _q6_scales(base, u, t0 // 8)
        total += dla * (a0 + a8 * (1.0 / 256)) + dlb * (a4 * (1.0 / 16) + a12 * (1.0 / 4096))
    return total


@triton.jit
def _q6_tile_t(base, h, T: tl.constexpr, magic, s0a, s0b, s1a, s1b, DT: tl.constexpr):
    """Word ``T`` of both fields f = 0, 1 of half ``h`` (decode units 2h, 2h + 1) joined as ``(..., 2, 2, 2)``:
    axis P the byte (+1), Q the nibble (+64), F the field (+32); ``s0a``, ``s0b``, ``s1a``, ``s1b``: ``d * sc`` of
    fields 0 and 1's low- and high-nibble sub-blocks."""
    a0, a8, a4, a12 = _q6_word(base, 2 * h, T, magic)
    b0, b8, b4, b12 = _q6_word(base, 2 * h + 1, T, magic)
    wa = j4(a0 * s0a, a8 * (s0a * (1.0 / 256)), a4 * (s0b * (1.0 / 16)), a12 * (s0b * (1.0 / 4096)))
    wb = j4(b0 * s1a, b8 * (s1a * (1.0 / 256)), b4 * (s1b * (1.0 / 16)), b12 * (s1b * (1.0 / 4096)))
    return tl.join(wa, wb).to(DT)


@triton.jit
def q6_k_tile(base, h, magic, DT: tl.constexpr):
    """Units of 128 values: half ``h`` of the super-block, both of its decode units."""
    s0a, s0b = _q6_scales(base, 2 * h, 0)
    s1a, s1b = _q6_scales(base, 2 * h + 1, 0)
    t0 = _q6_tile_t(base, h, 0, magic, s0a, s0b, s1a, s1b, DT)
    t1 = _q6_tile_t(base, h, 1, magic, s0a, s0b, s1a, s1b, DT)
    t2 = _q6_tile_t(base, h, 2, magic, s0a, s0b, s1a, s1b, DT)
    t3 = _q6_tile_t(base, h, 3, magic, s0a, s0b, s1a, s1b, DT)
    t4 = _q6_tile_t(base, h, 4, magic, s0a, s0b, s1a, s1b, DT)
    t5 = _q6_tile_t(base, h, 5, magic, s0a, s0b, s1a, s1b, DT)
    t6 = _q6_tile_t(base, h, 6, magic, s0a, s0b, s1a, s1b, DT)
    t7 = _q6_tile_t(base, h, 7, magic, s0a, s0b, s1a, s1b, DT)
    s0a, s0b = _q6_scales(base, 2 * h, 1)
    s1a, s1b = _q6_scales(base, 2 * h + 1, 1)
    t8 = _q6_tile_t(base, h, 8, magic, s0a, s0b, s1a, s1b, DT)
    t9 = _q6_tile_t(base, h, 9, magic, s0a, s0b, s1a, s1b, DT)
    t10 = _q6_tile_t(base, h, 10, magic, s0a, s0b, s1a, s1b, DT)
    t11 = _q6_tile_t(base, h, 11, magic, s0a, s0b, s1a, s1b, DT)
    t12 = _q6_tile_t(base, h, 12, magic, s0a, s0b, s1a, s1b, DT)
    t13 = _q6_tile_t(base, h, 13, magic, s0a, s0b, s1a, s1b, DT)
    t14 = _q6_tile_t(base, h, 14, magic, s0a, s0b, s1a, s1b, DT)
    t15 = _q6_tile_t(base, h, 15, magic, s0a, s0b, s1a, s1b, DT)
    w = j16(t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15)
    # axes (BN, NB, P, Q, F, R, S, T, U) with value = P + 2 (R + 2S + 4T + 8U) + 32 F + 64 Q: natural order is
    # Q, F, U, T, S, R, P
    return tl.reshape(tl.permute(w, (0, 1, 3, 4, 8, 7, 6, 5, 2)), (base.shape[0], base.shape[1] * 128))
