"""Weight tiles of MXFP4 (layout in ``..mxfp4``): ``G`` half-blocks of 16 values per row, fp32 ``(BN, G, 16)``.

The E2M1 code is decoded arithmetically rather than through a table: magnitude code ``c`` (3 bits) is ggml's doubled
value ``c`` for ``c < 2`` and ``(2 + (c & 1)) << ((c >> 1) - 1)`` otherwise (2, 3, 4, 6, 8, 12); bit 3 is the sign.
The shared scale ``2**(e - 128)`` is built as float32 bits exactly as the torch dequantizer does, so tiles are
bit-exact with gguf, including ``inf`` for the largest exponents.

Decode (``mxfp4_dot``) reads the 16 code bytes one by one (17-byte blocks leave them at odd offsets) and turns a
code into fp16 bits directly: magnitude bits to 9-11, sign to 15 (both codes of a byte at once). That fp16 is the E2M1 value times 2**-14 for
every code, subnormals included, so ``2**15`` times it is ggml's doubled value; the factor and the block scale are
applied once per block.
"""

from __future__ import annotations

import triton
import triton.language as tl

from orcd_quant_formats.kernels.common import masked_bytes, x_at
from orcd_quant_formats.kernels.legacy import half_blocks, nibbles


@triton.jit
def mxfp4_tile(w_ptr, row_off, k0, K, G: tl.constexpr):
    block, half, valid = half_blocks(w_ptr, row_off, k0, K, 17, G)
    code = nibbles(block, 1, half, valid)
    exp = (code >> 1) & 3
    mant = code & 1
    mag = tl.where(exp == 0, mant, (2 + mant) << tl.maximum(exp - 1, 0))
    value = tl.where(code >= 8, -mag, mag)
    e = masked_bytes(block, valid)
    scale = tl.where(e < 2, (e + 1) << 21, (e - 1) << 23).to(tl.float32, bitcast=True)
    return value.to(tl.float32) * scale


@triton.jit
def _e2m1_pair(b):
    """Both codes of byte ``b`` (low nibble: value j, high nibble: value j + 16) as fp32 E2M1 * 2**-14.

    One int32 holds the two fp16 bit patterns (low code in bits 0-15, high code in 16-31): multiplying the
    magnitude bits ``b & 0x77`` by ``2**9 + 2**21`` and the sign bits ``b & 0x88`` by ``2**12 + 2**24`` places
    copies of every bit where one of the halves wants it (the copies never overlap, so no carries), and a mask keeps
    those."""
    bits = (((b & 0x77) * 0x200200) & 0x0E000E00) | (((b & 0x88) * 0x1001000) & -0x7FFF8000)  # 0x80008000
    lo = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (bits >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def mxfp4_dot(base, u, xb, MAGIC):
    p = tl.zeros(base.shape, tl.float32)
    for j in tl.static_range(16):
        lo, hi = _e2m1_pair(tl.load(base + 1 + j).to(tl.int32))
        p += lo * x_at(xb, j)
        p += hi * x_at(xb, 16 + j)
    e = tl.load(base).to(tl.int32)
    scale = tl.where(e < 2, (e + 1) << 21, (e - 1) << 23).to(tl.float32, bitcast=True)
    return (p * 32768.0) * scale
