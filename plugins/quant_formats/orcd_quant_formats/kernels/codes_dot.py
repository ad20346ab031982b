"""Batch matmul on a format's integer codes: ``out = x @ W.T`` for fp32 ``x`` and Q4_K or Q6_K ``W``, with
tensor-core dots whose weight operand is the blocks' codes as they stand.

Why: the tl.dot kernel (``matmul.qmm_kernel``) decodes fp32 weights and, for fp32 ``x``, keeps a high and a low
TF32 part of each (three products a term). Compiled for sm_90, its 32-row Q4_K launch takes 226 registers and
112 KiB of shared memory a program, and on an H100 a 32-stream decode step's matmuls ran at about 0.2 TB/s
(``docs/architecture.md``). Here a sub-block's ``sum_i w_i x_i`` is taken apart as llama.cpp's quantized matmuls
do: ``sum_i ((d sc) q_i - dmin m) x_i = (d sc) sum_i q_i x_i - (dmin m) sum_i x_i`` (Q6_K: ``d sc`` per 16 values,
no min). The codes (Q4_K 0..15, Q6_K -32..31) are exact in fp16, so the dot multiplies them as fp16 by x cut into
two fp16 parts, after scaling each (row, 32 values) of x by a power of two that puts its largest value near 2**14
(no overflow, no subnormal low parts); the scale (and min) of the sub-block are applied to the dot's fp32 result.
x is scaled and cut once per call (``split_x``, as llama.cpp quantizes x to q8_1 once), not once per weight tile.
Every product is exact and x keeps 22 of its 24 bits (relative to its sub-block's largest value), so the result is
within fp32 rounding of the reference dequantize-then-matmul.

Not yet timed on a GPU: ``Config(codes=True)`` selects it (a tuning-table entry or a sweep), never the rule.
"""

from __future__ import annotations

import gguf
import torch
import triton
import triton.language as tl

from orcd_quant_formats.kernels.common import as_u16, f16_u16, load_bytes
from orcd_quant_formats.kernels.kquants import scale_min

T = gguf.GGMLQuantizationType
QK_K = 256


@triton.jit
def _pow2_scales(x):
    """Per row of ``x (BM, 32)``: ``(f, 1 / f)``, powers of two with ``max |x| * f`` in ``[2**14, 2**15)``
    (1 for an all-zero row), as fp32 ``(BM,)``."""
    amax = tl.max(tl.abs(x), axis=1)
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 255  # biased exponent of the row's largest magnitude
    e = tl.where(amax > 0, e, 127 + 14)
    up = tl.minimum(tl.maximum(127 + 14 - (e - 127), 1), 254)
    down = tl.minimum(tl.maximum(127 - 14 + (e - 127), 1), 254)
    return (up << 23).to(tl.float32, bitcast=True), (down << 23).to(tl.float32, bitcast=True)


