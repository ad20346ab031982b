"""Fused dequantize-matmul: ``out = x @ W.T (+ bias)`` with ``W`` in raw ggml blocks, never materialised; and the
launcher that picks between the kernels.

- *decode* (``gemv.gemv_kernel``, up to ``FMA_MAX_ROWS`` rows of ``x`` per weight block by the rule, up to
  ``DECODE_MAX_ROWS`` where a measured tuning table says so): fp32 multiply-adds,
  weights read once, bound by memory bandwidth;
- *prefill/batches* (``qmm_kernel`` here): each program owns ``BM`` rows of ``x`` and ``BN`` weight rows and walks
  ``K`` ``NB`` units at a time; per step the format's tile function decodes the weights in registers (bit-exact
  with the reference dequantizer, then cast to ``x``'s dtype as the reference path casts its weights) in K's
  order, and ``tl.dot`` multiplies that tile (its left operand, straight from registers) by the x tile, with fp32
  accumulation. For fp32 ``x`` the products follow torch's ``float32_matmul_precision``, as its own matmuls do:
  ``highest`` (torch's default) three TF32 products per term (``tf32x3``, about fp32 accuracy), ``high`` one TF32
  product, ``medium`` bf16 operands (weights and x rounded to bf16; ``_dot_precision``);
- *code dot* (``codes_dot.codes_kernel``, fp32 ``x``, only where a tuning entry or a sweep asks: ``Config.codes``):
  the same tiles, the dot taken on the blocks' integer codes and x cut once into two fp16 parts;
- split-K: when the output alone gives too few programs to fill the device, ``K`` is cut into chunks whose fp32
  partial sums torch adds afterwards (deterministic, no atomics);
- experts (``GROUPED``, in every kernel): ``x`` rows are (token, expert) pairs sorted by expert and cut into blocks of ``BM`` pairs of
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
from triton.runtime.errors import OutOfResources

from orcd_quant_formats.kernels import codes_dot, tuning
from orcd_quant_formats.kernels.tuning import DECODE_MAX_ROWS, FMA_MAX_ROWS
from orcd_quant_formats.kernels.common import (
    FMT_MXFP4, FMT_Q4_0, FMT_Q4_1, FMT_Q4_K, FMT_Q5_0, FMT_Q5_1, FMT_Q5_K, FMT_Q6_K, FMT_Q8_0, MAGIC_BITS, block_rows,
    store_tile,
)
from orcd_quant_formats.kernels.gemv import gemv_kernel
from orcd_quant_formats.kernels.kquants import q4_k_tile, q5_k_tile, q6_k_tile
from orcd_quant_formats.kernels.legacy import q4_0_tile, q4_1_tile, q5_0_tile, q5_1_tile, q8_0_tile
from orcd_quant_formats.kernels.mxfp4 import mxfp4_tile

T = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class Spec:
    """A format's block geometry as the kernels see it: rows are walked in units of ``QK // units`` values (a block,
    or part of a K-quant super-block: quarters for decode; quarters (Q4_K, Q5_K) or halves (Q6_K) for tl.dot, whose
    units must be contiguous in K)."""

    block_size: int
    type_size: int
    dot_units: int = 1

    def units(self, dot: bool) -> int:
        if self.block_size == 32:
            return 1
        return self.dot_units if dot else 4

    def unit(self, dot: bool) -> int:
        return self.block_size // self.units(dot)


SPECS: dict[int, Spec] = {
    int(T.Q4_0): Spec(32, 18),
    int(T.Q4_1): Spec(32, 20),
    int(T.Q5_0): Spec(32, 22),
    int(T.Q5_1): Spec(32, 24),
    int(T.Q8_0): Spec(32, 34),
    int(T.Q4_K): Spec(256, 144, dot_units=4),
    int(T.Q5_K): Spec(256, 176, dot_units=4),
    int(T.Q6_K): Spec(256, 210, dot_units=2),
    int(T.MXFP4): Spec(32, 17),
}


@triton.jit
def weight_tile(FMT: tl.constexpr, base, u, magic, DT: tl.constexpr):
    """The weights of a ``(BN, NB)`` grid of (row, unit) pairs as ``(BN, NB * unit)`` in ``DT``, in K's order."""
    if FMT == FMT_Q4_0:
        w = q4_0_tile(base, u, magic, DT)
    elif FMT == FMT_Q4_1:
        w = q4_1_tile(base, u, magic, DT)
    elif FMT == FMT_Q5_0:
        w = q5_0_tile(base, u, magic, DT)
    elif FMT == FMT_Q5_1:
        w = q5_1_tile(base, u, magic, DT)
    elif FMT == FMT_Q8_0:
        w = q8_0_tile(base, u, magic, DT)
    elif FMT == FMT_Q4_K:
        w = q4_k_tile(base, u, magic, DT)
    elif FMT == FMT_Q5_K:
        w = q5_k_tile(base, u, magic, DT)
    elif FMT == FMT_Q6_K:
        w = q6_k_tile(base, u, magic, DT)
    else:
        tl.static_assert(FMT == FMT_MXFP4, "no weight tile for this ggml type")
        w = mxfp4_tile(base, u, magic, DT)
    return w


