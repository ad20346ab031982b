"""The decode kernel: ``out = x @ W.T (+ bias)`` for a few rows of ``x`` (up to 8), bound by reading ``W`` once.

A program owns ``BN`` weight rows and walks ``K`` ``NB`` parts at a time: a unit is a block (32 values) of the legacy
formats and MXFP4, a quarter of a super-block (64 values) of the K-quants, and it is cut into ``PARTS`` parts of
consecutive code words, so that neighbouring lanes read neighbouring bytes of codes and of x (with whole units per
lane, a warp's load of x touches 32 cache lines, and L1 serves it one line at a time). Each step is a grid of
``BN * NB`` (row, part) pairs held as one 1-D axis, pair ``p`` = row ``p // NB``, part ``p % NB``, and every
quantity in it (the
block's codes word by word, its scales, the running sums, the x values of its unit) has that shape. A 1-D tensor has
one register layout, so nothing is moved through shared memory (with a 2-D grid, Triton versions break the tie
between two equally non-contiguous axes differently, and the wrong guess moves every decoded value through shared
memory). Consecutive lanes take consecutive parts of a row, and a thread holds several rows of its part: their x
loads are the same addresses, loaded once. The format's ``*_dot`` function returns each pair's dot product with one
row of ``x`` (fp32 throughout); the sums stay per pair until the end, when each row's are added.

Units past the end of a program's range are clamped to the last valid one (no masked loads in the loop) and their
products discarded. The same grouping of (token, expert) pairs as ``matmul`` serves mixture-of-experts.
"""

from __future__ import annotations

import triton
import triton.language as tl

from orcd_quant_formats.kernels.common import (
    FMT_MXFP4, FMT_Q4_0, FMT_Q4_1, FMT_Q4_K, FMT_Q5_0, FMT_Q5_1, FMT_Q5_K, FMT_Q6_K, FMT_Q8_0,
)
from orcd_quant_formats.kernels.kquants import q4_k_dot, q5_k_dot, q6_k_dot
from orcd_quant_formats.kernels.legacy import q4_0_dot, q4_1_dot, q5_0_dot, q5_1_dot, q8_0_dot
from orcd_quant_formats.kernels.mxfp4 import mxfp4_dot


@triton.jit
def block_dot(FMT: tl.constexpr, base, u, xb, MAGIC, part, PARTS: tl.constexpr):
    """Per (row, unit) pair: ``sum w x`` over part ``part`` of ``PARTS`` of the unit (fp32); ``base`` points at the
    blocks, ``u`` is the unit in the block (K-quants: 0..3), ``xb`` points at x for the block's first value."""
    if FMT == FMT_Q4_0:
        r = q4_0_dot(base, u, xb, MAGIC, part, PARTS)
    elif FMT == FMT_Q4_1:
        r = q4_1_dot(base, u, xb, MAGIC, part, PARTS)
    elif FMT == FMT_Q5_0:
        r = q5_0_dot(base, u, xb, MAGIC, part, PARTS)
    elif FMT == FMT_Q5_1:
        r = q5_1_dot(base, u, xb, MAGIC, part, PARTS)
    elif FMT == FMT_Q8_0:
        r = q8_0_dot(base, u, xb, MAGIC, part, PARTS)
    elif FMT == FMT_Q4_K:
        r = q4_k_dot(base, u, xb, MAGIC, part, PARTS)
    elif FMT == FMT_Q5_K:
        r = q5_k_dot(base, u, xb, MAGIC, part, PARTS)
    elif FMT == FMT_Q6_K:
        r = q6_k_dot(base, u, xb, MAGIC, part, PARTS)
    else:
        tl.static_assert(FMT == FMT_MXFP4, "no decode function for this ggml type")
        r = mxfp4_dot(base, u, xb, MAGIC, part, PARTS)
    return r


