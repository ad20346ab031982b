"""The path for many rows of ``x`` (a prompt): weight rows dequantized by a kernel into a bounded scratch tile, then
one GEMM of torch's (cuBLAS on a GPU) per tile.

Why: a 512-token prompt through ``matmul.qmm_kernel`` (weights decoded in registers for every block of 128 rows of x)
ran at 3.9 TFLOP/s on an H100 (Phi-3-mini's prompt pass: 950 of its 960 ms in that kernel). Decoding each weight
once per prompt and handing the product to cuBLAS is what llama.cpp's CUDA backend does for batches its quantized
matmul does not take (dequantize to a buffer, then a cuBLAS GEMM). The weights stay quantized in memory; the scratch
tile holds at most ``TILE_ELEMENTS`` values (64 MiB in fp32) and is freed to torch's allocator after each call.

The tile is ``weight_tile``'s decoding (bit-exact with gguf, then cast to ``x``'s dtype) and the GEMM is torch's in
``x``'s dtype, so the result is the reference path's (``orcd.quant.reference_linear``: the same values, the same
matmul), up to the GEMM's summation order where its tiles differ in shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from orcd_quant_formats.kernels.common import MAGIC_BITS
from orcd_quant_formats.kernels.matmul import SPECS, weight_tile

# x with at least this many rows takes this path (a prompt); fewer (decode steps of several streams) stay on
# ``matmul``'s kernels, which read the quantized weights once and write nothing. Not yet placed by a measurement.
MIN_ROWS = 128
TILE_ELEMENTS = 16 * 1024 * 1024  # dequantized values per scratch tile, as orcd.quant.REFERENCE_TILE_ELEMENTS
ROWS_PER_PROGRAM = 32
VALUES_PER_PROGRAM = 128  # along K, per program (a multiple of every format's tl.dot unit up to 128 values)


@triton.jit
def dequant_kernel(w_ptr, out_ptr, N, K, stride_wn, stride_on, MAGIC, FMT: tl.constexpr, QK: tl.constexpr,
                   TYPE_SIZE: tl.constexpr, UNITS: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr):
    """``out[n, k]`` = weight ``(n, k)`` for a ``(BN, NB * unit)`` tile; units past ``K``'s end are clamped to the
    last one (as in ``qmm_kernel``) and not stored."""
    U: tl.constexpr = QK // UNITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    row_off = tl.minimum(offs_n, N - 1).to(tl.int64) * stride_wn
    units = tl.minimum(pid_k * NB + tl.arange(0, NB), K // QK * UNITS - 1)
    base = w_ptr + row_off[:, None] + ((units // UNITS) * TYPE_SIZE)[None, :]
    magic = tl.where(units >= 0, MAGIC, 0)[None, :]  # a per-thread register (see common)
    w = weight_tile(FMT, base, (units % UNITS)[None, :], magic, out_ptr.dtype.element_ty)
    kk = pid_k * (NB * U) + tl.arange(0, NB * U)
    mask = (offs_n < N)[:, None] & (kk < K)[None, :]
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * stride_on + kk[None, :], w, mask=mask)


def dequantize(data: torch.Tensor, ggml_type: int, K: int, dtype: torch.dtype, out: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Rows of blocks ``data (n, row_bytes)`` as ``(n, K)`` values in ``dtype`` (into ``out`` when given)."""
    spec = SPECS[ggml_type]
    n = data.shape[0]
    if out is None:
        out = torch.empty((n, K), dtype=dtype, device=data.device)
    units = spec.units(True)
    nb = max(2, VALUES_PER_PROGRAM // spec.unit(True))  # one unit per step makes a degenerate layout (matmul)
    grid = (triton.cdiv(n, ROWS_PER_PROGRAM), triton.cdiv(K // spec.unit(True), nb))
    dequant_kernel[grid](data, out, n, K, data.stride(0), out.stride(0), MAGIC_BITS, FMT=ggml_type,
                         QK=spec.block_size, TYPE_SIZE=spec.type_size, UNITS=units, BN=ROWS_PER_PROGRAM, NB=nb)
    return out


def linear(x2: torch.Tensor, data: torch.Tensor, ggml_type: int, N: int, K: int,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x2 @ W.T + bias`` for ``x2 (M, K)`` and ``W`` = ``data`` (``(N, row_bytes)`` blocks), ``TILE_ELEMENTS``
    dequantized values at a time."""
    rows = max(1, min(N, TILE_ELEMENTS // K))
    if rows >= N:
        out = x2 @ dequantize(data, ggml_type, K, x2.dtype).T
    else:
        out = x2.new_empty(x2.shape[0], N)
        tile = torch.empty((rows, K), dtype=x2.dtype, device=x2.device)
        for start in range(0, N, rows):
            stop = min(N, start + rows)
            w = dequantize(data[start:stop], ggml_type, K, x2.dtype, out=tile[: stop - start])
            out[:, start:stop] = x2 @ w.T
    if bias is not None:
        out += bias.to(out.dtype)
    return out