@triton.jit
def _dot_step(acc, b0, u_end, w_base, row_off, x_row_ptr, MAGIC, FMT: tl.constexpr, QK: tl.constexpr,
              TYPE_SIZE: tl.constexpr, UNITS: tl.constexpr, NB: tl.constexpr, X_F32: tl.constexpr,
              PRECISION: tl.constexpr, TAIL: tl.constexpr):
    """``acc += w_tile @ x_tile.T`` for units ``b0 .. b0 + NB``, whose values are K indices ``b0 * U ..
    (b0 + NB) * U`` (``U = QK // UNITS``). The tail step (``TAIL``) clamps units past ``u_end`` to the last one and
    reads no x for them; full steps read x unmasked."""
    U: tl.constexpr = QK // UNITS
    units = b0 + tl.arange(0, NB)
    units = tl.minimum(units, u_end - 1)
    base = w_base + row_off[:, None] + ((units // UNITS) * TYPE_SIZE)[None, :]
    magic = tl.where(units >= 0, MAGIC, 0)[None, :]  # a per-thread register (see common)
    if X_F32 and PRECISION == "bf16":  # torch's "medium": the weights are decoded exactly, then rounded to bf16
        w = weight_tile(FMT, base, (units % UNITS)[None, :], magic, tl.bfloat16)
    else:
        w = weight_tile(FMT, base, (units % UNITS)[None, :], magic, x_row_ptr.dtype.element_ty)
    kk = b0 * U + tl.arange(0, NB * U)
    if TAIL:
        xt = tl.load(x_row_ptr + kk[None, :], mask=(kk < u_end * U)[None, :], other=0.0)
    else:
        xt = tl.load(x_row_ptr + kk[None, :])
    # acc is (BN, BM): the weight tile, made in registers, is the left operand as it stands
    if X_F32:
        if PRECISION == "bf16":
            acc = tl.dot(w, tl.trans(xt.to(tl.bfloat16)), acc)
        else:
            acc = tl.dot(w, tl.trans(xt), acc, input_precision=PRECISION)
    else:
        acc = tl.dot(w, tl.trans(xt), acc)
    return acc


@triton.jit
def qmm_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    block_expert_ptr, block_start_ptr, block_end_ptr, sorted_ptr,
    M, N, K, stride_xm, stride_wn, stride_we, stride_om, chunk_units, part_stride, MAGIC,
    FMT: tl.constexpr, QK: tl.constexpr, TYPE_SIZE: tl.constexpr, UNITS: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, NB: tl.constexpr, X_F32: tl.constexpr, PRECISION: tl.constexpr,
    GROUPED: tl.constexpr, X_DIV: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    row_off = tl.minimum(offs_n, N - 1).to(tl.int64) * stride_wn  # rows past N re-read the last one, unstored
    u_start = pid_k * chunk_units
    u_end = tl.minimum(K // QK * UNITS, u_start + chunk_units)
    x_rows, o_rows, m_ok, expert, live = block_rows(pid_m, M, block_expert_ptr, block_start_ptr, block_end_ptr,
                                                    sorted_ptr, BM, X_DIV, GROUPED)
    if GROUPED:
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        u_end = tl.where(live, u_end, u_start)  # an unused block of pairs runs no steps
    else:
        w_base = w_ptr
    x_row_ptr = x_ptr + x_rows.to(tl.int64)[:, None] * stride_xm

    acc = tl.zeros((BN, BM), dtype=tl.float32)
    full_end = u_start + (u_end - u_start) // NB * NB
    for b0 in range(u_start, full_end, NB):
        acc = _dot_step(acc, b0, u_end, w_base, row_off, x_row_ptr, MAGIC, FMT, QK, TYPE_SIZE, UNITS, NB, X_F32,
                        PRECISION, False)
    if full_end < u_end:
        acc = _dot_step(acc, full_end, u_end, w_base, row_off, x_row_ptr, MAGIC, FMT, QK, TYPE_SIZE, UNITS, NB,
                        X_F32, PRECISION, True)
    store_tile(acc, out_ptr, bias_ptr, o_rows, m_ok, offs_n, expert, pid_k, N, stride_om, part_stride, HAS_BIAS,
               GROUPED, PARTIAL)


# --- launch configuration -------------------------------------------------------------------------------------------

PROGRAMS_PER_SM = 4  # split K until the grid has about this many programs per multiprocessor
DECODE_PARTS = 4  # lanes per unit in the decode kernel
DECODE_ROWS = 8  # weight rows per thread (and per program) in the decode kernel
DECODE_STEPS = 2  # K steps a decode program aims for (see pick_config)
MAX_DECODE_WARPS = 8
MIN_STEPS_PER_SPLIT = 2
# Expert projections with more (token, expert) pairs than this go grouped by expert through tl.dot. The decode
# kernel reads an expert once per pair (blocks of one pair) or decodes its blocks once per pair (up to 4 a block):
# on an H100, GPT-OSS-20B's steps of 4, 32 and 128 pairs (1, 8, 32 streams) took 3.1, 15.3 and 62 ms with it.
# tl.dot reads each chosen expert once per block of pairs: with it (past 16 pairs, 2026-12-07, same GPU model), the
# steps of 32 and 128 pairs took 29.4 and 41.5 ms (8 / 272.1 and 32 / 771.4 tok/s). So 8 streams' 32 pairs stay on
# the decode kernel and 32 streams' 128 go grouped; the crossing in between is not measured.
EXPERT_DECODE_MAX_PAIRS = 32


@dataclass(frozen=True)
class Config:
    """One launch's shape: ``bm`` rows of x and ``bn`` weight rows per program, ``nb`` units (see ``Spec``: 32-value
    blocks; K-quants: 64 values, 128 for Q6_K under tl.dot) per iteration; ``dot``: the tl.dot kernel, else the
    decode kernel (``bm`` <= ``DECODE_MAX_ROWS``), whose units are cut into ``parts`` (one lane each; ``nb`` then
    counts parts).
    ``split``: chunks of K (0: chosen from the grid size). ``codes``: for fp32 x, the tensor-core dot on the
    blocks' integer codes (``codes_dot.TYPES``; plain or grouped by expert; ``nb`` and ``parts`` unused), only where
    a table or a sweep asks for it; 16-bit x then takes the tl.dot tile of the same shape."""

    bm: int
    bn: int
    dot: bool
    nb: int
    split: int = 0
    warps: int = 4
    stages: int = 2
    parts: int = 1
    codes: bool = False


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def pick_config(spec: Spec, rows: int, N: int, K: int, multiprocessors: int = 132) -> Config:
    """The launch for ``rows`` rows of x per block of work (all of x, or one expert's pairs).

    Decode: units are cut into ``DECODE_PARTS`` parts (one lane each) and every lane of the program works on the
    same ``DECODE_ROWS`` weight rows, a row's parts spread over all its warps (``nb`` = 32 lanes x warps), so that
    the x values a thread loads serve that many rows. The warps (1 to 8) are as many as let a program cross ``K``
    in about ``DECODE_STEPS`` steps: a decode program is a chain of dependent loads, one memory latency per step,
    and a matrix is read fastest when many short chains are in flight at once. (One warp per row, the earlier
    rule, left GPT-OSS's 2880-wide rows 12 steps long and an H100 a few warps per multiprocessor.) With so few
    steps, split-K (``_plan``) rarely pays for its extra reduction.
    tl.dot: 2 units per iteration (one unit makes a degenerate ``(BN, 1)`` layout that the compiler moves through
    shared memory)."""
    if rows <= FMA_MAX_ROWS:
        n_parts = K // spec.unit(False) * DECODE_PARTS
        warps = min(MAX_DECODE_WARPS, _pow2_at_least(triton.cdiv(n_parts, 32 * DECODE_STEPS)))
        return Config(bm=rows, bn=DECODE_ROWS, dot=False, nb=32 * warps, warps=warps, parts=DECODE_PARTS)
    bm = min(128, max(16, _pow2_at_least(rows)))
    bn = 64 if bm <= 64 else 128
    return Config(bm=bm, bn=bn, dot=True, nb=2, warps=8 if bm * bn >= 128 * 128 else 4, stages=2)


@functools.lru_cache(maxsize=4096)
def _picked(ggml_type: int, rows: int, N: int, K: int, multiprocessors: int) -> Config:
    return pick_config(SPECS[ggml_type], rows, N, K, multiprocessors)


@functools.lru_cache(maxsize=4096)
def _fitted(ggml_type: int, rows: int, N: int, K: int, dtype: torch.dtype, device: torch.device,
            experts: bool = False, precision: str = "tf32x3") -> Config:
    """The launch for this shape: the measured one where the device's tuning table has it (``_tuned``), else the
    rule's, shrunk to the device's shared memory (``precision``: ``_dot_precision``'s, for fp32 x)."""
    cfg = _tuned(ggml_type, rows, N, K, device, experts) or _picked(ggml_type, rows, N, K, _multiprocessors(device))
    return fit_shared_memory(cfg, SPECS[ggml_type], dtype.itemsize, _shared_memory(device), precision)


def _tuned(ggml_type: int, rows: int, N: int, K: int, device: torch.device, experts: bool) -> Config | None:
    keyed = tuning.table_rows(rows)
    if keyed is None:
        return None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    key = tuning.key(ggml_type, keyed, N, K, experts)
    entry = tuning.table(name).get(key)
    if entry is None:
        return None
    try:
        cfg = Config(**entry)
        _entry_fits(cfg, keyed)
        _checked(SPECS[ggml_type], cfg, K)
    except (TypeError, ValueError) as e:
        warnings.warn(f"kernel tuning entry {key} ignored: {e}", stacklevel=3)
        return None
    return cfg


def _entry_fits(cfg: Config, rows: int) -> None:
    """A table entry for ``rows`` rows (a bucket past ``DECODE_MAX_ROWS``): a decode launch of that many rows a
    block (of ``DECODE_MAX_ROWS`` past it), or, past ``FMA_MAX_ROWS`` (where the rule takes tl.dot), a tl.dot
    launch."""
    if cfg.dot:
        if rows <= FMA_MAX_ROWS:
            raise ValueError(f"a tl.dot launch for {rows} rows, which the decode kernel takes")
    elif cfg.bm != min(rows, DECODE_MAX_ROWS):
        raise ValueError(f"a decode launch for {rows} rows takes {min(rows, DECODE_MAX_ROWS)} a block")


_SM_COUNT: dict[torch.device, int] = {}


def _multiprocessors(device: torch.device) -> int:
    """Multiprocessors of ``device``; 4 for the CPU (the interpreter), so split-K also runs in CPU tests."""
    if device.type != "cuda":
        return 4
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


_SHARED: dict[torch.device, int] = {}


def _shared_memory(device: torch.device) -> int:
    """Shared memory one program may use on ``device`` (bytes); the interpreter has no limit that matters."""
    if device.type != "cuda":
        return 1 << 30
    if device not in _SHARED:
        props = torch.cuda.get_device_properties(device)
        _SHARED[device] = int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)
    return _SHARED[device]


def fit_shared_memory(cfg: Config, spec: Spec, element_size: int, limit: int, precision: str = "tf32x3") -> Config:
    """``cfg`` with fewer pipeline stages, then smaller tiles, until the tl.dot kernel's buffers fit in ``limit``
    bytes. The estimate, ``(bm + bn) * K-step * element size * stages``, is doubled for fp32 operands under tf32x3
    (it keeps a high and a low part of each) and counts 2 bytes under bf16 (``precision``, fp32 x only): compiled
    for sm_90 it bounds what Triton 3.9 allocates for every format (fp32 Q4_K at 128x128 takes 256 KiB, more than an
    H100's 227). The budget keeps 1/8 for the compiler's own scratch; a launch that still runs out is retried with
    smaller tiles (``_launch_dot``)."""
    if not cfg.dot or cfg.codes:  # the code dot keeps a few KiB (fp16 operands of one 32-value sub-block)
        return cfg
    step = cfg.nb * spec.unit(True)
    budget = limit * 7 // 8
    if element_size == 4:
        element_size = {"tf32": 4, "bf16": 2}.get(precision, 8)

    def need(c: Config) -> int:
        return (c.bm + c.bn) * step * element_size * c.stages

    while need(cfg) > budget:
        if cfg.stages > 1:
            cfg = replace(cfg, stages=cfg.stages - 1)
        elif cfg.bn > 64 or (cfg.bn > 16 and cfg.bm <= 64):
            cfg = replace(cfg, bn=cfg.bn // 2)
        elif cfg.bm > 16:
            cfg = replace(cfg, bm=cfg.bm // 2)
        else:
            break
    return cfg


def _checked(spec: Spec, cfg: Config, K: int) -> None:
    if K % spec.block_size:
        raise ValueError(f"row length {K} is not a multiple of the block size {spec.block_size}")
    if cfg.nb < 1 or cfg.nb & (cfg.nb - 1) or cfg.bn & (cfg.bn - 1) or cfg.bm & (cfg.bm - 1) and cfg.dot:
        raise ValueError(f"launch {cfg}: nb, bn (and bm for tl.dot) must be powers of two")
    if not cfg.dot and not 1 <= cfg.bm <= DECODE_MAX_ROWS:
        raise ValueError(f"decode launch {cfg}: bm must be 1..{DECODE_MAX_ROWS}")
    if not cfg.dot and cfg.parts not in (1, 2, 4, 8):  # every format's unit has 8 or 16 code words
        raise ValueError(f"decode launch {cfg}: parts must be 1, 2, 4 or 8")
    if cfg.dot and (cfg.bm < 16 or cfg.bn < 16):
        raise ValueError(f"tl.dot launch {cfg}: bm and bn must be at least 16")
    if cfg.codes and (not cfg.dot or not any(spec is SPECS[t] for t in codes_dot.TYPES)):
        names = ", ".join(T(t).name for t in sorted(codes_dot.TYPES))
        raise ValueError(f"launch {cfg}: the code dot is a tl.dot launch for {names} only")


# torch's float32 matmul precision -> tl.dot's products for fp32 x (torch's own matmuls: cuBLAS in fp32, TF32, bf16)
PRECISIONS = {"highest": "tf32x3", "high": "tf32", "medium": "bf16"}


def _dot_precision(x: torch.Tensor) -> str:
    """The products of tl.dot for ``x``, following ``torch.get_float32_matmul_precision()`` as torch's own fp32
    matmuls do (``orcd serve --matmul-precision`` sets it): ``highest``, three TF32 products per term (about fp32
    accuracy at tensor-core speed; ``ieee`` off CUDA or where this Triton cannot compile that); ``high``, one TF32
    product; ``medium``, bf16 operands. 16-bit ``x`` has one precision (its own)."""
    if x.dtype != torch.float32:
        return "ieee"  # unused: 16-bit operands have one precision
    precision = PRECISIONS.get(torch.get_float32_matmul_precision(), "tf32x3")
    if precision == "tf32x3" and (x.device.type != "cuda" or _NO_TF32X3):
        return "ieee"
    return precision


_NO_TF32X3: set[str] = set()  # non-empty once tf32x3 failed to compile here


@functools.lru_cache(maxsize=4096)
def _plan(ggml_type: int, cfg: Config, m_blocks: int, N: int, K: int, device: torch.device) -> tuple[int, int]:
    """``(splits, units per split)`` of one launch (cached: decode calls repeat)."""
    spec = SPECS[ggml_type]
    _checked(spec, cfg, K)
    if cfg.codes:  # one step of its own a loop iteration
        n_units = steps = codes_dot.steps(ggml_type, K)
        nb = 1
    else:
        n_units = K // spec.unit(cfg.dot) * (1 if cfg.dot else cfg.parts)
        nb = cfg.nb
        steps = triton.cdiv(n_units, nb)
    split = cfg.split
    if split <= 0:
        programs = m_blocks * triton.cdiv(N, cfg.bn)
        target = PROGRAMS_PER_SM * _multiprocessors(device)
        split = 1 if programs >= target else min(triton.cdiv(target, programs), steps // MIN_STEPS_PER_SPLIT)
    split = max(1, min(split, steps))
    per_split = triton.cdiv(steps, split) * nb
    return triton.cdiv(n_units, per_split), per_split


def _launch(
    x: torch.Tensor, data: torch.Tensor, ggml_type: int, N: int, K: int, bias: torch.Tensor | None,
    cfg: Config, m_blocks: int, out_rows: int, grouped: tuple[torch.Tensor, ...] | None = None, x_div: int = 1,
    expert_stride: int = 0, bias_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    split, chunk_units = _plan(ggml_type, cfg, m_blocks, N, K, x.device)
    spec = SPECS[ggml_type]
    partial = split > 1
    if partial:
        out = torch.empty((split, out_rows, N), dtype=torch.float32, device=x.device)
    else:
        out = torch.empty((out_rows, N), dtype=x.dtype, device=x.device)
    grid = (m_blocks, triton.cdiv(N, cfg.bn), split)
    if cfg.codes:
        codes_dot.launch(x, data, ggml_type, N, K, bias, out, grid, chunk_units, grouped, x_div, expert_stride,
                         cfg.bm, cfg.bn, cfg.warps, cfg.stages)
        return _reduced(out, bias, bias_rows, x.dtype) if partial else out
    meta = grouped if grouped is not None else (x, x, x, x)  # unused pointers when not grouped
    args = (x, data, bias if bias is not None else x, out, *meta, x.shape[0], N, K, x.stride(0), data.stride(0),
            expert_stride, out.stride(-2), chunk_units, out_rows * N, MAGIC_BITS)
    flags = {"FMT": ggml_type, "QK": spec.block_size, "TYPE_SIZE": spec.type_size, "UNITS": spec.units(cfg.dot),
             "BM": cfg.bm, "BN": cfg.bn, "NB": cfg.nb, "GROUPED": grouped is not None, "X_DIV": x_div,
             "HAS_BIAS": bias is not None, "PARTIAL": partial, "num_warps": cfg.warps, "num_stages": cfg.stages}
    if not cfg.dot:
        gemv_kernel[grid](*args, **flags, PARTS=cfg.parts)
    else:
        _launch_dot(args, flags, grid, x, N, (ggml_type, cfg, x.dtype))
    return _reduced(out, bias, bias_rows, x.dtype) if partial else out


def _reduced(parts: torch.Tensor, bias: torch.Tensor | None, bias_rows: torch.Tensor | None,
             dtype: torch.dtype) -> torch.Tensor:
    """Split-K's fp32 partial sums ``(splits, rows, N)`` added, plus the bias (of each row's expert where
    ``bias_rows`` says which), in ``dtype``."""
    result = parts.sum(dim=0)
    if bias is not None:
        result += bias.float() if bias_rows is None else bias.float().index_select(0, bias_rows)
    return result.to(dtype)


# (ggml type, config, dtype, precision) -> the BN that launched, once a launch ran out of shared memory
_DOT_BN: dict[tuple, int] = {}


def _launch_dot(args: tuple, flags: dict, grid: tuple[int, int, int], x: torch.Tensor, N: int, key: tuple) -> None:
    """Launch ``qmm_kernel``. A launch that needs more shared memory than the device has (``fit_shared_memory``
    estimates; the compiler decides) is retried with half the weight rows per program, down to 16, then with IEEE
    products (fp32 ``x``); the BN that worked is remembered. tf32x3 that does not compile at all is given up for
    the process, with a warning."""
    precision = _dot_precision(x)
    bn = _DOT_BN.get((*key, precision), flags["BN"])
    while True:
        try:
            qmm_kernel[(grid[0], triton.cdiv(N, bn), grid[2])](
                *args, X_F32=x.dtype == torch.float32, PRECISION=precision, **{**flags, "BN": bn})
            if bn != flags["BN"]:
                _DOT_BN[(*key, precision)] = bn
            return
        except OutOfResources:
            if bn > 16:
                bn //= 2
            elif precision == "tf32x3":
                precision, bn = "ieee", flags["BN"]
            else:
                raise
        except Exception as e:  # noqa: BLE001 -- a Triton without tf32x3 for this dot: IEEE products instead
            if precision != "tf32x3":
                raise
            _NO_TF32X3.add(f"{type(e).__name__}: {e}".splitlines()[0])
            warnings.warn(f"fp32 tl.dot with tf32x3 failed ({next(iter(_NO_TF32X3))}); using ieee", stacklevel=3)
            precision, bn = "ieee", flags["BN"]


def as_rows(x: torch.Tensor, K: int) -> torch.Tensor:
    """``x (..., K)`` as a ``(rows, K)`` view (a copy where its last axis is strided), the kernels' layout."""
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
    x2 = as_rows(x, K)
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*x.shape[:-1], N)
    cfg = _codes_for(config or _fitted(ggml_type, M, N, K, x.dtype, x.device, precision=_dot_precision(x2)), x2)
    out = _launch(x2, data, ggml_type, N, K, bias, cfg, triton.cdiv(M, cfg.bm), M)
    return out.reshape(*x.shape[:-1], N)


def _codes_for(cfg: Config, x: torch.Tensor) -> Config:
    """``cfg`` as it runs for ``x``: the code dot takes fp32 x; 16-bit x takes tl.dot's tiles in its own dtype
    (as the reference path casts its weights) at the same tile shape."""
    return cfg if not cfg.codes or x.dtype == torch.float32 else replace(cfg, codes=False)


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


_PAIR_INDEX: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def pair_blocks(ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The block table for blocks of one pair each (``bm == 1``, the decode kernel): block ``p`` is pair ``p``, so
    nothing is sorted; every block reads its expert once either way. One cast instead of the ~15 small kernels of
    ``expert_blocks``, which at decode cost more than the matmuls they plan. The index tensors are kept per size
    (a CUDA graph that captured them keeps reading them)."""
    flat = ids.reshape(-1)
    key = (flat.numel(), flat.device)
    if key in _PAIR_INDEX:
        start, end = _PAIR_INDEX[key]
    else:
        start = torch.arange(flat.numel(), dtype=torch.int32, device=flat.device)
        end = start + 1
        if not (flat.is_cuda and torch.cuda.is_current_stream_capturing()):  # filled now, not at a replay
            _PAIR_INDEX[key] = (start, end)
    return flat.to(torch.int32), start, end, start


def expert_rows(pairs: int, n_expert: int) -> int:
    """Rows of x per block of work that an expert launch is planned for: the mean pairs per chosen expert, raised
    past the decode kernel's ``FMA_MAX_ROWS`` once there are more than ``EXPERT_DECODE_MAX_PAIRS`` pairs."""
    rows = math.ceil(pairs / min(n_expert, pairs))
    return max(rows, FMA_MAX_ROWS + 1) if pairs > EXPERT_DECODE_MAX_PAIRS else rows


def expert_linear(
    x: torch.Tensor, data: torch.Tensor, ggml_type: int, n_expert: int, N: int, K: int, ids: torch.Tensor,
    bias: torch.Tensor | None = None, config: Config | None = None,
) -> torch.Tensor:
    """Mixture-of-experts projection: pair ``p`` (``ids.reshape(-1)[p]``) computes ``x[row] @ W[e].T + bias[e]``.

    ``data`` holds ``n_expert * N`` rows of blocks (expert ``e`` is rows ``e*N .. (e+1)*N``); ``bias`` is
    ``(n_expert, N)``. ``ids`` is ``(T, k)`` (token ``t`` of ``x (T, K)`` through ``k`` experts: pair ``p`` reads
    x row ``p // k``) or ``(P,)`` (one expert per row of ``x (P, K)``). Returns ``(P, N)`` in ``x``'s dtype.
    """
    x2 = as_rows(x, K)
    per_row = 1 if ids.dim() == 1 else ids.shape[-1]
    P = ids.numel()
    if x2.shape[0] * per_row != P:
        raise ValueError(f"{P} expert ids for {x2.shape[0]} rows of x ({per_row} per row)")
    if P == 0:
        return x.new_empty(0, N)
    cfg = config or _fitted(ggml_type, expert_rows(P, n_expert), N, K, x.dtype, x.device, experts=True,
                            precision=_dot_precision(x2))
    cfg = _codes_for(cfg, x2)
    table = pair_blocks(ids) if cfg.bm == 1 else expert_blocks(ids, n_expert, cfg.bm)
    flat = ids.reshape(-1) if bias is not None else None  # split-K's bias rows (index_select takes int32 too)
    return _launch(x2, data, ggml_type, N, K, bias, cfg, table[0].numel(), P, grouped=table, x_div=per_row,
                   expert_stride=N * data.stride(0), bias_rows=flat)