@triton.jit
def split_x_kernel(x_ptr, hi_ptr, lo_ptr, inv_ptr, sum_ptr, K, stride_xm, SB: tl.constexpr):
    """Row ``program_id(0)`` of x, sub-blocks ``SB * program_id(1) ..`` (32 values each): each scaled by its power of
    two (``_pow2_scales``) and cut into fp16 ``hi`` and ``lo`` (``(M, K)``), with ``1 / f`` and the unscaled sum
    of the sub-block (``(M, K / 32)`` fp32): once per x, not once per weight tile."""
    row = tl.program_id(0).to(tl.int64)
    blocks = tl.program_id(1) * SB + tl.arange(0, SB)
    ok = blocks < K // 32
    offs = blocks[:, None] * 32 + tl.arange(0, 32)[None, :]
    x = tl.load(x_ptr + row * stride_xm + offs, mask=ok[:, None], other=0.0)
    f, inv = _pow2_scales(x)
    xs = x * f[:, None]
    hi = xs.to(tl.float16)
    tl.store(hi_ptr + row * K + offs, hi, mask=ok[:, None])
    tl.store(lo_ptr + row * K + offs, (xs - hi.to(tl.float32)).to(tl.float16), mask=ok[:, None])
    tl.store(inv_ptr + row * (K // 32) + blocks, inv, mask=ok)
    tl.store(sum_ptr + row * (K // 32) + blocks, tl.sum(x, axis=1), mask=ok)


@triton.jit
def _sub_block(q, hi_rows, lo_rows, inv_rows, sum_rows, k0, j):
    """``(sum_i q_i x_i, sum_i x_i)`` of the sub-block at x index ``k0`` for codes ``q (BN, 32)`` (fp16) and every
    row of x: ``(BN, BM)`` and ``(BM,)`` fp32. Two tensor-core dots on the split x, scaled back."""
    hi = tl.load(hi_rows[:, None] + k0 + j[None, :])
    lo = tl.load(lo_rows[:, None] + k0 + j[None, :])
    s = tl.dot(q, tl.trans(hi))
    s = tl.dot(q, tl.trans(lo), s)
    return s * tl.load(inv_rows + k0 // 32)[None, :], tl.load(sum_rows + k0 // 32)


@triton.jit
def q4_k_codes_kernel(hi_ptr, lo_ptr, inv_ptr, sum_ptr, w_ptr, out_ptr, M, N, K, stride_wn, stride_om,
                      BM: tl.constexpr, BN: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    w_rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64) * stride_wn  # rows past N re-read the last, unstored
    m = tl.minimum(offs_m, M - 1).to(tl.int64)
    hi_rows = hi_ptr + m * K
    lo_rows = lo_ptr + m * K
    inv_rows = inv_ptr + m * (K // 32)
    sum_rows = sum_ptr + m * (K // 32)
    j = tl.arange(0, 32)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    # one unit (64 values: code bytes 32u'..32u'+31 of its super-block, low nibbles sub-block 2u', high 2u' + 1) a
    # step, not unrolled: unrolled over a super-block, sm_90 code spilled 792 bytes a thread
    for u in range(0, K // 64):
        block = w_rows + (u // 4) * 144
        s = u % 4
        d = f16_u16(as_u16(block))
        dmin = f16_u16(as_u16(block) + 1)
        codes = load_bytes(block[:, None] + 16 + 32 * s + j[None, :])
        sa, xa = _sub_block((codes & 15).to(tl.float16), hi_rows, lo_rows, inv_rows, sum_rows, 64 * u, j)
        sb, xb = _sub_block((codes >> 4).to(tl.float16), hi_rows, lo_rows, inv_rows, sum_rows, 64 * u + 32, j)
        sc_a, mn_a = scale_min(block, 2 * s)
        sc_b, mn_b = scale_min(block, 2 * s + 1)
        acc += (d * sc_a)[:, None] * sa - (dmin * mn_a)[:, None] * xa[None, :]
        acc += (d * sc_b)[:, None] * sb - (dmin * mn_b)[:, None] * xb[None, :]
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    tl.store(out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _half_dot(q, hi_rows, lo_rows, inv_rows, k0, j):
    """``sum_i q_i x_i`` over the 16 values at x index ``k0`` for codes ``q (BN, 16)`` (fp16): ``(BN, BM)`` fp32."""
    hi = tl.load(hi_rows[:, None] + k0 + j[None, :])
    lo = tl.load(lo_rows[:, None] + k0 + j[None, :])
    s = tl.dot(q, tl.trans(hi))
    s = tl.dot(q, tl.trans(lo), s)
    return s * tl.load(inv_rows + k0 // 32)[None, :]


@triton.jit
def _q6_codes(block, h, t, i):
    """Q6_K codes minus 32 (-32..31, exact in fp16) of values ``128 h + 32 t + i`` (``i (16,)``) of each row's
    ``block``, as ``(BN, 16)`` fp16: low 4 bits in nibble ``t // 2`` of ``ql[64 h + 32 (t % 2) + i]``, high 2 bits at
    bit ``2 t`` of ``qh[32 h + i]`` (gguf's layout)."""
    ql = load_bytes(block[:, None] + 64 * h + 32 * (t % 2) + i[None, :])
    qh = load_bytes(block[:, None] + 128 + 32 * h + i[None, :])
    low = (ql >> (4 * (t // 2))) & 15
    return ((low | (((qh >> (2 * t)) & 3) << 4)) - 32).to(tl.float16)


@triton.jit
def q6_k_codes_kernel(hi_ptr, lo_ptr, inv_ptr, w_ptr, out_ptr, M, N, K, stride_wn, stride_om,
                      BM: tl.constexpr, BN: tl.constexpr):
    """As ``q4_k_codes_kernel`` for Q6_K (210-byte super-blocks; an int8 scale per 16 values, no min): a step is
    32 values (one field of a half), two dots of 16."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    w_rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64) * stride_wn
    m = tl.minimum(offs_m, M - 1).to(tl.int64)
    hi_rows = hi_ptr + m * K
    lo_rows = lo_ptr + m * K
    inv_rows = inv_ptr + m * (K // 32)
    i = tl.arange(0, 16)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for u in range(0, K // 32):
        block = w_rows + (u // 8) * 210
        h = (u % 8) // 4
        t = u % 4
        d = f16_u16(as_u16(block + 208))
        sc0 = tl.load(block + 192 + 8 * h + 2 * t).to(tl.int8, bitcast=True).to(tl.float32)
        sc1 = tl.load(block + 193 + 8 * h + 2 * t).to(tl.int8, bitcast=True).to(tl.float32)
        s0 = _half_dot(_q6_codes(block, h, t, i), hi_rows, lo_rows, inv_rows, 32 * u, i)
        s1 = _half_dot(_q6_codes(block, h, t, i + 16), hi_rows, lo_rows, inv_rows, 32 * u + 16, i)
        acc += (d * sc0)[:, None] * s0 + (d * sc1)[:, None] * s1
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    tl.store(out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


SPLIT_SUB_BLOCKS = 8  # sub-blocks of x per program of split_x_kernel


def split_x(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``x (M, K)`` fp32 as ``split_x_kernel`` leaves it: ``(hi, lo, inv, sums)``."""
    M, K = x.shape
    hi = torch.empty((M, K), dtype=torch.float16, device=x.device)
    lo = torch.empty_like(hi)
    inv = torch.empty((M, K // 32), dtype=torch.float32, device=x.device)
    sums = torch.empty_like(inv)
    split_x_kernel[(M, triton.cdiv(K // 32, SPLIT_SUB_BLOCKS))](x, hi, lo, inv, sums, K, x.stride(0),
                                                               SB=SPLIT_SUB_BLOCKS)
    return hi, lo, inv, sums


# ggml type -> (super-block bytes, kernel, whether it takes the sub-blocks' sums of x)
KERNELS = {int(T.Q4_K): (144, q4_k_codes_kernel, True), int(T.Q6_K): (210, q6_k_codes_kernel, False)}


def codes_linear(x: torch.Tensor, data: torch.Tensor, ggml_type: int, N: int, K: int, bm: int = 32, bn: int = 64,
                 warps: int = 4, stages: int = 2) -> torch.Tensor:
    """``x (M, K)`` fp32 times the rows ``data (N, K / 256 * block bytes)`` of a K-quant in ``KERNELS``,
    transposed: ``(M, N)`` fp32."""
    if ggml_type not in KERNELS:
        raise ValueError(f"no code dot for ggml type {ggml_type}")
    block_bytes, kernel, sums = KERNELS[ggml_type]
    if x.dtype != torch.float32 or K % QK_K or data.shape[-1] != K // QK_K * block_bytes:
        raise ValueError(f"the code dot takes fp32 x and rows of a multiple of {QK_K} values")
    M = x.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    hi, lo, inv, total = split_x(x)
    parts = (hi, lo, inv, total) if sums else (hi, lo, inv)
    kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](*parts, data, out, M, N, K, data.stride(0), out.stride(0),
                                                     BM=bm, BN=bn, num_warps=warps, num_stages=stages)
    return out
