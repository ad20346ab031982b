"""Fused Triton kernels for GPT-OSS's mixture of experts at decode: the router (logits, top-k, softmax), the
clamped SwiGLU, and the weighted sum of each token's expert outputs.

Batch-1 decode is bound by the number of kernels, not their work: the router alone is ~5 launches in torch (a
cuBLAS GEMV and its bias, two for ``topk``, one softmax), the clamped SwiGLU ~7 elementwise ones, the weighted sum 2.
Here the router is two launches and the others one each. The torch code in ``orcd_gpt_adapter.moe`` is the oracle and the fallback; this module
imports Triton at import time, so ``moe`` imports it lazily. Math is fp32; nothing syncs with the host or allocates
by value, so the launches can be captured in a CUDA graph.

Router: two launches. One program per (token, expert) computes a logit, so a decode step's 32 dot products of
2880 read the router weight from many SMs at once (one program per token would stream the 368 KB from one SM);
then one program per token ranks its row and writes the top-k and their softmax. (One launch would need the last
program of a row to find itself through an atomic ticket: not worth that hand-off's risk for one launch.)

Ties: ``torch.topk`` promises no order among equal values (on CPU, ``topk(4)`` of 32 zeros returns 22, 21, 20, 23).
The kernel picks, among equal logits, the lower expert index first, which is deterministic and is what a stable
descending sort gives. The chosen sets agree with torch except where equal logits straddle the k-th place (then
either choice is a correct top-k); their weights agree, equal logits having equal weights. NaN logits are not
ranked as torch ranks them (torch puts NaN first); a NaN router logit is a broken model either way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROUTE_MAX_ROWS = 64  # decode batches; a prefill's router is one GEMM in torch, which reuses the weight across rows
ROUTE_MAX_EXPERTS = 1024  # the row of logits is ranked in one program's registers
ROUTE_BLOCK_H = 4096  # hidden 2880 in one load: each program has its whole dot product in flight at once
SWIGLU_BLOCK = 1024
SUM_BLOCK = 1024


@triton.jit
def _router_logits_kernel(x_ptr, w_ptr, b_ptr, logits_ptr, hidden, n_expert, stride_x, stride_w,
                          HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr):
    """One logit per program: ``x[row] . w[expert] (+ bias)`` in fp32."""
    row = tl.program_id(0).to(tl.int64)
    expert = tl.program_id(1)
    acc = tl.zeros((BLOCK_H,), tl.float32)
    for start in range(0, hidden, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        mask = cols < hidden
        xv = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + expert.to(tl.int64) * stride_w + cols, mask=mask, other=0.0).to(tl.float32)
        acc += xv * wv
    logit = tl.sum(acc, axis=0)
    if HAS_BIAS:
        logit += tl.load(b_ptr + expert).to(tl.float32)
    tl.store(logits_ptr + row * n_expert + expert, logit)


@triton.jit
def _router_top_k_kernel(logits_ptr, chosen_ptr, weights_ptr, n_expert, TOP_K: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per row: the ``TOP_K`` largest logits (equal logits: lower index first) and their softmax."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < n_expert
    vals = tl.load(logits_ptr + row * n_expert + offs, mask=valid, other=float("-inf"))
    taken = offs >= n_expert  # padding lanes are never chosen
    slots = tl.arange(0, BLOCK_K)
    top_v = tl.full((BLOCK_K,), float("-inf"), tl.float32)
    top_i = tl.zeros((BLOCK_K,), tl.int64)
    for j in tl.static_range(TOP_K):
        cand = tl.where(taken, float("-inf"), vals)
        best = tl.max(cand, axis=0)
        idx = tl.min(tl.where((cand == best) & (~taken), offs, BLOCK_E), axis=0)  # lowest index of the ties
        taken = taken | (offs == idx)
        top_v = tl.where(slots == j, best, top_v)
        top_i = tl.where(slots == j, idx.to(tl.int64), top_i)
    # softmax over the k chosen logits, as torch.softmax computes it: exp(v - max) / sum; slot 0 holds the max
    in_k = slots < TOP_K
    e = tl.where(in_k, tl.exp(top_v - tl.max(tl.where(in_k, top_v, float("-inf")), axis=0)), 0.0)
    w = e / tl.sum(e, axis=0)
    tl.store(chosen_ptr + row * TOP_K + slots, top_i.to(chosen_ptr.dtype.element_ty), mask=in_k)
    tl.store(weights_ptr + row * TOP_K + slots, w, mask=in_k)


@triton.jit
def _clamped_swiglu_kernel(g_ptr, u_ptr, out_ptr, n_cols, stride_g, stride_u, stride_out, alpha, limit,
                           BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.minimum(g, limit)
    u = tl.minimum(tl.maximum(u, -limit), limit)
    y = g * (1.0 / (1.0 + tl.exp(-(alpha * g)))) * (u + 1.0)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _weighted_sum_kernel(o_ptr, w_ptr, out_ptr, n_cols, stride_o, stride_out, TOP_K: tl.constexpr,
                         BLOCK: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    acc = tl.zeros((BLOCK,), tl.float32)
    for j in tl.static_range(TOP_K):  # slot order 0..k-1, a fixed order: deterministic
        w = tl.load(w_ptr + tok * TOP_K + j).to(tl.float32)
        o = tl.load(o_ptr + (tok * TOP_K + j) * stride_o + cols, mask=mask, other=0.0).to(tl.float32)
        acc += o * w
    tl.store(out_ptr + tok * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D ``(rows, width)`` view with unit column stride (a copy only when no such view exists)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def route_fits(rows: int, n_expert: int, top_k: int) -> bool:
    """The router kernel serves this call: a decode batch, and a row of logits one program can rank."""
    return 0 < rows <= ROUTE_MAX_ROWS and 0 < top_k <= n_expert <= ROUTE_MAX_EXPERTS


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, top_k: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen experts (int32, the expert kernels' index type: no cast kernel per layer) and their softmax weights
    (fp32), ``(N, top_k)`` each, for ``x (N, hidden)``: the top-k of ``x @ weight.T + bias`` in fp32, highest
    first (equal logits: lower index first). ``weight (n_expert, hidden)`` and ``bias`` are contiguous fp32; ``N
    <= ROUTE_MAX_ROWS``."""
    n_expert, hidden = weight.shape
    x2 = _rows(x)
    n = x2.shape[0]
    logits = torch.empty(n, n_expert, dtype=torch.float32, device=x.device)
    chosen = torch.empty(n, top_k, dtype=torch.int32, device=x.device)
    weights = torch.empty(n, top_k, dtype=torch.float32, device=x.device)
    if n:
        block_h = min(triton.next_power_of_2(hidden), ROUTE_BLOCK_H)
        _router_logits_kernel[(n, n_expert)](
            x2, weight, bias if bias is not None else weight, logits, hidden, n_expert, x2.stride(0),
            weight.stride(0), HAS_BIAS=bias is not None, BLOCK_H=block_h,
            num_warps=8 if block_h >= 2048 else 4)  # 16 values a thread: more loads in flight on each SM
        _router_top_k_kernel[(n,)](logits, chosen, weights, n_expert, TOP_K=top_k,
                                   BLOCK_K=triton.next_power_of_2(top_k), BLOCK_E=triton.next_power_of_2(n_expert),
                                   num_warps=1)
    return chosen, weights


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float, dtype: torch.dtype
                   ) -> torch.Tensor:
    """GPT-OSS's SwiGLU (gate clamped above at ``limit``, up to ``[-limit, limit]``, ``gate * sigmoid(alpha *
    gate) * (up + 1)``) in fp32 over same-shaped ``gate`` and ``up``, stored in ``dtype``."""
    n = gate.shape[-1]
    g2, u2 = _rows(gate), _rows(up)
    out = torch.empty(g2.shape, dtype=dtype, device=gate.device)
    if g2.shape[0] and n:
        grid = (g2.shape[0], triton.cdiv(n, SWIGLU_BLOCK))
        _clamped_swiglu_kernel[grid](g2, u2, out, n, g2.stride(0), u2.stride(0), out.stride(0), float(alpha),
                                     float(limit), BLOCK=SWIGLU_BLOCK, num_warps=4)
    return out.view(gate.shape)


def weighted_sum(outputs: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out[t] = sum_j outputs[t*k + j] * weights[t, j]`` for ``outputs (T*k, width)`` and ``weights (T, k)``,
    summed in slot order in fp32 and stored in ``dtype``: ``(T, width)``."""
    tokens, top_k = weights.shape
    o2 = _rows(outputs)
    w = weights if weights.is_contiguous() else weights.contiguous()
    n = o2.shape[-1]
    out = torch.empty(tokens, n, dtype=dtype, device=outputs.device)
    if tokens and n:
        grid = (tokens, triton.cdiv(n, SUM_BLOCK))
        _weighted_sum_kernel[grid](o2, w, out, n, o2.stride(0), out.stride(0), TOP_K=top_k, BLOCK=SUM_BLOCK,
                                   num_warps=4)
    return out
