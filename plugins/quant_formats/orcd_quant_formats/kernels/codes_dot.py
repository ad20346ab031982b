"""Batch matmul on a format's integer codes: ``out = x @ W.T (+ bias)`` for fp32 ``x``, with tensor-core dots whose
weight operand is the blocks' codes as they stand. Formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, MXFP4 (32-value blocks
with one scale, and a min for Q4_1 and Q5_1), Q4_K and Q6_K; plain or grouped by expert (``GROUPED``, the block
table of ``matmul.expert_blocks``), whole or split along K (``PARTIAL``: fp32 partial sums that the launcher adds).

Why: the tl.dot kernel (``matmul.qmm_kernel``) decodes fp32 weights and, for fp32 ``x``, keeps a high and a low
TF32 part of each (three products a term). Compiled for sm_90, its 32-row Q4_K launch takes 226 registers and
112 KiB of shared memory a program, and on an H100 a 32-stream decode step's matmuls ran at about 0.2 to 0.3 TB/s
(``docs/architecture.md``). Here a block's ``sum_i w_i x_i`` is taken apart as llama.cpp's quantized matmuls
do: ``sum_i (d q_i + m) x_i = d sum_i q_i x_i + m sum_i x_i`` per block (Q4_K: per 32-value sub-block, ``d sc`` and
``-dmin m``; Q6_K: ``d sc`` per 16 values; Q4_0, Q5_0, Q8_0, MXFP4: no min). The codes (Q4_0 -8..7, Q4_1 0..15,
Q5_0 -16..15, Q5_1 0..31, Q8_0 -128..127, MXFP4 twice its E2M1 value, -12..12 as ggml stores it, Q4_K 0..15,
Q6_K -32..31) are exact in fp16, so the dot multiplies them as fp16 by x cut into two fp16 parts, after scaling
each (row, 32 values) of x by a power of two that puts its largest value near 2**14 (no overflow, no subnormal low
parts); the block's scale (and min) are applied to the dot's fp32 result. x is scaled and cut once per call
(``split_x``, as llama.cpp quantizes x to q8_1 once), not once per weight tile. Every product is exact and x keeps
22 of its 24 bits (relative to its block's largest value), so the result is within fp32 rounding of the reference
dequantize-then-matmul.

Not yet timed on a GPU: ``Config(codes=True)`` selects it (a tuning-table entry or a sweep), never the rule.
"""

from __future__ import annotations

import gguf
import torch
import triton
import triton.language as tl

from orcd_quant_formats.kernels.common import (
    FMT_MXFP4, FMT_Q4_0, FMT_Q4_1, FMT_Q4_K, FMT_Q5_0, FMT_Q5_1, FMT_Q6_K, FMT_Q8_0, as_u16, block_rows, f16_u16,
    load_bytes, load_u16, store_tile,
)
from orcd_quant_formats.kernels.kquants import scale_min
from orcd_quant_formats.kernels.mxfp4 import block_scale

