"""Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (layouts in ``..legacy``): decode dot products and tl.dot tiles.

Both work on a grid of (weight row, block) pairs (``base``: pointers to the blocks; 1-D for decode, ``(BN, NB)`` for
tl.dot), read the block's fields as uint16 words and decode codes with ``unmagic`` (see ``common``). A word of
4-bit codes holds values ``2j`` (bits 0-3), ``16 + 2j`` (4-7), ``2j + 1`` (8-11) and ``17 + 2j`` (12-15) of its
block; each is kept at its bit position, as ``q << 4k``, and ``2**-4k`` goes into the scale.

- ``*_dot`` (decode): ``sum w x`` over part ``part`` of ``PARTS`` of the block (its words ``part * W ..`` for
  ``W`` words a part) for one row of x (``xb``: pointers to x at each block's first value), summed per bit
  position, the block scale applied once. Parts let several lanes share a block, so that a warp's loads of codes
  and of x fall in few cache lines.
- ``*_tile`` (tl.dot): the weights as a ``(BN, NB * 32)`` tile in x's dtype ``DT``, in K's natural order: the
  values are joined word by word (``tl.join`` adds minor axes, held within a thread) and one ``tl.permute`` of
  those axes restores the order. Each weight is computed with gguf's float32 operations (exact products, one
  rounding for ``+ m``), so it equals the reference dequantizer's to the bit before the cast to ``DT``, as in the
  reference path.
"""

from __future__ import annotations

import triton
import triton.language as tl

from orcd_quant_formats.kernels.common import as_u16, f16_u16, j4, j16, load_u16, unmagic, x_at


@triton.jit
def _nibble_word(qs16, J, magic, OFFSET: tl.constexpr, HAS_QH: tl.constexpr, qh):
    """Word ``J``'s four values ``(q - OFFSET) << 4k`` as fp32, for k = 0..3: block values 2J, 16 + 2J, 2J + 1,
    17 + 2J (``J`` static, or a tensor in decode's parts). With ``HAS_QH``, bit 4 of value i is bit i of the
    little-endian uint32 ``qh`` (an int32), moved above its nibble (OR-ed into MAGIC first, so each value stays two
    LOP3s)."""
    w = load_u16(qs16 + J)
    if HAS_QH:
        t = qh >> (2 * J)  # bits 0, 1: values 2J, 2J + 1; after >> 16, values 16 + 2J, 17 + 2J
        t16 = t >> 16
        h0 = ((t << 4) & 0x10) | magic
        h4 = ((t16 << 8) & 0x100) | magic
        h8 = ((t << 11) & 0x1000) | magic
        h12 = ((t16 << 15) & 0x10000) | magic
    else:
        h0 = magic
        h4 = magic
        h8 = magic
        h12 = magic
    return (unmagic((w & 0xF) | h0, OFFSET), unmagic((w & 0xF0) | h4, OFFSET * 16),
            unmagic((w & 0xF00) | h8, OFFSET * 256), unmagic((w & 0xF000) | h12, OFFSET * 4096))


@triton.jit
def load_qh(qh16):
    """The 32 high bits at ``qh16`` (two uint16 words) as one int32."""
    return load_u16(qh16) | (load_u16(qh16 + 1) << 16)


@triton.jit
def nibble_sums(qs16, xb, magic, OFFSET: tl.constexpr, HAS_QH: tl.constexpr, qh, part, PARTS: tl.constexpr):
    """``S = sum_i (q_i - OFFSET) x_i`` over part ``part`` of ``PARTS`` (words ``8 / PARTS`` at a time) of 32-value
    blocks whose 16 code bytes start at ``qs16``, and ``X = sum_i x_i`` over the same values."""
    p0 = tl.zeros(qs16.shape, tl.float32)
    p4 = tl.zeros(qs16.shape, tl.float32)
    p8 = tl.zeros(qs16.shape, tl.float32)
    p12 = tl.zeros(qs16.shape, tl.float32)
    xs = tl.zeros(xb.shape, tl.float32)
    W: tl.constexpr = 8 // PARTS
    for jj in tl.static_range(W):
        j = part * W + jj
        v0, v4, v8, v12 = _nibble_word(qs16, j, magic, OFFSET, HAS_QH, qh)
        x0 = x_at(xb, 2 * j)
        x1 = x_at(xb, 2 * j + 1)
        x16 = x_at(xb, 16 + 2 * j)
        x17 = x_at(xb, 17 + 2 * j)
        p0 += v0 * x0
        p4 += v4 * x16
        p8 += v8 * x1
        p12 += v12 * x17
        xs += (x0 + x1) + (x16 + x17)
    return p0 + p4 * (1.0 / 16) + p8 * (1.0 / 256) + p12 * (1.0 / 4096), xs


