"""Weight tiles of the 32-value block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (layouts in ``..legacy``).

Two shapes of work. The tiles below feed ``tl.dot`` (prefill): a tile is ``G`` half-blocks of 16 consecutive values for each of ``BN`` rows: fp32 ``(BN, G, 16)``, columns
``k0 .. k0 + 16 G`` in their natural order. Half ``h`` of a 4-bit block is the low (``h = 0``) or high nibble of the
16 ``qs`` bytes, so both halves read the same 16 contiguous bytes. Half-blocks at or past ``K`` read nothing and
decode to 0. Values are computed with gguf's float32 operations (``d * q`` or ``d * q + m``), so the tile equals
the reference dequantizer bit for bit.

The ``*_dot`` functions serve decode: for a ``(BN, NB)`` grid of (weight row, block) pairs, each the sum over the
block of ``w * x`` for one row of ``x`` (``xb``: pointers to the block's first value of x, ``(NB,)``). They read the
block fields as uint16 words (every field sits at an even offset: blocks are 18, 20, 22, 24 or 34 bytes) and
decode values with ``magic`` (see ``common``): a 16-bit word of 4-bit codes holds values ``2j`` (bits 0-3),
``16 + 2j`` (4-7), ``2j + 1`` (8-11) and ``17 + 2j`` (12-15) of its block, each kept at its bit position and summed
separately, the block scale applied once at the end.
"""

from __future__ import annotations

import triton
import triton.language as tl

from orcd_quant_formats.kernels.common import (
    as_u16, f16_u16, load_u16, magic, masked_bytes, masked_f16, shift, unmagic, x_at,
)