T = gguf.GGMLQuantizationType


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
def _scaled_dot(q, hi_rows, lo_rows, inv_rows, k0, j):
    """``sum_i q_i x_i`` over the values at x index ``k0 + j`` (within one 32-value block of x's scales) for codes
    ``q (BN, len(j))`` (fp16) and every row of x: ``(BN, BM)`` fp32. Two tensor-core dots on the split x, scaled
    back."""
    hi = tl.load(hi_rows[:, None] + k0 + j[None, :])
    lo = tl.load(lo_rows[:, None] + k0 + j[None, :])
    s = tl.dot(q, tl.trans(hi))
    s = tl.dot(q, tl.trans(lo), s)
    return s * tl.load(inv_rows + k0 // 32)[None, :]


@triton.jit
def _nibbles(qs, j):
    """4-bit codes of values ``j`` (0..31) of each row's block whose 16 code bytes start at ``qs``: value ``j`` is
    the low nibble of byte ``j`` for ``j < 16``, the high nibble of byte ``j - 16`` after (gguf's layout), int32."""
    return (load_bytes(qs[:, None] + (j % 16)[None, :]) >> (4 * (j // 16))[None, :]) & 15


@triton.jit
def _high_bits(qh16, j):
    """Bit ``j`` of the little-endian uint32 at ``qh16`` (two uint16 words) of each row, moved to bit 4: Q5's fifth
    bits."""
    qh = load_u16(qh16) | (load_u16(qh16 + 1) << 16)
    return ((qh[:, None] >> j[None, :]) & 1) << 4


@triton.jit
def _e2m1_doubled(n):
    """ggml's MXFP4 code values (twice E2M1: 0, 1, 2, 3, 4, 6, 8, 12 and their negatives) of 4-bit codes ``n``."""
    mag = n & 7
    v = tl.where(mag < 2, mag, (2 + (mag & 1)) << tl.maximum((mag >> 1) - 1, 0))
    return tl.where((n & 8) != 0, -v, v)


@triton.jit
def _block32_codes(FMT: tl.constexpr, block, j):
    """``(codes (BN, 32) fp16, d (BN,), m (BN,))`` of each row's 32-value block: ``w = d * code + m`` (``m`` 0 where
    the format has no min)."""
    zero = tl.zeros(block.shape, tl.float32)
    if FMT == FMT_Q4_0:
        q = _nibbles(block + 2, j) - 8
        d = f16_u16(as_u16(block))
        m = zero
    elif FMT == FMT_Q4_1:
        q = _nibbles(block + 4, j)
        d = f16_u16(as_u16(block))
        m = f16_u16(as_u16(block) + 1)
    elif FMT == FMT_Q5_0:
        q = (_nibbles(block + 6, j) | _high_bits(as_u16(block + 2), j)) - 16
        d = f16_u16(as_u16(block))
        m = zero
    elif FMT == FMT_Q5_1:
        q = _nibbles(block + 8, j) | _high_bits(as_u16(block + 4), j)
        d = f16_u16(as_u16(block))
        m = f16_u16(as_u16(block) + 1)
    elif FMT == FMT_Q8_0:
        q = tl.load(block[:, None] + 2 + j[None, :]).to(tl.int8, bitcast=True).to(tl.int32)
        d = f16_u16(as_u16(block))
        m = zero
    else:
        tl.static_assert(FMT == FMT_MXFP4, "no code dot for this ggml type")
        q = _e2m1_doubled(_nibbles(block + 1, j))
        d = block_scale(block)
        m = zero
    return q.to(tl.float16), d, m


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
def _codes_step(FMT: tl.constexpr, TYPE_SIZE: tl.constexpr, acc, w_rows, u, hi_rows, lo_rows, inv_rows, sum_rows,
                j):
    """``acc (BN, BM)`` plus step ``u`` of every weight row (``STEP_VALUES``: a 64-value quarter of a Q4_K
    super-block, 32 values otherwise) times every row of x."""
    if FMT == FMT_Q4_K:
        # code bytes 32s..32s+31 of the super-block: low nibbles sub-block 2s, high nibbles 2s + 1
        block = w_rows + (u // 4) * TYPE_SIZE
        s = u % 4
        d = f16_u16(as_u16(block))
        dmin = f16_u16(as_u16(block) + 1)
        codes = load_bytes(block[:, None] + 16 + 32 * s + j[None, :])
        sa = _scaled_dot((codes & 15).to(tl.float16), hi_rows, lo_rows, inv_rows, 64 * u, j)
        sb = _scaled_dot((codes >> 4).to(tl.float16), hi_rows, lo_rows, inv_rows, 64 * u + 32, j)
        xa = tl.load(sum_rows + 2 * u)
        xb = tl.load(sum_rows + 2 * u + 1)
        sc_a, mn_a = scale_min(block, 2 * s)
        sc_b, mn_b = scale_min(block, 2 * s + 1)
        acc += (d * sc_a)[:, None] * sa - (dmin * mn_a)[:, None] * xa[None, :]
        acc += (d * sc_b)[:, None] * sb - (dmin * mn_b)[:, None] * xb[None, :]
    elif FMT == FMT_Q6_K:
        # one field of a half: two dots of 16 values, an int8 scale each, no min
        block = w_rows + (u // 8) * TYPE_SIZE
        h = (u % 8) // 4
        t = u % 4
        i = tl.arange(0, 16)
        d = f16_u16(as_u16(block + 208))
        sc0 = tl.load(block + 192 + 8 * h + 2 * t).to(tl.int8, bitcast=True).to(tl.float32)
        sc1 = tl.load(block + 193 + 8 * h + 2 * t).to(tl.int8, bitcast=True).to(tl.float32)
        s0 = _scaled_dot(_q6_codes(block, h, t, i), hi_rows, lo_rows, inv_rows, 32 * u, i)
        s1 = _scaled_dot(_q6_codes(block, h, t, i + 16), hi_rows, lo_rows, inv_rows, 32 * u + 16, i)
        acc += (d * sc0)[:, None] * s0 + (d * sc1)[:, None] * s1
    else:
        block = w_rows + u * TYPE_SIZE
        q, d, m = _block32_codes(FMT, block, j)
        acc += d[:, None] * _scaled_dot(q, hi_rows, lo_rows, inv_rows, 32 * u, j)
        if FMT == FMT_Q4_1 or FMT == FMT_Q5_1:
            acc += m[:, None] * tl.load(sum_rows + u)[None, :]
    return acc


@triton.jit
def codes_kernel(hi_ptr, lo_ptr, inv_ptr, sum_ptr, w_ptr, bias_ptr, out_ptr,
                 block_expert_ptr, block_start_ptr, block_end_ptr, sorted_ptr,
                 M, N, K, stride_wn, stride_we, stride_om, chunk_steps, part_stride,
                 FMT: tl.constexpr, TYPE_SIZE: tl.constexpr, STEP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 GROUPED: tl.constexpr, X_DIV: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr):
    """A ``(BN weight rows, BM rows of x)`` tile over steps ``pid_k * chunk_steps ..`` of K (one step a loop
    iteration, not unrolled: Q4_K unrolled over a super-block spilled 792 bytes a thread on sm_90)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    x_rows, o_rows, m_ok, expert, live = block_rows(pid_m, M, block_expert_ptr, block_start_ptr, block_end_ptr,
                                                    sorted_ptr, BM, X_DIV, GROUPED)
    w_rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64) * stride_wn  # rows past N re-read the last, unstored
    u_start = pid_k * chunk_steps
    u_end = tl.minimum(K // STEP, u_start + chunk_steps)
    if GROUPED:
        w_rows += expert.to(tl.int64) * stride_we
        u_end = tl.where(live, u_end, u_start)  # an unused block of pairs runs no steps
    x_rows = x_rows.to(tl.int64)
    hi_rows = hi_ptr + x_rows * K
    lo_rows = lo_ptr + x_rows * K
    inv_rows = inv_ptr + x_rows * (K // 32)
    sum_rows = sum_ptr + x_rows * (K // 32)
    j = tl.arange(0, 32)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for u in range(u_start, u_end):
        acc = _codes_step(FMT, TYPE_SIZE, acc, w_rows, u, hi_rows, lo_rows, inv_rows, sum_rows, j)
    store_tile(acc, out_ptr, bias_ptr, o_rows, m_ok, offs_n, expert, pid_k, N, stride_om, part_stride, HAS_BIAS,
               GROUPED, PARTIAL)


# ggml type -> bytes of a block (super-block) and values of one step of ``codes_kernel``
TYPE_SIZES = {int(T.Q4_0): 18, int(T.Q4_1): 20, int(T.Q5_0): 22, int(T.Q5_1): 24, int(T.Q8_0): 34, int(T.MXFP4): 17,
              int(T.Q4_K): 144, int(T.Q6_K): 210}
STEP_VALUES = {t: 64 if t == int(T.Q4_K) else 32 for t in TYPE_SIZES}
TYPES = frozenset(TYPE_SIZES)  # the formats with a code dot

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


def steps(ggml_type: int, K: int) -> int:
    """Loop steps of ``codes_kernel`` over a row of ``K`` values (what split-K divides)."""
    return K // STEP_VALUES[ggml_type]


def launch(x: torch.Tensor, data: torch.Tensor, ggml_type: int, N: int, K: int, bias: torch.Tensor | None,
           out: torch.Tensor, grid: tuple[int, int, int], chunk_steps: int, table: tuple[torch.Tensor, ...] | None,
           x_div: int, expert_stride: int, bm: int, bn: int, warps: int, stages: int) -> None:
    """Run ``codes_kernel`` into ``out``: ``(rows, N)``, or ``(splits, rows, N)`` fp32 partial sums when the grid
    has more than one split (then the caller adds them and the bias). ``x (M, K)`` fp32; ``table``: the expert
    block table (``matmul.expert_blocks``), ``None`` for a plain matmul."""
    if ggml_type not in TYPES:
        raise ValueError(f"no code dot for ggml type {ggml_type}")
    if x.dtype != torch.float32 or K % 32:
        raise ValueError("the code dot takes fp32 x and rows of a multiple of 32 values")
    hi, lo, inv, sums = split_x(x)
    meta = table if table is not None else (inv, inv, inv, inv)  # unused pointers when not grouped
    partial = out.dim() == 3
    codes_kernel[grid](hi, lo, inv, sums, data, bias if bias is not None else inv, out, *meta,
                       x.shape[0], N, K, data.stride(0), expert_stride, out.stride(-2), chunk_steps,
                       out.shape[-2] * N if partial else 0,
                       FMT=ggml_type, TYPE_SIZE=TYPE_SIZES[ggml_type], STEP=STEP_VALUES[ggml_type], BM=bm, BN=bn, GROUPED=table is not None, X_DIV=x_div,
                       HAS_BIAS=bias is not None and not partial, PARTIAL=partial, num_warps=warps,
                       num_stages=stages)
