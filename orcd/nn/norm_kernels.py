"""Fused Triton kernels for RMSNorm (alone, or after a residual add) and the SwiGLU activation.

Each replaces a handful of small elementwise/reduction kernels with one launch (batch-1 decode is bound by the
number of kernels, not by their work). The torch code in ``orcd.nn.norm`` / ``orcd.nn.mlp`` is the oracle and the
fallback; this module imports Triton at import time, so callers import it lazily (``orcd`` must import without
Triton). Math is fp32 whatever the storage dtype; outputs take the inputs' dtype. Nothing here syncs with the host
or allocates by value, so the launches can be captured in a CUDA graph.

RMSNorm: one program per row, the whole row in registers (a power-of-two block up to ``MAX_NORM_WIDTH``).
SwiGLU: a 2-D grid of (row, column block); gate and up are strided row views, so the fused ``[gate | up]``
projection is read in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_NORM_WIDTH = 16384  # the row lives in registers: 16K fp32 over 16 warps is 32 values a thread
SWIGLU_BLOCK = 1024


@triton.jit
def _rms_scale(hf, w, mask, n_cols, eps):
    """``hf * rsqrt(mean(hf**2) + eps) * w`` for one row in fp32 (masked lanes hold 0 and add nothing)."""
    mean_sq = tl.sum(tl.where(mask, hf * hf, 0.0), axis=0) / n_cols
    return hf * tl.math.rsqrt(mean_sq + eps) * w


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_cols, stride_x, stride_out, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    xf = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = _rms_scale(xf, w, mask, n_cols, eps)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, h_ptr, out_ptr, n_cols, stride_x, stride_d, stride_h, stride_out, eps,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
    # the sum is rounded to h's dtype before normalising, as the torch path normalises the stored h
    h = (x + d).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = _rms_scale(h.to(tl.float32), w, mask, n_cols, eps)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_kernel(g_ptr, u_ptr, out_ptr, n_cols, stride_g, stride_u, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u  # silu(g) * u
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D ``(rows, width)`` view with unit column stride (a copy only when no such view exists)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _norm_launch(width: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row of ``width``: about 8-32 fp32 values a thread."""
    block = triton.next_power_of_2(width)
    return block, 4 if block <= 1024 else 8 if block <= 4096 else 16


def norm_fits(width: int) -> bool:
    """The row fits one program's registers (wider rows take the torch path)."""
    return 0 < width <= MAX_NORM_WIDTH


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``rmsnorm(x) * weight`` over the last axis, fp32 math, in ``x``'s dtype and shape."""
    n = x.shape[-1]
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block, warps = _norm_launch(n)
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, n, x2.stride(0), out.stride(0), eps,
                                         BLOCK=block, num_warps=warps)
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, rmsnorm(h) * weight)`` with ``h = x + delta`` (same shapes; h in their promoted dtype)."""
    n = x.shape[-1]
    x2, d2 = _rows(x), _rows(delta)
    dtype = torch.result_type(x, delta)
    h = torch.empty(x2.shape, dtype=dtype, device=x.device)
    out = torch.empty(x2.shape, dtype=dtype, device=x.device)
    if x2.shape[0]:
        block, warps = _norm_launch(n)
        _add_rms_norm_kernel[(x2.shape[0],)](x2, d2, weight, h, out, n, x2.stride(0), d2.stride(0), h.stride(0),
                                             out.stride(0), eps, BLOCK=block, num_warps=warps)
    return h.view(x.shape), out.view(x.shape)


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` (same shapes; may be strided views such as the halves of a fused projection), fp32 math,
    in the promoted dtype of ``g`` and ``u``."""
    n = g.shape[-1]
    g2, u2 = _rows(g), _rows(u)
    out = torch.empty(g2.shape, dtype=torch.result_type(g, u), device=g.device)
    if g2.shape[0] and n:
        grid = (g2.shape[0], triton.cdiv(n, SWIGLU_BLOCK))
        _swiglu_kernel[grid](g2, u2, out, n, g2.stride(0), u2.stride(0), out.stride(0),
                             BLOCK=SWIGLU_BLOCK, num_warps=4)
    return out.view(g.shape)
