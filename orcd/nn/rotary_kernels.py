"""The fused rotary kernel: the queries and the keys of one attention layer rotated in one launch.

``RotaryEmbedding.apply_qk`` calls ``rotary_qk`` where ``use_kernels`` allows (the torch path in ``apply`` stays the
fallback and the oracle). The torch path costs ~7 kernels per tensor (four products, a sub, an add, a cat; one more
cat for a partial rotary, two casts for half-precision input); this is one kernel for both tensors.

The grid is (token row ``b * T + t``, block of heads), the query blocks first, then the key blocks, so one launch
serves both tensors. A program loads ``BLOCK_H`` heads of one token as a flat 1-D range of ``BLOCK_H * BLOCK_D``
elements (one register layout, nothing moved through shared memory) and, for every element ``d``, its rotation
partner (``d + half`` in the first half, ``d - half`` in the second) and the pair's cos and sin. Elements past the
rotary dimension (partial rotary) are copied unchanged. Any input strides are accepted (the projections' outputs
arrive as transposed views, possibly slices of a fused QKV output).

The math is fp32 with the torch path's operations in its order (``x1 cos - x2 sin``, ``x2 cos + x1 sin``), each
product rounded (the launch turns FMA contraction off; with it, the last bit of a result could differ), so the
kernel reproduces the torch path bit for bit, compiled or interpreted.

Nothing here is imported until a kernel runs (``orcd`` imports without Triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements per program: enough to hide load latency, few enough that a decode step (one token row) still spreads
# over several programs.
_ELEMENTS_PER_PROGRAM = 1024


@triton.jit
def _rotate_heads(x_ptr, o_ptr, cos_row, sin_row, b, t, h0, n_heads,
                  sxb, sxh, sxt, sxd, sob, soh, sot, sod, sc_i, ss_i,
                  HALF: tl.constexpr, ROT: tl.constexpr, D: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Heads ``h0 .. h0 + BLOCK_H - 1`` (those below ``n_heads``) of token ``(b, t)`` of one tensor."""
    idx = tl.arange(0, BLOCK_H * BLOCK_D)
    h = h0 + idx // BLOCK_D
    d = idx % BLOCK_D
    live = (h < n_heads) & (d < D)
    first = d < HALF
    rotated = live & (d < ROT)
    partner = tl.where(first, d + HALF, d - HALF)
    pair = tl.where(first, d, d - HALF)

    row = x_ptr + b * sxb + t * sxt + h * sxh
    x = tl.load(row + d * sxd, mask=live, other=0.0).to(tl.float32)
    p = tl.load(row + partner * sxd, mask=rotated, other=0.0).to(tl.float32)
    c = tl.load(cos_row + pair * sc_i, mask=rotated, other=0.0)
    s = tl.load(sin_row + pair * ss_i, mask=rotated, other=0.0)
    out = tl.where(first, x * c - p * s, x * c + p * s)
    out = tl.where(d < ROT, out, x)
    tl.store(o_ptr + b * sob + t * sot + h * soh + d * sod, out.to(o_ptr.dtype.element_ty), mask=live)


@triton.jit
def _rotary_qk_kernel(q, k, qo, ko, cos, sin, T,
                      sqb, sqh, sqt, sqd, skb, skh, skt, skd,
                      sqob, sqoh, sqot, sqod, skob, skoh, skot, skod,
                      scb, sct, sci, ssb, sst, ssi,
                      HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, ROT: tl.constexpr,
                      D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: offsets of long prompts may pass 2**31
    blk = tl.program_id(1)
    b = row // T
    t = row % T
    cos_row = cos + b * scb + t * sct
    sin_row = sin + b * ssb + t * sst
    n_q_blocks: tl.constexpr = (HQ + BLOCK_H - 1) // BLOCK_H
    if blk < n_q_blocks:
        _rotate_heads(q, qo, cos_row, sin_row, b, t, blk * BLOCK_H, HQ,
                      sqb, sqh, sqt, sqd, sqob, sqoh, sqot, sqod, sci, ssi,
                      HALF, ROT, D, BLOCK_H, BLOCK_D)
    else:
        _rotate_heads(k, ko, cos_row, sin_row, b, t, (blk - n_q_blocks) * BLOCK_H, HKV,
                      skb, skh, skt, skd, skob, skoh, skot, skod, sci, ssi,
                      HALF, ROT, D, BLOCK_H, BLOCK_D)


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              rot_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``(B, H_q, T, D)`` and k ``(B, H_kv, T, D)`` (any strides) by cos/sin (float32, broadcastable to
    ``(B, 1, T, rot_dim // 2)``); the first ``rot_dim`` dimensions of each head rotate, the rest pass.

    Returns new tensors in the inputs' dtypes. q comes back contiguous ``(B, H_q, T, D)`` (what the torch path
    returns; attention folds query heads by a reshape that is then free); k as a transposed view of a contiguous
    ``(B, T, H_kv, D)`` (the layout the paged cache writes from without a copy). At T = 1 both are plain contiguous.
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    half = rot_dim // 2
    cos = cos.expand(b, 1, t, half)
    sin = sin.expand(b, 1, t, half)
    qo = torch.empty((b, hq, t, d), dtype=q.dtype, device=q.device)
    ko = torch.empty((b, t, hkv, d), dtype=k.dtype, device=k.device).transpose(1, 2)
    block_d = triton.next_power_of_2(d)
    block_h = min(triton.next_power_of_2(max(hq, hkv)), max(1, _ELEMENTS_PER_PROGRAM // block_d))
    grid = (b * t, triton.cdiv(hq, block_h) + triton.cdiv(hkv, block_h))
    _rotary_qk_kernel[grid](
        q, k, qo, ko, cos, sin, t,
        *q.stride(), *k.stride(), *qo.stride(), *ko.stride(),
        cos.stride(0), cos.stride(2), cos.stride(3), sin.stride(0), sin.stride(2), sin.stride(3),
        HQ=hq, HKV=hkv, HALF=half, ROT=rot_dim, D=d, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=4, enable_fp_fusion=False,  # no FMA contraction: the torch path's roundings, bit for bit
    )
    return qo, ko