@triton.jit
def half_blocks(w_ptr, row_off, k0, K, TYPE_SIZE: tl.constexpr, G: tl.constexpr):
    """For each row and half-block: a pointer to its block ``(BN, G, 1)``, which half it is, and whether it lies
    inside the row (``(1, G, 1)`` each)."""
    g = k0 // 16 + tl.arange(0, G)[None, :, None]
    block = w_ptr + row_off[:, None, None] + (g // 2) * TYPE_SIZE
    return block, g % 2, g * 16 < K


@triton.jit
def nibbles(block, QS: tl.constexpr, half, valid):
    """The 16 four-bit codes of each half-block, ``(BN, G, 16)`` int32."""
    j = tl.arange(0, 16)[None, None, :]
    return (masked_bytes(block + QS + j, valid) >> (half * 4)) & 15


@triton.jit
def fifth_bits(block, QH: tl.constexpr, half, valid):
    """Bit 4 of each value from the little-endian uint32 ``qh`` (bit ``i`` for value ``i``), shifted into place."""
    j = tl.arange(0, 16)[None, None, :]
    qh = masked_bytes(block + QH + half * 2 + j // 8, valid)
    return ((qh >> (j % 8)) & 1) << 4


@triton.jit
def q4_0_tile(w_ptr, row_off, k0, K, G: tl.constexpr):
    block, half, valid = half_blocks(w_ptr, row_off, k0, K, 18, G)
    q = nibbles(block, 2, half, valid) - 8
    return q.to(tl.float32) * masked_f16(block, valid)


@triton.jit
def q4_1_tile(w_ptr, row_off, k0, K, G: tl.constexpr):
    block, half, valid = half_blocks(w_ptr, row_off, k0, K, 20, G)
    q = nibbles(block, 4, half, valid)
    return q.to(tl.float32) * masked_f16(block, valid) + masked_f16(block + 2, valid)


@triton.jit
def q5_0_tile(w_ptr, row_off, k0, K, G: tl.constexpr):
    block, half, valid = half_blocks(w_ptr, row_off, k0, K, 22, G)
    q = (nibbles(block, 6, half, valid) | fifth_bits(block, 2, half, valid)) - 16
    return q.to(tl.float32) * masked_f16(block, valid)


@triton.jit
def q5_1_tile(w_ptr, row_off, k0, K, G: tl.constexpr):
    block, half, valid = half_blocks(w_ptr, row_off, k0, K, 24, G)
    q = nibbles(block, 8, half, valid) | fifth_bits(block, 4, half, valid)
    return q.to(tl.float32) * masked_f16(block, valid) + masked_f16(block + 2, valid)


@triton.jit
def q8_0_tile(w_ptr, row_off, k0, K, G: tl.constexpr):
    block, half, valid = half_blocks(w_ptr, row_off, k0, K, 34, G)
    j = tl.arange(0, 16)[None, None, :]
    q = tl.load(block + 2 + half * 16 + j, mask=valid, other=0).to(tl.int8, bitcast=True)
    return q.to(tl.float32) * masked_f16(block, valid)


# --- decode: per-block dot products -----------------------------------------------------------------------------


@triton.jit
def nibble_sums(qs16, xb, MAGIC, OFFSET: tl.constexpr, HAS_QH: tl.constexpr, qh_lo, qh_hi):
    """``S = sum_i (q_i - OFFSET) x_i`` over 32-value blocks whose 16 ``qs`` bytes start at ``qs16`` (uint16
    pointers, ``(BN, NB)``), and ``X = sum_i x_i`` ``(1, NB)``. With ``HAS_QH``, bit 4 of value ``i`` is bit ``i``
    of the little-endian uint32 ``qh`` (``qh_lo``: bits 0-15, ``qh_hi``: 16-31), moved next to its nibble."""
    p0 = tl.zeros(qs16.shape, tl.float32)
    p4 = tl.zeros(qs16.shape, tl.float32)
    p8 = tl.zeros(qs16.shape, tl.float32)
    p12 = tl.zeros(qs16.shape, tl.float32)
    xs = tl.zeros(xb.shape, tl.float32)
    for j in tl.static_range(8):
        w = load_u16(qs16 + j)
        x0 = x_at(xb, 2 * j)
        x1 = x_at(xb, 2 * j + 1)
        x16 = x_at(xb, 16 + 2 * j)
        x17 = x_at(xb, 17 + 2 * j)
        if HAS_QH:
            h0 = (shift(qh_lo, 4 - 2 * j) & 0x10) | MAGIC
            h4 = (shift(qh_hi, 8 - 2 * j) & 0x100) | MAGIC
            h8 = (shift(qh_lo, 11 - 2 * j) & 0x1000) | MAGIC
            h12 = (shift(qh_hi, 15 - 2 * j) & 0x10000) | MAGIC
        else:
            h0 = MAGIC
            h4 = MAGIC
            h8 = MAGIC
            h12 = MAGIC
        p0 += unmagic((w & 0xF) | h0, OFFSET) * x0
        p4 += unmagic((w & 0xF0) | h4, OFFSET * 16) * x16
        p8 += unmagic((w & 0xF00) | h8, OFFSET * 256) * x1
        p12 += unmagic((w & 0xF000) | h12, OFFSET * 4096) * x17
        xs += (x0 + x1) + (x16 + x17)
    return p0 + p4 * (1.0 / 16) + p8 * (1.0 / 256) + p12 * (1.0 / 4096), xs


@triton.jit
def q4_0_dot(base, u, xb, MAGIC):
    s, _ = nibble_sums(as_u16(base + 2), xb, MAGIC, 8.0, False, 0, 0)
    return s * f16_u16(as_u16(base))


@triton.jit
def q4_1_dot(base, u, xb, MAGIC):
    s, xs = nibble_sums(as_u16(base + 4), xb, MAGIC, 0.0, False, 0, 0)
    return s * f16_u16(as_u16(base)) + f16_u16(as_u16(base + 2)) * xs


@triton.jit
def q5_0_dot(base, u, xb, MAGIC):
    qh = as_u16(base + 2)
    s, _ = nibble_sums(as_u16(base + 6), xb, MAGIC, 16.0, True, load_u16(qh), load_u16(qh + 1))
    return s * f16_u16(as_u16(base))


@triton.jit
def q5_1_dot(base, u, xb, MAGIC):
    qh = as_u16(base + 4)
    s, xs = nibble_sums(as_u16(base + 8), xb, MAGIC, 0.0, True, load_u16(qh), load_u16(qh + 1))
    return s * f16_u16(as_u16(base)) + f16_u16(as_u16(base + 2)) * xs


@triton.jit
def q8_0_dot(base, u, xb, MAGIC):
    # int8 codes: flipping the sign bit makes them unsigned (q + 128), decoded like the nibbles
    qs16 = as_u16(base + 2)
    p0 = tl.zeros(base.shape, tl.float32)
    p8 = tl.zeros(base.shape, tl.float32)
    for j in tl.static_range(16):
        w = load_u16(qs16 + j) ^ 0x8080
        p0 += magic(w & 0xFF, MAGIC, 128.0) * x_at(xb, 2 * j)
        p8 += magic(w & 0xFF00, MAGIC, 128.0 * 256) * x_at(xb, 2 * j + 1)
    return (p0 + p8 * (1.0 / 256)) * f16_u16(as_u16(base))
