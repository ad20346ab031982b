"""Triton pieces shared by the block families: reading bytes and fp16 fields out of raw blocks.

A block's fp16 scale sits at an arbitrary byte offset (blocks are 17, 18, 22, 34 ... bytes long), so it is read as
two bytes and reassembled: little-endian ``lo | hi << 8`` bit-cast to fp16, then widened to fp32 (exact). Bytes are
widened to int32 at once, so later shifts never wrap. The ``masked_`` variants read 0 where ``mask`` is false.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _f16_bits(lo, hi):
    return (lo.to(tl.uint16) | (hi.to(tl.uint16) << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def load_f16(ptr):
    """The little-endian fp16 at byte pointer(s) ``ptr``, as fp32."""
    return _f16_bits(tl.load(ptr), tl.load(ptr + 1))


@triton.jit
def masked_f16(ptr, mask):
    return _f16_bits(tl.load(ptr, mask=mask, other=0), tl.load(ptr + 1, mask=mask, other=0))


@triton.jit
def load_bytes(ptr):
    """Bytes at ``ptr`` zero-extended to int32."""
    return tl.load(ptr).to(tl.int32)


@triton.jit
def masked_bytes(ptr, mask):
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


# --- decode (GEMV) helpers ------------------------------------------------------------------------------------------
#
# The decode kernels turn an unsigned bit field into a float without an int-to-float conversion: OR-ing an integer
# v < 2**23 into the bits of 2**23 (0x4B000000) gives the float 2**23 + v exactly, and subtracting 2**23 (plus any
# offset the format applies, folded into the same constant) leaves v - offset, exactly. A field sitting at bit s of
# a word is used in place, as v = q << s, and the 2**-s is applied once per block, not per value. So one value costs
# an AND-OR (one LOP3), an add and a fused multiply-add with x. MAGIC is passed as a kernel argument rather than
# written as a literal so that the compiler keeps it in a register and the field mask is the LOP3's immediate.
MAGIC_BITS = 0x4B000000
TWO23: tl.constexpr = tl.constexpr(8388608.0)


@triton.jit
def magic(bits, MAGIC, OFFSET: tl.constexpr):
    """``float(bits) - OFFSET`` for int32 ``bits`` below 2**23, exactly (``MAGIC`` = 0x4B000000)."""
    return (bits | MAGIC).to(tl.float32, bitcast=True) - (TWO23 + OFFSET)


@triton.jit
def unmagic(v, OFFSET: tl.constexpr):
    """``magic`` for bits already OR-ed with MAGIC (a field combined from two words: OR MAGIC into the smaller part
    first, so each combination stays one LOP3)."""
    return v.to(tl.float32, bitcast=True) - (TWO23 + OFFSET)


@triton.jit
def as_u16(ptr):
    """A byte pointer as a pointer to uint16 (the block fields used with it sit at even offsets)."""
    return ptr.to(tl.pointer_type(tl.uint16))


@triton.jit
def load_u16(ptr):
    """The little-endian uint16 at an even byte offset, as int32."""
    return tl.load(ptr).to(tl.int32)


@triton.jit
def f16_u16(ptr16):
    """The fp16 at a uint16 pointer, as fp32."""
    return tl.load(ptr16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def shift(v, N: tl.constexpr):
    """``v << N`` for a static ``N`` of either sign."""
    if N >= 0:
        r = v << N
    else:
        r = v >> (-N)
    return r


@triton.jit
def x_at(xb, OFF: tl.constexpr):
    """x values at offset ``OFF`` of each block or unit (``xb``: ``(1, NB)`` pointers), as fp32."""
    return tl.load(xb + OFF).to(tl.float32)
