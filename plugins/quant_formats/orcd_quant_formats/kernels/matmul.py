"""Fused dequantize-matmul: ``out = x @ W.T (+ bias)`` with ``W`` in raw ggml blocks, never materialised; and the
launcher that picks between the two kernels.

- *decode* (``gemv.gemv_kernel``, up to ``FMA_MAX_ROWS`` rows of ``x`` per weight block): fp32 multiply-adds,
  weights read once, bound by memory bandwidth;
- *prefill/batches* (``qmm_kernel`` here): each program owns ``BM`` rows of ``x`` and ``BN`` weight rows and walks
  ``K`` in steps of ``G * L`` values; per step the format's tile function decodes ``(BN, G, L)`` weights in
  registers (fp32, bit-exact with the reference dequantizer), which are cast to ``x``'s dtype (as the reference
  path casts its weights) and fed to ``tl.dot`` with fp32 accumulation. fp32 ``x`` uses TF32 products where torch
  allows TF32 for its own matmuls and three TF32 products per term (``tf32x3``, about fp32 accuracy) otherwise;
- split-K: when the output alone gives too few programs to fill the device, ``K`` is cut into chunks whose fp32
  partial sums torch adds afterwards (deterministic, no atomics);
- experts (``GROUPED``): ``x`` rows are (token, expert) pairs sorted by expert and cut into blocks of ``BM`` pairs of
  one expert, so each chosen expert's weights are read once per block and unchosen experts not at all. The block
  table is built on the device (no host sync), sized for the worst case; unused blocks do no work.

Everything here takes plain tensors (``data`` is the ``(rows, row_bytes)`` uint8 blocks) so that the CPU tests can
run it under ``TRITON_INTERPRET=1``; ``orcd_quant_formats.kernels`` decides when it is used.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, replace

import gguf
import torch
import triton
import triton.language as tl

from orcd_quant_formats.kernels.common import MAGIC_BITS
from orcd_quant_formats.kernels.gemv import gemv_kernel
from orcd_quant_formats.kernels.kquants import q4_k_tile, q5_k_tile, q6_k_tile
from orcd_quant_formats.kernels.legacy import (
    q4_0_tile,
    q4_1_tile,
    q5_0_tile,
    q5_1_tile,
    q8_0_tile,
)
from orcd_quant_formats.kernels.mxfp4 import mxfp4_tile

T = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class Spec:
    """What the launcher needs to know about a format: its block geometry and the tile's group length ``L``."""

    block_size: int
    type_size: int
    group: int  # L: values per tile group
    super_block: int  # K must be a multiple of this; steps never cross one unless it is 32


SPECS: dict[int, Spec] = {
    int(T.Q4_0): Spec(32, 18, 16, 32),
    int(T.Q4_1): Spec(32, 20, 16, 32),
    int(T.Q5_0): Spec(32, 22, 16, 32),
    int(T.Q5_1): Spec(32, 24, 16, 32),
    int(T.Q8_0): Spec(32, 34, 16, 32),
    int(T.Q4_K): Spec(256, 144, 32, 256),
    int(T.Q5_K): Spec(256, 176, 32, 256),
    int(T.Q6_K): Spec(256, 210, 16, 256),
    int(T.MXFP4): Spec(32, 17, 16, 32),
}

_Q4_0 = tl.constexpr(int(T.Q4_0))
_Q4_1 = tl.constexpr(int(T.Q4_1))
_Q5_0 = tl.constexpr(int(T.Q5_0))
_Q5_1 = tl.constexpr(int(T.Q5_1))
_Q8_0 = tl.constexpr(int(T.Q8_0))
_Q4_K = tl.constexpr(int(T.Q4_K))
_Q5_K = tl.constexpr(int(T.Q5_K))
_Q6_K = tl.constexpr(int(T.Q6_K))
_MXFP4 = tl.constexpr(int(T.MXFP4))


