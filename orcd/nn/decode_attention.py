"""Paged decode attention (Triton): one new token per sequence stored into a paged KV cache and attended, in one
kernel per layer (two when a long read is split over key ranges).

Imported lazily (``PagedKVCache.decode_attention``): this module needs Triton, the core does not.

One program per (sequence, key/value head, key range) serves the ``H_q / H_kv`` query heads of that K/V head
(rows of one ``tl.dot``; one or two heads sum products in registers instead, ``MAX_FMA_GROUP``), so each key and
value row is read once. It

- stores the sequence's new key and value into the pool row of its position (``table[p // bs] * bs + p % bs``),
  rounded to the pool's dtype; only the program whose key range holds the position stores, and no program of the
  launch reads that row from memory: the new key and value are attended from registers (after the same rounding),
  so there is no read-after-write between programs and the result equals "store, then gather";
- reads keys ``j < p`` of its range through the block table (a per-key table lookup, so any block size works),
  only those the mask lets through (causal, and with a window ``w`` only ``p - w < j``, ``batch.mask``'s
  convention): positions past a sequence's own are never touched, so the scratch block and stale rows are never
  read;
- keeps an online softmax in float32 (running max, denominator, weighted sum), the sink logit of each query head
  joining the denominator at the end (it attends to nothing);
- with several query heads per K/V head and an fp16 cache, multiplies on the tensor cores: fp16 operands, fp32
  sums, q and the probabilities each as two fp16 parts (leading part and rest), so the products keep fp32's
  accuracy (``F16_DOT``); otherwise fp32 dots (``input_precision="ieee"``) or, for one or two heads, products
  summed in registers.

Every row attends at least to its own new key, so every output is finite, padding rows of a CUDA-graph batch
(position 0 in the scratch block) included. Programs whose range is empty (past the sequence's position) leave
a neutral partial (max ``NEG``, denominator 0). Key ranges and loop bounds come from the device-side position: no
host sync, and the launch shape depends only on host numbers (``B``, heads, ``kv_length``), so it can be captured in
a graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NEG: tl.constexpr = tl.constexpr(-1.0e30)  # "no score yet": finite, so exp(NEG - NEG) = 1 never makes a NaN
# Keys per loop step of the tl.dot path. Timed on an H100 (a 640-key read at position 576, kernel and combine, 20
# graph replays, 2026-12-07, fp16 dots, 10 key ranges): without a window 64 keys were faster (Qwen2.5 5.66 vs 6.36 us
# a layer, GPT-OSS 6.06 vs 6.50); in GPT-OSS's 128-key window 32 keys were (5.35 vs 5.85). With fp32 dots (before
# fp16 ones) the same reads took 14.50 (Qwen, 5 ranges), 14.57 and 7.34 us.
BLOCK_N = 64
WINDOW_BLOCK_N = 32
# A key range shorter than this is not worth a second (combine) kernel. Low, because decode has few (sequence, K/V
# head) pairs (Qwen2.5-0.5B: 2 per sequence): unsplit, two programs would each walk the whole context. A program's
# time is mostly its chain of dependent loads (position, block table, keys) per loop step: Qwen's read above took
# 6.99 us in 5 ranges of 128 keys (two steps each) and 5.66 in 10 of 64 (same session).
MIN_SPLIT = 64
# Split the read until about this many programs run (an H100 has 132 SMs). Two programs an SM: Phi-3-mini's batch-1
# read (32 K/V heads, 640-key bucket) took 15.37 us a layer in 8 ranges, 19.55 in 4 (H100, 2026-12-07).
TARGET_PROGRAMS = 256
WARPS = 4
# Up to this many query heads per K/V head (Phi-3: 1), scores and weighted sums are products summed in registers:
# tl.dot needs 16 rows, so one head's row would be padded to 16, and compiled for sm_90 that kernel (head dim 96)
# spilled 2.3 KB a thread to local memory; on an H100 it took 486 us a layer at a 544-token context.
MAX_FMA_GROUP = 2
FMA_BLOCK_N = 32  # keys per loop step there: 168 registers a thread on sm_90 (254 with 64 keys)


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, tables_ptr, pos_ptr, sinks_ptr, out_ptr, m_ptr, l_ptr,
    scale, window, block_size,
    s_qb, s_qh, s_qd, s_kb, s_kh, s_kd, s_vb, s_vh, s_vd,
    s_cr, s_ch, s_tb, s_tn, s_pb,
    s_ob, s_oh, s_os,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, SPLIT: tl.constexpr, USE_DOT: tl.constexpr,
    F16_DOT: tl.constexpr, EARLY_VALUES: tl.constexpr,
):
    b = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < GROUP
    d_ok = d < D
    heads = hk * GROUP + g

    pos = tl.load(pos_ptr + b * s_pb).to(tl.int32)
    table = tables_ptr + b * s_tb
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :] * s_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * scale
    if F16_DOT:  # (a scaled q element past fp16's 65504 would turn inf; fp32 dots keep fp32's range)
        q_hi = q.to(tl.float16)
        q_lo = (q - q_hi.to(tl.float32)).to(tl.float16)

    # The new key and value, as the pool holds them.
    pool_ty = kc_ptr.dtype.element_ty
    k_new = tl.load(k_ptr + b * s_kb + hk * s_kh + d * s_kd, mask=d_ok, other=0.0).to(pool_ty)
    v_new = tl.load(v_ptr + b * s_vb + hk * s_vh + d * s_vd, mask=d_ok, other=0.0).to(pool_ty)
    # The keys this sequence attends, first..pos, cut into as many ranges as there are programs along axis 2; cut
    # here from the device-side position, so a launch shaped for the longest context (a CUDA graph's) still spreads
    # a short one over all its programs.
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(pos - window + 1, 0)
    split_len = tl.cdiv(tl.cdiv(pos + 1 - first, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    start = first + split * split_len
    own = (pos >= start) & (pos < start + split_len)  # this program's range holds the new position
    row = tl.load(table + (pos // block_size) * s_tn) * block_size + pos % block_size
    pos_d = pos + 0 * d  # per-lane copies: the interpreter wants a vector mask
    store = d_ok & (pos_d >= start) & (pos_d < start + split_len)
    tl.store(kc_ptr + row * s_cr + hk * s_ch + d, k_new, mask=store)
    tl.store(vc_ptr + row * s_cr + hk * s_ch + d, v_new, mask=store)

    s_own = tl.sum(q * k_new.to(tl.float32)[None, :], axis=1)
    m = tl.where(own, s_own, NEG)
    l = tl.where(own, 1.0, 0.0) + tl.zeros([BLOCK_G], tl.float32)
    acc = tl.where(own, 1.0, 0.0) * v_new.to(tl.float32)[None, :] + tl.zeros([BLOCK_G, BLOCK_D], tl.float32)

    end = tl.minimum(start + split_len, pos)  # keys before the new one, in this range
    n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        j = n0 + n
        j_ok = j < end
        rows = tl.load(table + (j // block_size) * s_tn, mask=j_ok, other=0) * block_size + j % block_size
        offs = rows[:, None] * s_cr + hk * s_ch + d[None, :]
        ok = j_ok[:, None] & d_ok[None, :]
        if F16_DOT:
            # Keys and values as the pool holds them, the values' load issued with the keys': their latencies
            # overlap.
            keys = tl.load(kc_ptr + offs, mask=ok, other=0.0)
            values = tl.load(vc_ptr + offs, mask=ok, other=0.0)
            # fp16 tensor-core products with fp32 sums. The pool's values are exact in fp16; q and p are each cut
            # into a leading fp16 and the fp16 of the rest, so every product is of exact fp16 operands (exact in
            # fp32) and the pair of dots carries ~22 bits of q and p, as the fp32 path does to rounding.
            kt = tl.trans(keys)
            scores = tl.dot(q_lo, kt, tl.dot(q_hi, kt))
        else:
            keys = tl.load(kc_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            if EARLY_VALUES:  # issued with the keys' load, so the two latencies overlap
                early = tl.load(vc_ptr + offs, mask=ok, other=0.0)
            if USE_DOT:
                scores = tl.dot(q, tl.trans(keys), input_precision="ieee")
            else:
                scores = tl.sum(q[:, None, :] * keys[None, :, :], axis=2)
        scores = tl.where(j_ok[None, :], scores, NEG)
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.where(j_ok[None, :], tl.exp(scores - m_new[:, None]), 0.0)
        l = l * alpha + tl.sum(p, axis=1)
        if F16_DOT:
            p_hi = p.to(tl.float16)
            p_lo = (p - p_hi.to(tl.float32)).to(tl.float16)
            acc = acc * alpha[:, None] + tl.dot(p_lo, values, tl.dot(p_hi, values))
        else:
            # The values loaded here, after the scores, the order of the launches timed before fp16 dots (Qwen's read
            # at 64 keys: 14.50 us a layer on an H100). A version that loaded them with the keys took 94.10.
            if EARLY_VALUES:
                values = early.to(tl.float32)
            else:
                values = tl.load(vc_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            if USE_DOT:
                acc = acc * alpha[:, None] + tl.dot(p, values, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * values[None, :, :], axis=1)
        m = m_new

    out_rows = b * s_ob + heads * s_oh + split * s_os
    if SPLIT:
        # Partials for the combine kernel: max and denominator (B, H_q, splits), weighted sums (B, H_q, splits, D).
        n_splits = tl.num_programs(2)
        ml = (b * tl.num_programs(1) * GROUP + heads) * n_splits + split
        tl.store(m_ptr + ml, m, mask=g_ok)
        tl.store(l_ptr + ml, l, mask=g_ok)
        tl.store(out_ptr + out_rows[:, None] + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])
    else:
        if HAS_SINKS:
            m, l, acc = _add_sink(m, l, acc, sinks_ptr, heads, g_ok)
        out = acc / l[:, None]
        tl.store(out_ptr + out_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _add_sink(m, l, acc, sinks_ptr, heads, g_ok):
    """The sink logit of each head joins the denominator (and its max), attending to nothing."""
    sink = tl.load(sinks_ptr + heads, mask=g_ok, other=0.0).to(tl.float32)
    m_all = tl.maximum(m, sink)
    alpha = tl.exp(m - m_all)
    return m_all, l * alpha + tl.exp(sink - m_all), acc * alpha[:, None]


@triton.jit
def _combine_kernel(
    acc_ptr, m_ptr, l_ptr, sinks_ptr, out_ptr, n_splits, s_ob, s_oh,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    """One program per (sequence, query head): the key ranges' partials rescaled to a common max and summed."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = b * tl.num_programs(1) + h
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < n_splits
    m = tl.load(m_ptr + row * n_splits + s, mask=s_ok, other=NEG)
    l = tl.load(l_ptr + row * n_splits + s, mask=s_ok, other=0.0)
    acc = tl.load(acc_ptr + (row * n_splits + s[:, None]) * D + d[None, :], mask=s_ok[:, None] & (d < D)[None, :],
                  other=0.0)
    m_all = tl.max(m, axis=0)
    if HAS_SINKS:
        m_all = tl.maximum(m_all, tl.load(sinks_ptr + h).to(tl.float32))
    w = tl.exp(m - m_all)  # ranges left empty hold NEG: weight 0
    denom = tl.sum(l * w, axis=0)
    if HAS_SINKS:
        denom += tl.exp(tl.load(sinks_ptr + h).to(tl.float32) - m_all)
    out = tl.sum(acc * w[:, None], axis=0) / denom
    tl.store(out_ptr + b * s_ob + h * s_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def n_splits(kv_length: int, programs: int) -> int:
    """Key ranges for a read of at most ``kv_length`` positions by ``programs`` (sequence, K/V head) pairs: one
    (one kernel) unless the read can be long and the pairs are too few to fill the GPU. The kernel cuts each
    sequence's actual keys into that many ranges."""
    return max(1, min(-(-kv_length // MIN_SPLIT), TARGET_PROGRAMS // max(1, programs)))


def _block_n(use_dot: bool, window: int | None) -> int:
    if not use_dot:
        return FMA_BLOCK_N
    return BLOCK_N if window is None else WINDOW_BLOCK_N


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tables: torch.Tensor,
    positions: torch.Tensor,
    block_size: int,
    kv_length: int,
    scale: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    splits: int | None = None,
    block_n: int | None = None,
    warps: int | None = None,
    f16_dot: bool | None = None,
    early_values: bool = False,
) -> torch.Tensor:
    """Store ``k``/``v`` ``(B, H_kv, 1, D)`` at each sequence's position in the pools ``(rows, H_kv, D)`` and
    attend ``q`` ``(B, H_q, 1, D)`` over positions ``<= positions[b]`` (``(B, 1)``, device) of the sequence's
    blocks ``tables`` ``(B, n)``; ``kv_length`` bounds every position. Returns ``(B, H_q, 1, D)`` in q's dtype.
    ``splits``, ``block_n``, ``warps`` and ``f16_dot`` force the launch (tests, tuning); by default ``n_splits`` picks
    the number of key ranges, ``_block_n`` the keys per step, ``WARPS`` the warps, and the tl.dot path takes fp16
    tensor-core dots when the pools are fp16 (``F16_DOT``). ``early_values``: the fp32 and register paths load a
    step's values with its keys instead of after the scores (``orcd bench attention`` times both)."""
    b, h_q, t, d = q.shape
    h_kv = k.shape[1]
    if t != 1 or h_q % h_kv or k.shape != (b, h_kv, 1, d) or v.shape != k.shape:
        raise ValueError(f"decode attention takes one token per sequence: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k_pool.stride(-1) != 1 or v_pool.stride() != k_pool.stride():
        raise ValueError("the K and V pools must be alike, rows of contiguous (head, dim)")
    group = h_q // h_kv
    if splits is None:
        splits = n_splits(kv_length, b * h_kv)
    out = torch.empty((b, h_q, 1, d), dtype=q.dtype, device=q.device)
    if splits > 1:
        acc = torch.empty((b, h_q, splits, d), dtype=torch.float32, device=q.device)
        m = torch.empty((b, h_q, splits), dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        target, strides = acc, (acc.stride(0), acc.stride(1), acc.stride(2))
    else:
        m = l = out  # unused
        target, strides = out, (out.stride(0), out.stride(1), 0)
    sink_arg = sinks if sinks is not None else q
    block_d = max(16, triton.next_power_of_2(d))
    use_dot = group > MAX_FMA_GROUP
    block_g = max(16, triton.next_power_of_2(group)) if use_dot else triton.next_power_of_2(group)
    if f16_dot is None:
        f16_dot = use_dot and k_pool.dtype == torch.float16
    elif f16_dot and not (use_dot and k_pool.dtype == torch.float16):
        raise ValueError("fp16 dots need the tl.dot path (more than MAX_FMA_GROUP query heads a K/V head) and fp16 "
                         "pools")
    _decode_kernel[(b, h_kv, splits)](
        q, k, v, k_pool, v_pool, tables, positions, sink_arg, target, m, l,
        scale, window or 0, block_size,
        q.stride(0), q.stride(1), q.stride(3), k.stride(0), k.stride(1), k.stride(3), v.stride(0), v.stride(1),
        v.stride(3), k_pool.stride(0), k_pool.stride(1), tables.stride(0), tables.stride(1), positions.stride(0),
        *strides,
        GROUP=group, D=d, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n or _block_n(use_dot, window),
        HAS_WINDOW=window is not None, HAS_SINKS=sinks is not None, SPLIT=splits > 1, USE_DOT=use_dot,
        F16_DOT=f16_dot, EARLY_VALUES=early_values and not f16_dot,
        num_warps=warps or WARPS,
    )
    if splits > 1:
        _combine_kernel[(b, h_q)](
            acc, m, l, sink_arg, out, splits, out.stride(0), out.stride(1),
            D=d, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d, HAS_SINKS=sinks is not None,
        )
    return out
