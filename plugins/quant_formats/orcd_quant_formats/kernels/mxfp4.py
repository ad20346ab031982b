"""MXFP4 (layout in ``..mxfp4``): decode dot products and tl.dot tiles over a grid of (weight row, block) pairs, as in
``legacy``.

The 16 code bytes sit at odd offsets (17-byte blocks), so they are read one by one. Both codes of a byte (the tiles),
or all four codes of two bytes (the decode kernel's dots), are turned into fp16 bit patterns at once (magnitude bits
to 9-11, sign to 15): that fp16 is the E2M1 value times 2**-14 for every code, subnormals included, so 2**15 times it
is ggml's doubled value. The block scale ``2**(e - 128)`` is built as float32 bits as the torch dequantizer does, so
tiles are bit-exact with gguf, ``inf`` for the largest exponents included.
"""

from __future__ import annotations

import triton
import triton.language as tl

from orcd_quant_formats.kernels.common import j16, x_at


@triton.jit
def _e2m1_pair(b):
    """Both codes of byte ``b`` (low nibble: value j, high nibble: value j + 16) as fp32 E2M1 * 2**-14.

    One int32 holds the two fp16 bit patterns (low code in bits 0-15, high code in 16-31): multiplying the magnitude
    bits ``b & 0x77`` by ``2**9 + 2**21`` and the sign bits ``b & 0x88`` by ``2**12 + 2**24`` places copies of every
    bit where one of the halves wants it (the copies never overlap, so there are no carries), and masks keep those."""
    bits = (((b & 0x77) * 0x200200) & 0x0E000E00) | (((b & 0x88) * 0x1001000) & -0x7FFF8000)  # 0x80008000
    lo = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (bits >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _e2m1_two_bytes(t):
    """The four codes of two bytes ``a``, ``b`` held as ``t = a | b << 16``: their low nibbles (values j and j') and
    their high nibbles (values j + 16 and j' + 16) as two int32 pairs of fp16 bit patterns (E2M1 * 2**-14, as
    ``_e2m1_pair``). With the bytes 16 bits apart, one shift and mask place both magnitudes of a pair, and one more
    both signs: less integer work per code than ``_e2m1_pair`` (compiled for sm_90, GPT-OSS's expert launch went
    from 530 to 467 instructions a loop step; on an H100 its time did not move: 28.5 us, 28.8 before)."""
    lo = ((t << 9) & 0x0E000E00) | ((t << 12) & -0x7FFF8000)  # magnitude bits 0-2 -> 9-11, sign bit 3 -> 15
    hi = ((t << 5) & 0x0E000E00) | ((t << 8) & -0x7FFF8000)  # magnitude bits 4-6 -> 9-11, sign bit 7 -> 15
    return lo, hi


@triton.jit
def _halves(bits):
    """The two fp16 bit patterns of an int32, as fp32 (low half, high half)."""
    return (bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32),
            (bits >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32))


@triton.jit
def block_scale(base):
    """``2**(e - 128)`` of each block's exponent byte ``e`` (ggml's half-scale of E8M0; subnormal for ``e < 2``), as
    fp32 bits built as the torch dequantizer builds them."""
    e = tl.load(base).to(tl.int32)
    return tl.where(e < 2, (e + 1) << 21, (e - 1) << 23).to(tl.float32, bitcast=True)


@triton.jit
def mxfp4_dot(base, u, xb, magic, part, PARTS: tl.constexpr):
    """Code bytes ``part * W .. (part + 1) * W - 1`` (``W = 16 / PARTS``) of each block, with their x; bytes ``j`` and
    ``j + W / 2`` are decoded together (``_e2m1_two_bytes``)."""
    p = tl.zeros(base.shape, tl.float32)
    W: tl.constexpr = 16 // PARTS
    H: tl.constexpr = W // 2
    tl.static_assert(PARTS <= 8, "a part holds whole pairs of code bytes")
    for jj in tl.static_range(H):
        j = part * W + jj
        t = tl.load(base + 1 + j).to(tl.int32) | (tl.load(base + 1 + H + j).to(tl.int32) << 16)
        lo, hi = _e2m1_two_bytes(t)
        lo_a, lo_b = _halves(lo)
        hi_a, hi_b = _halves(hi)
        p += lo_a * x_at(xb, j)
        p += lo_b * x_at(xb, H + j)
        p += hi_a * x_at(xb, 16 + j)
        p += hi_b * x_at(xb, 16 + H + j)
    return (p * 32768.0) * block_scale(base)


@triton.jit
def _tile_byte(base, J: tl.constexpr, d, DT: tl.constexpr):
    lo, hi = _e2m1_pair(tl.load(base + 1 + J).to(tl.int32))
    return tl.join((lo * 32768.0) * d, (hi * 32768.0) * d).to(DT)


@triton.jit
def mxfp4_tile(base, u, magic, DT: tl.constexpr):
    """The weights as ``(BN, NB * 32)`` in ``DT``, in K's natural order (see ``legacy``)."""
    d = block_scale(base)
    w = j16(_tile_byte(base, 0, d, DT), _tile_byte(base, 1, d, DT), _tile_byte(base, 2, d, DT),
            _tile_byte(base, 3, d, DT), _tile_byte(base, 4, d, DT), _tile_byte(base, 5, d, DT),
            _tile_byte(base, 6, d, DT), _tile_byte(base, 7, d, DT), _tile_byte(base, 8, d, DT),
            _tile_byte(base, 9, d, DT), _tile_byte(base, 10, d, DT), _tile_byte(base, 11, d, DT),
            _tile_byte(base, 12, d, DT), _tile_byte(base, 13, d, DT), _tile_byte(base, 14, d, DT),
            _tile_byte(base, 15, d, DT))
    # axes (BN, NB, P, R, S, T, U) with value = (R + 2S + 4T + 8U) + 16 P: natural order is P, U, T, S, R
    return tl.reshape(tl.permute(w, (0, 1, 2, 6, 5, 4, 3)), (base.shape[0], base.shape[1] * 32))
