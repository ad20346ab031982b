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
