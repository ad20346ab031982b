"""Triton pieces shared by the block families and the kernels: the ggml type constants the kernels dispatch on,
reading block fields, decoding codes without conversions, and assembling tiles.

Decoding: OR-ing an unsigned integer v < 2**23 into the bits of 2**23 (0x4B000000) gives the float 2**23 + v
exactly; subtracting 2**23 (plus any offset the format applies, folded into the same constant) leaves v - offset,
exactly. A code sitting at bit s of a word is used in place, as v = q << s, and the 2**-s is folded into the block
scale. So a value costs an AND-OR (one LOP3) and an add, with no int-to-float conversion. ``MAGIC`` is a kernel
argument turned into a per-thread register (see the kernels): the compiler then keeps the field mask as the LOP3's
immediate.

Block fields sit at even byte offsets in every format but MXFP4 (blocks of 18, 20, 22, 24, 34, 144, 176, 210
bytes), so they are read as uint16 words: fp16 scales whole, codes two bytes at a time.
"""

from __future__ import annotations

import gguf
import triton
import triton.language as tl

MAGIC_BITS = 0x4B000000
TWO23: tl.constexpr = tl.constexpr(8388608.0)

# The ggml types as the kernels' ``FMT`` compares them
_T = gguf.GGMLQuantizationType
FMT_Q4_0 = tl.constexpr(int(_T.Q4_0))
FMT_Q4_1 = tl.constexpr(int(_T.Q4_1))
FMT_Q5_0 = tl.constexpr(int(_T.Q5_0))
FMT_Q5_1 = tl.constexpr(int(_T.Q5_1))
FMT_Q8_0 = tl.constexpr(int(_T.Q8_0))
FMT_Q4_K = tl.constexpr(int(_T.Q4_K))
FMT_Q5_K = tl.constexpr(int(_T.Q5_K))
FMT_Q6_K = tl.constexpr(int(_T.Q6_K))
FMT_MXFP4 = tl.constexpr(int(_T.MXFP4))


@triton.jit
def unmagic(v, OFFSET: tl.constexpr):
    """``float(q << s) - OFFSET`` for ``v = (q << s) | MAGIC`` with ``q << s`` below 2**23, exactly."""
    return v.to(tl.float32, bitcast=True) - (TWO23 + OFFSET)


@triton.jit
def as_u16(ptr):
    """A byte pointer as a pointer to uint16 (for fields at even offsets)."""
    return ptr.to(tl.pointer_type(tl.uint16))


@triton.jit
def load_u16(ptr16):
    """The little-endian uint16 at ``ptr16``, as int32."""
    return tl.load(ptr16).to(tl.int32)


@triton.jit
def f16_u16(ptr16):
    """The fp16 at ``ptr16``, as fp32."""
    return tl.load(ptr16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def load_bytes(ptr):
    """Bytes at ``ptr`` zero-extended to int32."""
    return tl.load(ptr).to(tl.int32)


@triton.jit
def shift(v, N: tl.constexpr):
    """``v << N`` for a static ``N`` of either sign."""
    if N >= 0:
        r = v << N
    else:
        r = v >> (-N)
    return r


@triton.jit
def x_at(xb, off):
    """x at offset ``off`` (static, or a tensor) from each block's pointer in ``xb``, as fp32."""
    return tl.load(xb + off).to(tl.float32)


@triton.jit
def j4(a, b, c, d):
    """Four same-shaped tensors joined along two new minor axes (``(..., 2, 2)``)."""
    return tl.join(tl.join(a, b), tl.join(c, d))


@triton.jit
def j16(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15):
    return j4(j4(a0, a1, a2, a3), j4(a4, a5, a6, a7), j4(a8, a9, a10, a11), j4(a12, a13, a14, a15))
