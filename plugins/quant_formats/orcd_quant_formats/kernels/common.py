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


@triton.jit
def block_rows(pid_m, M, block_expert_ptr, block_start_ptr, block_end_ptr, sorted_ptr, BM: tl.constexpr,
               X_DIV: tl.constexpr, GROUPED: tl.constexpr):
    """The ``BM`` rows of x of block ``pid_m``, for the tile kernels: ``(x rows, output rows, which exist, expert,
    whether the block has any row)``. Plain: rows ``pid_m * BM ..`` (rows past ``M`` re-read the last one and are
    not stored). ``GROUPED``: entry ``pid_m`` of the expert block table (``matmul.expert_blocks``), pairs of one
    expert, pair ``p`` reading x row ``p // X_DIV``."""
    offs_m = tl.arange(0, BM)
    if GROUPED:
        expert = tl.load(block_expert_ptr + pid_m)
        p_lo = tl.load(block_start_ptr + pid_m)
        p_hi = tl.load(block_end_ptr + pid_m)
        m_ok = p_lo + offs_m < p_hi
        pair = tl.load(sorted_ptr + p_lo + offs_m, mask=m_ok, other=0)
        x_rows = pair // X_DIV
        o_rows = pair
        live = p_hi > p_lo
    else:
        expert = 0
        o_rows = pid_m * BM + offs_m
        x_rows = tl.minimum(o_rows, M - 1)
        m_ok = o_rows < M
        live = M > 0
    return x_rows, o_rows, m_ok, expert, live


@triton.jit
def store_tile(acc, out_ptr, bias_ptr, o_rows, m_ok, offs_n, expert, pid_k, N, stride_om, part_stride,
               HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, PARTIAL: tl.constexpr):
    """Store a tile kernel's ``acc (BN, BM)`` (weight rows ``offs_n`` x output rows ``o_rows``): fp32 partial sums
    of split ``pid_k`` (``PARTIAL``; bias added after the reduction), else plus the bias (the expert's, ``GROUPED``)
    in the output's dtype."""
    n_ok = offs_n < N
    mask = n_ok[:, None] & m_ok[None, :]
    if PARTIAL:
        ptrs = out_ptr + pid_k.to(tl.int64) * part_stride + o_rows[None, :].to(tl.int64) * N + offs_n[:, None]
        tl.store(ptrs, acc, mask=mask)
    else:
        if HAS_BIAS:
            if GROUPED:
                bias = tl.load(bias_ptr + expert.to(tl.int64) * N + offs_n, mask=n_ok, other=0.0)
            else:
                bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)
            acc += bias.to(tl.float32)[:, None]
        ptrs = out_ptr + o_rows[None, :].to(tl.int64) * stride_om + offs_n[:, None]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