@triton.jit
def _nibble_tile_word(qs16, J: tl.constexpr, magic, OFFSET: tl.constexpr, HAS_QH: tl.constexpr, qh, d, m,
                      HAS_MIN: tl.constexpr, DT: tl.constexpr):
    """Word ``J``'s weights joined as ``(..., 2, 2)``: axis P the byte (values 2J, 2J + 1), axis Q the nibble (+16)."""
    v0, v4, v8, v12 = _nibble_word(qs16, J, magic, OFFSET, HAS_QH, qh)
    if HAS_MIN:
        w = j4(v0 * d + m, v8 * (d * (1.0 / 256)) + m, v4 * (d * (1.0 / 16)) + m, v12 * (d * (1.0 / 4096)) + m)
    else:
        w = j4(v0 * d, v8 * (d * (1.0 / 256)), v4 * (d * (1.0 / 16)), v12 * (d * (1.0 / 4096)))
    return w.to(DT)


@triton.jit
def nibble_tile(qs16, magic, OFFSET: tl.constexpr, HAS_QH: tl.constexpr, qh, d, m, HAS_MIN: tl.constexpr,
                DT: tl.constexpr):
    w0 = _nibble_tile_word(qs16, 0, magic, OFFSET, HAS_QH, qh, d, m, HAS_MIN, DT)
    w1 = _nibble_tile_word(qs16, 1, magic, OFFSET, HAS_QH, qh, d, m, HAS_MIN, DT)
    w2 = _nibble_tile_word(qs16, 2, magic, OFFSET, HAS_QH, qh, d, m, HAS_MIN, DT)
    w3 = _nibble_tile_word(qs16, 3, magic, OFFSET, HAS_QH, qh, d, m, HAS_MIN, DT)
    w4 = _nibble_tile_word(qs16, 4, magic, OFFSET, HAS_QH, qh, d, m, HAS_MIN, DT)
    w5 = _nibble_tile_word(qs16, 5, magic, OFFSET, HAS_QH, qh, d, m, HAS_MIN, DT)
    w6 = _nibble_tile_word(qs16, 6, magic, OFFSET, HAS_QH, qh, d, m, HAS_MIN, DT)
    w7 = _nibble_tile_word(qs16, 7, magic, OFFSET, HAS_QH, qh, d, m, HAS_MIN, DT)
    # axes (BN, NB, P, Q, R, S, T) with value = P + 2 (R + 2S + 4T) + 16 Q: natural order is Q, T, S, R, P
    w = tl.join(j4(w0, w1, w2, w3), j4(w4, w5, w6, w7))
    return tl.reshape(tl.permute(w, (0, 1, 3, 6, 5, 4, 2)), (qs16.shape[0], qs16.shape[1] * 32))


@triton.jit
def q4_0_dot(base, u, xb, magic, part, PARTS: tl.constexpr):
    s, _ = nibble_sums(as_u16(base + 2), xb, magic, 8.0, False, 0, part, PARTS)
    return s * f16_u16(as_u16(base))


@triton.jit
def q4_1_dot(base, u, xb, magic, part, PARTS: tl.constexpr):
    s, xs = nibble_sums(as_u16(base + 4), xb, magic, 0.0, False, 0, part, PARTS)
    return s * f16_u16(as_u16(base)) + f16_u16(as_u16(base + 2)) * xs


@triton.jit
def q5_0_dot(base, u, xb, magic, part, PARTS: tl.constexpr):
    s, _ = nibble_sums(as_u16(base + 6), xb, magic, 16.0, True, load_qh(as_u16(base + 2)), part, PARTS)
    return s * f16_u16(as_u16(base))