@triton.jit
def weight_tile(w_ptr, row_off, k0, K, FMT: tl.constexpr, G: tl.constexpr):
    """fp32 ``(BN, G, L)``: columns ``k0 .. k0 + G L`` of the rows at byte offsets ``row_off`` (format ``FMT``)."""
    if FMT == _Q4_0:
        w = q4_0_tile(w_ptr, row_off, k0, K, G)
    elif FMT == _Q4_1:
        w = q4_1_tile(w_ptr, row_off, k0, K, G)
    elif FMT == _Q5_0:
        w = q5_0_tile(w_ptr, row_off, k0, K, G)
    elif FMT == _Q5_1:
        w = q5_1_tile(w_ptr, row_off, k0, K, G)
    elif FMT == _Q8_0:
        w = q8_0_tile(w_ptr, row_off, k0, K, G)
    elif FMT == _Q4_K:
        w = q4_k_tile(w_ptr, row_off, k0, K, G)
    elif FMT == _Q5_K:
        w = q5_k_tile(w_ptr, row_off, k0, K, G)
    elif FMT == _Q6_K:
        w = q6_k_tile(w_ptr, row_off, k0, K, G)
    else:
        tl.static_assert(FMT == _MXFP4, "no weight tile for this ggml type")
        w = mxfp4_tile(w_ptr, row_off, k0, K, G)
    return w