@triton.jit
def _row(i: tl.constexpr, pid_m, M, sorted_ptr, p_lo, p_hi, BM: tl.constexpr, X_DIV: tl.constexpr,
         GROUPED: tl.constexpr):
    """Row ``i`` of this program's block of x rows: (x row, output row, whether it exists), scalars. A missing row
    reads a valid row (its result is not stored)."""
    if GROUPED:
        ok = p_lo + i < p_hi
        pair = tl.load(sorted_ptr + p_lo + i, mask=ok, other=0)
        x_row = pair // X_DIV
        o_row = pair
    else:
        o_row = pid_m * BM + i
        ok = o_row < M
        x_row = tl.minimum(o_row, M - 1)
    return x_row, o_row, ok


@triton.jit
def _store_row(acc, o_row, ok, bias, out_ptr, offs_n, N, stride_om, pid_k, part_stride, PARTIAL: tl.constexpr):
    y = tl.sum(tl.reshape(acc, (offs_n.shape[0], acc.shape[0] // offs_n.shape[0])), axis=1)
    n_lim = tl.where(ok, N, 0)  # one comparison for the mask (the interpreter rejects scalar & tensor masks)
    if PARTIAL:
        tl.store(out_ptr + pid_k.to(tl.int64) * part_stride + o_row.to(tl.int64) * N + offs_n, y,
                 mask=offs_n < n_lim)
    else:
        y += bias
        tl.store(out_ptr + o_row.to(tl.int64) * stride_om + offs_n, y.to(out_ptr.dtype.element_ty),
                 mask=offs_n < n_lim)


@triton.jit
def gemv_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    block_expert_ptr, block_start_ptr, block_end_ptr, sorted_ptr,
    M, N, K, stride_xm, stride_wn, stride_we, stride_om, chunk_units, part_stride, MAGIC,
    FMT: tl.constexpr, QK: tl.constexpr, TYPE_SIZE: tl.constexpr, UNITS: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, NB: tl.constexpr, GROUPED: tl.constexpr, X_DIV: tl.constexpr, HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr, PARTS: tl.constexpr,
):
    tl.static_assert(BM <= 8, "the decode kernel takes at most 8 rows of x per program")
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    pair = tl.arange(0, BN * NB)
    row_off = tl.minimum(pid_n * BN + pair // NB, N - 1).to(tl.int64) * stride_wn
    b_start = pid_k * chunk_units
    b_end = tl.minimum(K // QK * UNITS * PARTS, b_start + chunk_units)
    if GROUPED:
        expert = tl.load(block_expert_ptr + pid_m)
        p_lo = tl.load(block_start_ptr + pid_m)
        p_hi = tl.load(block_end_ptr + pid_m)
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        b_end = tl.where(p_hi > p_lo, b_end, b_start)  # an unused block of pairs runs no steps
    else:
        expert = 0
        p_lo = 0
        p_hi = 0
        w_base = w_ptr
    xr0, o0, ok0 = _row(0, pid_m, M, sorted_ptr, p_lo, p_hi, BM, X_DIV, GROUPED)
    xr1, o1, ok1 = _row(1, pid_m, M, sorted_ptr, p_lo, p_hi, BM, X_DIV, GROUPED)
    xr2, o2, ok2 = _row(2, pid_m, M, sorted_ptr, p_lo, p_hi, BM, X_DIV, GROUPED)
    xr3, o3, ok3 = _row(3, pid_m, M, sorted_ptr, p_lo, p_hi, BM, X_DIV, GROUPED)
    xr4, o4, ok4 = _row(4, pid_m, M, sorted_ptr, p_lo, p_hi, BM, X_DIV, GROUPED)
    xr5, o5, ok5 = _row(5, pid_m, M, sorted_ptr, p_lo, p_hi, BM, X_DIV, GROUPED)
    xr6, o6, ok6 = _row(6, pid_m, M, sorted_ptr, p_lo, p_hi, BM, X_DIV, GROUPED)
    xr7, o7, ok7 = _row(7, pid_m, M, sorted_ptr, p_lo, p_hi, BM, X_DIV, GROUPED)
    x0 = x_ptr + xr0.to(tl.int64) * stride_xm
    x1 = x_ptr + xr1.to(tl.int64) * stride_xm
    x2 = x_ptr + xr2.to(tl.int64) * stride_xm
    x3 = x_ptr + xr3.to(tl.int64) * stride_xm
    x4 = x_ptr + xr4.to(tl.int64) * stride_xm
    x5 = x_ptr + xr5.to(tl.int64) * stride_xm
    x6 = x_ptr + xr6.to(tl.int64) * stride_xm
    x7 = x_ptr + xr7.to(tl.int64) * stride_xm

    acc0 = tl.zeros((BN * NB,), dtype=tl.float32)
    acc1 = tl.zeros((BN * NB,), dtype=tl.float32)
    acc2 = tl.zeros((BN * NB,), dtype=tl.float32)
    acc3 = tl.zeros((BN * NB,), dtype=tl.float32)
    acc4 = tl.zeros((BN * NB,), dtype=tl.float32)
    acc5 = tl.zeros((BN * NB,), dtype=tl.float32)
    acc6 = tl.zeros((BN * NB,), dtype=tl.float32)
    acc7 = tl.zeros((BN * NB,), dtype=tl.float32)
    for b0 in range(b_start, b_end, NB):
        parts = b0 + pair % NB
        inside = parts < b_end
        parts = tl.minimum(parts, b_end - 1)
        part = parts % PARTS
        units = parts // PARTS
        blocks = units // UNITS
        u = units % UNITS
        base = w_base + row_off + blocks * TYPE_SIZE
        xoff = blocks * QK
        # MAGIC as a per-thread register: a uniform one cannot share a LOP3 with a field mask
        magic = tl.where(units >= 0, MAGIC, 0)
        acc0 += tl.where(inside, block_dot(FMT, base, u, x0 + xoff, magic, part, PARTS), 0.0)
        if BM > 1:
            acc1 += tl.where(inside, block_dot(FMT, base, u, x1 + xoff, magic, part, PARTS), 0.0)
        if BM > 2:
            acc2 += tl.where(inside, block_dot(FMT, base, u, x2 + xoff, magic, part, PARTS), 0.0)
        if BM > 3:
            acc3 += tl.where(inside, block_dot(FMT, base, u, x3 + xoff, magic, part, PARTS), 0.0)
        if BM > 4:
            acc4 += tl.where(inside, block_dot(FMT, base, u, x4 + xoff, magic, part, PARTS), 0.0)
        if BM > 5:
            acc5 += tl.where(inside, block_dot(FMT, base, u, x5 + xoff, magic, part, PARTS), 0.0)
        if BM > 6:
            acc6 += tl.where(inside, block_dot(FMT, base, u, x6 + xoff, magic, part, PARTS), 0.0)
        if BM > 7:
            acc7 += tl.where(inside, block_dot(FMT, base, u, x7 + xoff, magic, part, PARTS), 0.0)

    bias = tl.zeros((BN,), dtype=tl.float32)
    if HAS_BIAS and not PARTIAL:
        n_ok = offs_n < N
        if GROUPED:
            bias = tl.load(bias_ptr + expert.to(tl.int64) * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        else:
            bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    _store_row(acc0, o0, ok0, bias, out_ptr, offs_n, N, stride_om, pid_k, part_stride, PARTIAL)
    if BM > 1:
        _store_row(acc1, o1, ok1, bias, out_ptr, offs_n, N, stride_om, pid_k, part_stride, PARTIAL)
    if BM > 2:
        _store_row(acc2, o2, ok2, bias, out_ptr, offs_n, N, stride_om, pid_k, part_stride, PARTIAL)
    if BM > 3:
        _store_row(acc3, o3, ok3, bias, out_ptr, offs_n, N, stride_om, pid_k, part_stride, PARTIAL)
    if BM > 4:
        _store_row(acc4, o4, ok4, bias, out_ptr, offs_n, N, stride_om, pid_k, part_stride, PARTIAL)
    if BM > 5:
        _store_row(acc5, o5, ok5, bias, out_ptr, offs_n, N, stride_om, pid_k, part_stride, PARTIAL)
    if BM > 6:
        _store_row(acc6, o6, ok6, bias, out_ptr, offs_n, N, stride_om, pid_k, part_stride, PARTIAL)
    if BM > 7:
        _store_row(acc7, o7, ok7, bias, out_ptr, offs_n, N, stride_om, pid_k, part_stride, PARTIAL)