@triton.jit
def q5_1_dot(base, u, xb, magic, part, PARTS: tl.constexpr):
    s, xs = nibble_sums(as_u16(base + 8), xb, magic, 0.0, True, load_qh(as_u16(base + 4)), part, PARTS)
    return s * f16_u16(as_u16(base)) + f16_u16(as_u16(base + 2)) * xs


@triton.jit
def q4_0_tile(base, u, magic, DT: tl.constexpr):
    return nibble_tile(as_u16(base + 2), magic, 8.0, False, 0, f16_u16(as_u16(base)), 0.0, False, DT)


@triton.jit
def q4_1_tile(base, u, magic, DT: tl.constexpr):
    return nibble_tile(as_u16(base + 4), magic, 0.0, False, 0, f16_u16(as_u16(base)),
                       f16_u16(as_u16(base + 2)), True, DT)


@triton.jit
def q5_0_tile(base, u, magic, DT: tl.constexpr):
    return nibble_tile(as_u16(base + 6), magic, 16.0, True, load_qh(as_u16(base + 2)), f16_u16(as_u16(base)), 0.0,
                       False, DT)


@triton.jit
def q5_1_tile(base, u, magic, DT: tl.constexpr):
    return nibble_tile(as_u16(base + 8), magic, 0.0, True, load_qh(as_u16(base + 4)), f16_u16(as_u16(base)),
                       f16_u16(as_u16(base + 2)), True, DT)


# Q8_0: int8 codes; flipping the sign bit makes them unsigned (q + 128). Word J holds values 2J (bits 0-7) and
# 2J + 1 (8-15).


@triton.jit
def _q8_word(qs16, J, magic):
    w = load_u16(qs16 + J) ^ 0x8080
    return unmagic((w & 0xFF) | magic, 128.0), unmagic((w & 0xFF00) | magic, 128.0 * 256)


@triton.jit
def q8_0_dot(base, u, xb, magic, part, PARTS: tl.constexpr):
    qs16 = as_u16(base + 2)
    p0 = tl.zeros(base.shape, tl.float32)
    p8 = tl.zeros(base.shape, tl.float32)
    W: tl.constexpr = 16 // PARTS
    for jj in tl.static_range(W):
        j = part * W + jj
        v0, v8 = _q8_word(qs16, j, magic)
        p0 += v0 * x_at(xb, 2 * j)
        p8 += v8 * x_at(xb, 2 * j + 1)
    return (p0 + p8 * (1.0 / 256)) * f16_u16(as_u16(base))


@triton.jit
def _q8_tile_word(qs16, J: tl.constexpr, magic, d, DT: tl.constexpr):
    v0, v8 = _q8_word(qs16, J, magic)
    return tl.join(v0 * d, v8 * (d * (1.0 / 256))).to(DT)


@triton.jit
def q8_0_tile(base, u, magic, DT: tl.constexpr):
    qs16 = as_u16(base + 2)
    d = f16_u16(as_u16(base))
    w = j16(_q8_tile_word(qs16, 0, magic, d, DT), _q8_tile_word(qs16, 1, magic, d, DT),
            _q8_tile_word(qs16, 2, magic, d, DT), _q8_tile_word(qs16, 3, magic, d, DT),
            _q8_tile_word(qs16, 4, magic, d, DT), _q8_tile_word(qs16, 5, magic, d, DT),
            _q8_tile_word(qs16, 6, magic, d, DT), _q8_tile_word(qs16, 7, magic, d, DT),
            _q8_tile_word(qs16, 8, magic, d, DT), _q8_tile_word(qs16, 9, magic, d, DT),
            _q8_tile_word(qs16, 10, magic, d, DT), _q8_tile_word(qs16, 11, magic, d, DT),
            _q8_tile_word(qs16, 12, magic, d, DT), _q8_tile_word(qs16, 13, magic, d, DT),
            _q8_tile_word(qs16, 14, magic, d, DT), _q8_tile_word(qs16, 15, magic, d, DT))
    # axes (BN, NB, P, R, S, T, U) with value = P + 2 (R + 2S + 4T + 8U): natural order is U, T, S, R, P
    return tl.reshape(tl.permute(w, (0, 1, 6, 5, 4, 3, 2)), (base.shape[0], base.shape[1] * 32))
