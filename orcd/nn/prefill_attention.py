"""Paged prefill attention (Triton): a chunk of ``T > 1`` new tokens per sequence attending over the paged KV cache
in place, FlashAttention-style, with causal / sliding-window masking and per-head sink logits (GPT-OSS).

Imported lazily (``PagedKVCache.prefill_attention``): this module needs Triton, the core does not.

Today's path gathers each sequence's whole read window out of the pool (``PagedKVCache.update``) and, with sinks,
materialises float32 scores ``(B, H_q, T, S)``: a 512-token chunk late in a 131k-token GPT-OSS prompt would need
17 GB. Here nothing of size ``T x S`` or ``S`` exists: one program per (block of ``BLOCK_M`` queries, query head,
sequence) walks the keys in blocks of ``BLOCK_N``, read through the block table (a per-key lookup, so any block
size works), keeping an online softmax in float32 (running max, denominator, weighted sum).

- The chunk's own keys and values are stored by the caller before the launch (``index_copy_``, as ``update``
  does), so every program reads them from the pool like any other key.
- Query ``i`` of sequence ``b`` sits at ``positions[b, i]`` and sees key ``j`` iff ``j <= p`` and, with a window
  ``w``, ``p - w < j`` (``ForwardBatch.mask``'s convention). A program visits only keys its queries can see:
  from the first visible key of its earliest query (window) to its latest query's position (causal). Key blocks
  every query of the program sees are attended without a mask; only the edges are masked per score. Bounds come
  from the device-side positions: no host sync, and the launch shape depends only on ``B``, ``H_q`` and ``T``.
- Dots: with a half-precision pool (CUDA) q (pre-scaled) and the probabilities are rounded to the pool's dtype for
  ``tl.dot`` on tensor cores, accumulating in float32 (as SDPA's FP16 path does); with a float32 pool (CPU, the
  interpreter tests) the dots are IEEE float32.
- The sink logit of each head joins the denominator at the end (it attends to nothing), as in the decode kernel.

Every query sees at least its own key, so every output is finite. ``D`` that is not a power of two (Phi-3: 96) is
padded to the next one with a mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NEG: tl.constexpr = tl.constexpr(-1.0e30)  # "no score yet": finite, so exp(NEG - NEG) = 1 never makes a NaN
BIG: tl.constexpr = tl.constexpr(2**30)  # larger than any position
BLOCK_M = 64  # queries per program
BLOCK_N = 64  # keys per loop step


@triton.jit
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, tables_ptr, pos_ptr, sinks_ptr, out_ptr,
    scale, window, block_size, T,
    s_qb, s_qh, s_qt, s_qd, s_cr, s_ch, s_tb, s_tn, s_pb, s_pt, s_ob, s_oh, s_ot, s_od,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, HALF_DOT: tl.constexpr,
):
    mb = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // GROUP
    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    i_ok = i < T
    d_ok = d < D
    table = tables_ptr + b * s_tb

    pos = tl.load(pos_ptr + b * s_pb + i * s_pt, mask=i_ok, other=0).to(tl.int32)  # padding rows: position 0
    hi = tl.max(pos, axis=0) + 1  # causal: no key past the block's latest query
    lo = 0
    if HAS_WINDOW:
        # The earliest query's first visible key, rounded down to a key block.
        lo = tl.maximum(tl.min(tl.where(i_ok, pos, BIG), axis=0) - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N

    q_ok = i_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * s_qb + h * s_qh + i[:, None] * s_qt + d[None, :] * s_qd, mask=q_ok,
                other=0.0).to(tl.float32) * scale
    if HALF_DOT:
        q = q.to(kc_ptr.dtype.element_ty)

    # Keys [a, c) are seen by every query of the block: no mask there. [lo, a) and [c, hi) are masked per score.
    # (Rounded inwards to key blocks; a negative bound, truncated or floored, ends up below lo >= 0 either way.)
    c = ((tl.min(tl.where(i_ok, pos, BIG), axis=0) + 1) // BLOCK_N) * BLOCK_N
    a = 0
    if HAS_WINDOW:
        a = tl.minimum(tl.maximum(lo, ((hi - window + BLOCK_N - 1) // BLOCK_N) * BLOCK_N), c)

    m = tl.full([BLOCK_M], NEG, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(lo, a, BLOCK_N):
        m, l, acc = _attend(q, m, l, acc, n0 + n, d, d_ok, pos, hi, window, table, kc_ptr, vc_ptr, hk, block_size,
                            s_cr, s_ch, s_tn, True, HAS_WINDOW, HALF_DOT)
    for n0 in range(a, c, BLOCK_N):
        m, l, acc = _attend(q, m, l, acc, n0 + n, d, d_ok, pos, hi, window, table, kc_ptr, vc_ptr, hk, block_size,
                            s_cr, s_ch, s_tn, False, HAS_WINDOW, HALF_DOT)
    for n0 in range(c, hi, BLOCK_N):
        m, l, acc = _attend(q, m, l, acc, n0 + n, d, d_ok, pos, hi, window, table, kc_ptr, vc_ptr, hk, block_size,
                            s_cr, s_ch, s_tn, True, HAS_WINDOW, HALF_DOT)

    if HAS_SINKS:
        sink = tl.load(sinks_ptr + h).to(tl.float32)
        m_all = tl.maximum(m, sink)
        alpha = tl.exp(m - m_all)
        l = l * alpha + tl.exp(sink - m_all)
        acc = acc * alpha[:, None]
    l = tl.where(i_ok, l, 1.0)  # padding rows (never stored) divide by 1
    out = acc / l[:, None]
    tl.store(out_ptr + b * s_ob + h * s_oh + i[:, None] * s_ot + d[None, :] * s_od,
             out.to(out_ptr.dtype.element_ty), mask=q_ok)


@triton.jit
def _attend(q, m, l, acc, j, d, d_ok, pos, hi, window, table, kc_ptr, vc_ptr, hk, block_size, s_cr, s_ch, s_tn,
            MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, HALF_DOT: tl.constexpr):
    """One block of keys ``j`` into the online softmax ``(m, l, acc)`` of the queries at ``pos``. Unmasked
    (``MASKED`` false) only where every key is below ``hi`` and seen by every query."""
    j_ok = j < hi
    rows = tl.load(table + (j // block_size) * s_tn, mask=j_ok, other=0) * block_size + j % block_size
    offs = rows[:, None] * s_cr + hk * s_ch + d[None, :]
    kv_ok = j_ok[:, None] & d_ok[None, :]
    keys = tl.load(kc_ptr + offs, mask=kv_ok, other=0.0)
    values = tl.load(vc_ptr + offs, mask=kv_ok, other=0.0)
    if HALF_DOT:
        scores = tl.dot(q, tl.trans(keys))
    else:
        scores = tl.dot(q, tl.trans(keys.to(tl.float32)), input_precision="ieee")
    if MASKED:
        seen = (j[None, :] <= pos[:, None]) & j_ok[None, :]
        if HAS_WINDOW:
            seen = seen & (pos[:, None] - j[None, :] < window)
        scores = tl.where(seen, scores, NEG)
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(scores - m_new[:, None])
    if MASKED:
        p = tl.where(seen, p, 0.0)
    l = l * alpha + tl.sum(p, axis=1)
    if HALF_DOT:
        pv = tl.dot(p.to(keys.dtype), values)
    else:
        pv = tl.dot(p, values.to(tl.float32), input_precision="ieee")
    return m_new, l, acc * alpha[:, None] + pv


def prefill_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tables: torch.Tensor,
    positions: torch.Tensor,
    block_size: int,
    scale: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
) -> torch.Tensor:
    """Attend ``q`` ``(B, H_q, T, D)`` at ``positions`` ``(B, T)`` (device) over the pools ``(rows, H_kv, D)``
    through block tables ``(B, n)``; the batch's own keys and values must already be in the pools. Keys ``j`` of
    sequence ``b`` with ``j <= p`` (and ``p - window < j``) are seen by its query at ``p``. Returns
    ``(B, H_q, T, D)`` in q's dtype. ``block_m``/``block_n`` (powers of two, >= 16) are for tests."""
    b, h_q, t, d = q.shape
    h_kv = k_pool.shape[1]
    if h_q % h_kv or k_pool.shape[2] != d or positions.shape != (b, t) or tables.shape[0] != b:
        raise ValueError(f"prefill attention: q {tuple(q.shape)}, pool {tuple(k_pool.shape)}, "
                         f"positions {tuple(positions.shape)}, tables {tuple(tables.shape)}")
    if k_pool.stride(-1) != 1 or v_pool.stride() != k_pool.stride():
        raise ValueError("the K and V pools must be alike, rows of contiguous (head, dim)")
    out = torch.empty((b, h_q, t, d), dtype=q.dtype, device=q.device)
    half = k_pool.dtype in (torch.float16, torch.bfloat16)
    block_d = max(16, triton.next_power_of_2(d))
    grid = (triton.cdiv(t, block_m), h_q, b)
    _prefill_kernel[grid](
        q, k_pool, v_pool, tables, positions, sinks if sinks is not None else q, out,
        scale, window or 0, block_size, t,
        *q.stride(), k_pool.stride(0), k_pool.stride(1), tables.stride(0), tables.stride(1),
        positions.stride(0), positions.stride(1), *out.stride(),
        GROUP=h_q // h_kv, D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        HAS_WINDOW=window is not None, HAS_SINKS=sinks is not None, HALF_DOT=half,
    )
    return out