@triton.jit
def qmm_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    block_expert_ptr, block_start_ptr, block_end_ptr, sorted_ptr,
    M, N, K, stride_xm, stride_wn, stride_we, stride_om, k_chunk, part_stride,
    FMT: tl.constexpr, G: tl.constexpr, L: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    X_F32: tl.constexpr, PRECISION: tl.constexpr,
    GROUPED: tl.constexpr, X_DIV: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
):
    STEP: tl.constexpr = G * L
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    row_off = tl.minimum(offs_n, N - 1).to(tl.int64) * stride_wn  # rows past N re-read the last one, unstored
    k_start = pid_k * k_chunk
    k_end = tl.minimum(K, k_start + k_chunk)
    if GROUPED:
        expert = tl.load(block_expert_ptr + pid_m)
        p_lo = tl.load(block_start_ptr + pid_m)
        p_hi = tl.load(block_end_ptr + pid_m)
        m_ok = p_lo + offs_m < p_hi
        pair = tl.load(sorted_ptr + p_lo + offs_m, mask=m_ok, other=0)
        x_rows = pair // X_DIV
        o_rows = pair
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        k_end = tl.where(p_hi > p_lo, k_end, k_start)  # an unused block runs no steps
    else:
        expert = 0
        p_lo = 0
        p_hi = 0
        x_rows = pid_m * BM + offs_m
        o_rows = x_rows
        m_ok = x_rows < M
        w_base = w_ptr

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_start, k_end, STEP):
        w = weight_tile(w_base, row_off, k0, K, FMT, G)
        kk = k0 + tl.arange(0, STEP)
        xt = tl.load(x_ptr + x_rows[:, None].to(tl.int64) * stride_xm + kk[None, :],
                     mask=m_ok[:, None] & (kk < K)[None, :], other=0.0)
        wt = tl.trans(tl.reshape(w, (BN, STEP)).to(xt.dtype))
        if X_F32:
            acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(xt, wt, acc)

    mask = m_ok[:, None] & n_ok[None, :]
    if PARTIAL:
        ptrs = out_ptr + pid_k.to(tl.int64) * part_stride + o_rows[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(ptrs, acc, mask=mask)
    else:
        if HAS_BIAS:
            if GROUPED:
                bias = tl.load(bias_ptr + expert.to(tl.int64) * N + offs_n, mask=n_ok, other=0.0)
            else:
                bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        ptrs = out_ptr + o_rows[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --- launch configuration -------------------------------------------------------------------------------------------

FMA_MAX_ROWS = 4  # up to this many x rows per weight block: the decode kernel; more: tl.dot
PROGRAMS_PER_SM = 4  # split K until the grid has about this many programs per multiprocessor
MIN_STEPS_PER_SPLIT = 2


@dataclass(frozen=True)
class Config:
    """One launch's shape. ``dot``: the tl.dot kernel with ``bm`` x rows and ``bn`` weight rows per program and
    ``step`` values of K per iteration; else the decode kernel with ``bm`` (<= 4) x rows, ``bn`` weight rows and
    ``nb`` units per iteration (32-value blocks; K-quants: 64-value quarters of super-blocks). ``split``: chunks of K (0: chosen from the grid size)."""

    bm: int
    bn: int
    dot: bool
    step: int = 64
    nb: int = 0
    split: int = 0
    warps: int = 4
    stages: int = 2


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def pick_config(spec: Spec, rows: int, N: int, K: int, multiprocessors: int = 132) -> Config:
    """The launch for ``rows`` rows of x per block of work (all of x, or one expert's pairs).

    Decode: a warp covers 32 units of a row (legacy, MXFP4) or 16 units of 2 rows (K-quants) and each thread holds 4
    rows of its column, so that the x values it loads serve 4 weight rows; the number of warps per program (1, 2
    or 4) grows with N so that small matrices still spread over the device (split-K does the rest)."""
    if rows <= FMA_MAX_ROWS:
        rows_per_warp, nb = (8, 16) if spec.block_size == 256 else (4, 32)
        target = PROGRAMS_PER_SM * multiprocessors
        warps = 4
        while warps > 1 and triton.cdiv(N, rows_per_warp * warps) < target:
            warps //= 2
        return Config(bm=rows, bn=rows_per_warp * warps, dot=False, nb=nb, warps=warps)
    bm = min(128, max(16, _pow2_at_least(rows)))
    bn = 64 if bm <= 64 else 128
    return Config(bm=bm, bn=bn, dot=True, step=64, warps=8 if bm * bn >= 128 * 128 else 4, stages=2)


@functools.lru_cache(maxsize=4096)
def _picked(ggml_type: int, rows: int, N: int, K: int, multiprocessors: int) -> Config:
    return pick_config(SPECS[ggml_type], rows, N, K, multiprocessors)


_SM_COUNT: dict[torch.device, int] = {}


def _multiprocessors(device: torch.device) -> int:
    """Multiprocessors of ``device``; 4 for the CPU (the interpreter), so split-K also runs in CPU tests."""
    if device.type != "cuda":
        return 4
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def _split(split: int, programs: int, steps: int, device: torch.device) -> tuple[int, int]:
    """``(splits, steps per split)``: ``steps`` iterations cut so that ``programs * splits`` fills the device (or
    into ``split`` chunks if that is set)."""
    if split <= 0:
        target = PROGRAMS_PER_SM * _multiprocessors(device)
        split = 1 if programs >= target else min(triton.cdiv(target, programs), steps // MIN_STEPS_PER_SPLIT)
    split = max(1, min(split, steps))
    per_split = triton.cdiv(steps, split)
    return triton.cdiv(steps, per_split), per_split


def _checked(spec: Spec, cfg: Config, K: int) -> Config:
    if K % spec.super_block:
        raise ValueError(f"row length {K} is not a multiple of {spec.super_block}")
    if not cfg.dot:
        if not 1 <= cfg.bm <= FMA_MAX_ROWS or cfg.nb < 1 or cfg.nb & (cfg.nb - 1) or cfg.bn & (cfg.bn - 1):
            raise ValueError(f"decode launch {cfg}: bm must be 1..{FMA_MAX_ROWS}, nb and bn powers of two")
        return cfg
    step = cfg.step
    if spec.super_block > 32:
        step = min(step, spec.super_block)  # a K-quant tile stays inside one super-block
    if step % spec.group or step < 32 or step & (step - 1):
        raise ValueError(f"step {cfg.step} must be a power of two of at least 32 and a multiple of {spec.group}")
    return replace(cfg, step=step)


def _dot_precision(x: torch.Tensor) -> str:
    """fp32 ``x``: TF32 where torch allows it for its own matmuls, else three TF32 products per term (about fp32
    accuracy at tensor-core speed; ``ieee`` if this Triton cannot compile that)."""
    if x.dtype != torch.float32:
        return "ieee"  # unused: 16-bit operands have one precision
    if torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee" if x.device.type != "cuda" or _NO_TF32X3 else "tf32x3"


_NO_TF32X3: set[str] = set()  # non-empty once tf32x3 failed to compile here


@functools.lru_cache(maxsize=4096)
def _plan(ggml_type: int, cfg: Config, m_blocks: int, N: int, K: int, device: torch.device) -> tuple[Config, int, int]:
    """The checked configuration, number of K splits and K chunk (values) of one launch (cached: decode calls
    repeat)."""
    spec = SPECS[ggml_type]
    cfg = _checked(spec, cfg, K)
    per_step = cfg.step if cfg.dot else cfg.nb * (64 if spec.block_size == 256 else spec.block_size)
    split, steps = _split(cfg.split, m_blocks * triton.cdiv(N, cfg.bn), triton.cdiv(K, per_step), device)
    return cfg, split, steps * per_step


def _launch(
    x: torch.Tensor, data: torch.Tensor, ggml_type: int, N: int, K: int, bias: torch.Tensor | None,
    cfg: Config, m_blocks: int, out_rows: int, grouped: tuple[torch.Tensor, ...] | None = None, x_div: int = 1,
    expert_stride: int = 0, bias_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    cfg, split, k_chunk = _plan(ggml_type, cfg, m_blocks, N, K, x.device)
    spec = SPECS[ggml_type]
    partial = split > 1
    if partial:
        out = torch.empty((split, out_rows, N), dtype=torch.float32, device=x.device)
    else:
        out = torch.empty((out_rows, N), dtype=x.dtype, device=x.device)
    meta = grouped if grouped is not None else (x, x, x, x)  # unused pointers when not grouped
    grid = (m_blocks, triton.cdiv(N, cfg.bn), split)
    common = (x, data, bias if bias is not None else x, out, *meta,
              x.shape[0], N, K, x.stride(0), data.stride(0), expert_stride, out.stride(-2))
    flags = dict(FMT=ggml_type, BM=cfg.bm, BN=cfg.bn, GROUPED=grouped is not None, X_DIV=x_div,
                 HAS_BIAS=bias is not None, PARTIAL=partial, num_warps=cfg.warps, num_stages=cfg.stages)
    if not cfg.dot:
        units = 4 if spec.block_size == 256 else 1
        gemv_kernel[grid](*common, k_chunk * units // spec.block_size, out_rows * N, MAGIC_BITS,
                          QK=spec.block_size, TYPE_SIZE=spec.type_size, UNITS=units, NB=cfg.nb, **flags)
    else:
        def launch(precision: str) -> None:
            qmm_kernel[grid](*common, k_chunk, out_rows * N, G=cfg.step // spec.group, L=spec.group,
                             X_F32=x.dtype == torch.float32, PRECISION=precision, **flags)

        precision = _dot_precision(x)
        if precision == "tf32x3":
            try:
                launch(precision)
            except Exception as e:  # noqa: BLE001 -- a Triton without tf32x3 for this dot: IEEE products instead
                _NO_TF32X3.add(f"{type(e).__name__}: {e}".splitlines()[0])
                warnings.warn(f"fp32 tl.dot with tf32x3 failed ({next(iter(_NO_TF32X3))}); using ieee", stacklevel=2)
                launch("ieee")
        else:
            launch(precision)
    if not partial:
        return out
    result = out.sum(dim=0)
    if bias is not None:
        result += bias.float() if bias_rows is None else bias.float().index_select(0, bias_rows)
    return result.to(x.dtype)


def _rows(x: torch.Tensor, K: int) -> torch.Tensor:
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} columns, the weight rows hold {K} values")
    x2 = x.reshape(-1, K)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def linear(
    x: torch.Tensor, data: torch.Tensor, ggml_type: int, N: int, K: int, bias: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for ``W`` = ``data`` (``(N, row_bytes)`` uint8 blocks of ``ggml_type``, rows of ``K``
    values); ``x`` is ``(..., K)`` fp16/bf16/fp32, the result ``(..., N)`` in ``x``'s dtype."""
    x2 = _rows(x, K)
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*x.shape[:-1], N)
    cfg = config or _picked(ggml_type, M, N, K, _multiprocessors(x.device))
    out = _launch(x2, data, ggml_type, N, K, bias, cfg, triton.cdiv(M, cfg.bm), M)
    return out.reshape(*x.shape[:-1], N)


def expert_blocks(ids: torch.Tensor, n_expert: int, bm: int) -> tuple[torch.Tensor, ...]:
    """The block table of the grouped kernels, built on ``ids``'s device without a host sync.

    Pairs (rows of ``ids``, flattened) are sorted by expert; each expert's pairs are cut into blocks of at most
    ``bm``. Returns ``(block_expert, block_start, block_end, sorted_pairs)`` (int32): block ``b`` runs expert
    ``block_expert[b]`` over sorted positions ``block_start[b] .. block_end[b]``. The table has the worst-case
    number of blocks for this many pairs; blocks past the used ones are empty (start = end = 0).
    """
    flat = ids.reshape(-1).long()
    P = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(n_expert, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    n_blocks = (counts + bm - 1) // bm
    block_end = torch.cumsum(n_blocks, 0)
    pair_end = torch.cumsum(counts, 0)
    max_blocks = (P + min(n_expert, P) * (bm - 1)) // bm
    b = torch.arange(max_blocks, device=flat.device)
    expert = torch.searchsorted(block_end, b, right=True)
    used = expert < n_expert
    e = expert.clamp(max=n_expert - 1)
    start = pair_end[e] - counts[e] + (b - (block_end[e] - n_blocks[e])) * bm
    end = torch.minimum(start + bm, pair_end[e])
    zero = torch.zeros_like(start)
    start, end = torch.where(used, start, zero), torch.where(used, end, zero)
    return tuple(t.to(torch.int32) for t in (e, start, end, order))


def expert_linear(
    x: torch.Tensor, data: torch.Tensor, ggml_type: int, n_expert: int, N: int, K: int, ids: torch.Tensor,
    bias: torch.Tensor | None = None, config: Config | None = None,
) -> torch.Tensor:
    """Mixture-of-experts projection: pair ``p`` (``ids.reshape(-1)[p]``) computes ``x[row] @ W[e].T + bias[e]``.

    ``data`` holds ``n_expert * N`` rows of blocks (expert ``e`` is rows ``e*N .. (e+1)*N``); ``bias`` is
    ``(n_expert, N)``. ``ids`` is ``(T, k)`` (token ``t`` of ``x (T, K)`` through ``k`` experts: pair ``p`` reads
    x row ``p // k``) or ``(P,)`` (one expert per row of ``x (P, K)``). Returns ``(P, N)`` in ``x``'s dtype.
    """
    x2 = _rows(x, K)
    per_row = 1 if ids.dim() == 1 else ids.shape[-1]
    P = ids.numel()
    if x2.shape[0] * per_row != P:
        raise ValueError(f"{P} expert ids for {x2.shape[0]} rows of x ({per_row} per row)")
    if P == 0:
        return x.new_empty(0, N)
    cfg = config or _picked(ggml_type, math.ceil(P / min(n_expert, P)), N, K, _multiprocessors(x.device))
    table = expert_blocks(ids, n_expert, cfg.bm)
    flat = ids.reshape(-1).long() if bias is not None else None
    return _launch(x2, data, ggml_type, N, K, bias, cfg, table[0].numel(), P, grouped=table, x_div=per_row,
                   expert_stride=N * data.stride(0), bias_rows=flat)
