"""Weight tiles of the 32-value block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (layouts in ``..legacy``).

A tile is ``G`` half-blocks of 16 consecutive values for each of ``BN`` rows: fp32 ``(BN, G, 16)``, columns
``k0 .. k0 + 16 G`` in their natural order. Half ``h`` of a 4-bit block is the low (``h = 0``) or high nibble of the
16 ``qs`` bytes, so both halves read the same 16 contiguous bytes. Half-blocks at or past ``K`` read nothing and
decode to 0. Values are computed with gguf's float32 operations (``d * q`` or ``d * q + m``), so the tile equals
the reference dequantizer bit for bit.
"""

from __future__ import annotations

import triton
import triton.language as tl

from orcd_quant_formats.kernels.common import masked_bytes, masked_f16


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
