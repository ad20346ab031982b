"""Grouped-query self-attention: the projections, rotary, the KV cache hand-off and the attention itself.

``attention`` is the one function every architecture calls. It takes the mask from the batch (causal, optionally
a sliding window per layer) and optional per-head "sink" logits: an extra score per head that joins every
softmax's denominator and attends to nothing (GPT-OSS), so a head can put weight nowhere.

Three paths, one result: on CUDA with a half-precision KV cache and no sinks, PyTorch's fused SDPA kernels run in
FP16 (FlashAttention for a prompt's first chunk, where the mask is plain causal; the memory-efficient kernel with
the mask otherwise); elsewhere SDPA in float32 (the CPU reference); with sinks an explicit float32 softmax.

A decode step (one token per sequence) with a paged cache skips all of that where Triton kernels run: the cache's
``decode_attention`` stores the new keys and values and attends over the block tables in one kernel
(``orcd.nn.decode_attention``); ``update`` + ``attention`` stay its fallback and oracle.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from orcd.nn.batch import ForwardBatch
from orcd.nn.rotary import RotaryEmbedding
from orcd.quant import QuantizedLinear


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    sinks: torch.Tensor | None = None,
    aligned_causal: bool = False,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` with ``H_q / H_kv`` query heads per key/value head.

    q ``(B, H_q, T, D)``; k, v ``(B, H_kv, S, D)``; mask boolean, broadcastable to ``(B, 1, T, S)``;
    sinks ``(H_q,)`` logits or None; ``aligned_causal``: the caller knows the mask is plain causal with query
    ``i`` at key ``i`` (``ForwardBatch.aligned_causal``). Returns ``(B, H_q, T, D)`` in q's dtype; scores are
    float32 except on the fused FP16 path (FP32 accumulation inside the kernel).
    """
    b, h_q, t, d = q.shape
    h_kv, s = k.shape[1], k.shape[2]
    if h_q % h_kv:
        raise ValueError(f"{h_q} query heads cannot share {h_kv} key/value heads")
    group = h_q // h_kv
    if sinks is None and q.is_cuda and k.dtype in (torch.float16, torch.bfloat16):
        return _fused_half(q, k, v, mask, scale, group, aligned_causal).to(q.dtype)
    if sinks is None:
        out = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=mask, scale=scale, enable_gqa=group > 1
        )
        return out.to(q.dtype)
    # Explicit path: query heads grouped under their key/value head, so k and v are never repeated.
    qg = q.float().reshape(b, h_kv, group * t, d)
    scores = (qg @ k.float().transpose(-1, -2)).reshape(b, h_kv, group, t, s) * scale
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    sink = sinks.float().reshape(1, h_kv, group, 1, 1).expand(b, h_kv, group, t, 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :s]
    out = probs.reshape(b, h_kv, group * t, s) @ v.float()
    return out.reshape(b, h_q, t, d).to(q.dtype)


def _fused_half(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, group: int,
                aligned_causal: bool) -> torch.Tensor:
    """SDPA in the cache's half precision. Plain causal: ``is_causal`` (FlashAttention, query heads sharing K/V
    through ``enable_gqa``). Otherwise the ``group`` query heads of each K/V head are folded into the query rows
    (``(B, H_kv, group * T, D)``, row ``g * T + i`` is query ``i`` of head ``g``), so no backend needs K/V repeated
    and one masked kernel call does the whole batch (the decode step: ``group`` rows per K/V head)."""
    b, h_q, t, d = q.shape
    h_kv, s = k.shape[1], k.shape[2]
    qh = q.to(k.dtype)
    if aligned_causal:
        return F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=group > 1)
    folded = qh.reshape(b, h_kv, group * t, d)
    m = mask.expand(b, 1, t, s)
    if group > 1:
        m = m.repeat(1, 1, group, 1)
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=m, scale=scale)
    return out.reshape(b, h_q, t, d)


class SeparateQKV(torch.nn.Module):
    """Three projections (optionally with biases, as Qwen2 has)."""

    def __init__(self, q: QuantizedLinear, k: QuantizedLinear, v: QuantizedLinear) -> None:
        super().__init__()
        self.q, self.k, self.v = q, k, v

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q(x), self.k(x), self.v(x)


class FusedQKV(torch.nn.Module):
    """One projection whose output rows are Q, then K, then V (Phi-3's ``attn_qkv``)."""

    def __init__(self, qkv: QuantizedLinear, q_size: int, kv_size: int) -> None:
        super().__init__()
        if qkv.out_features != q_size + 2 * kv_size:
            raise ValueError(
                f"tensor {qkv.weight.name!r}: {qkv.out_features} output rows, expected {q_size} + 2 x {kv_size}"
            )
        self.qkv = qkv
        self.sizes = (q_size, kv_size, kv_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).split(self.sizes, dim=-1)
        return q, k, v


class SelfAttention(torch.nn.Module):
    """Projections → rotary on q and k → KV cache → ``attention`` → output projection."""

    def __init__(
        self,
        layer: int,
        qkv: SeparateQKV | FusedQKV,
        output: QuantizedLinear,
        rotary: RotaryEmbedding,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        sliding_window: int | None = None,
        sinks: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.qkv = qkv
        self.output = output
        self.rotary = rotary
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.sliding_window = sliding_window
        self.sinks = None if sinks is None else torch.nn.Parameter(sinks.float(), requires_grad=False)
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        memo_key = ("rope", id(self.rotary))
        if memo_key not in batch.memo:
            batch.memo[memo_key] = self.rotary.cos_sin(batch.positions)
        cos, sin = batch.memo[memo_key]
        q, k = self.rotary.apply_qk(q, k, cos, sin)
        window = self.sliding_window
        out = self._fused_decode(q, k, v, batch)
        prefill = getattr(batch.cache, "prefill_attention", None)
        # A chunk with sinks over a paged cache, read in place: the explicit path would hold (T, S) fp32 scores per
        # head (17 GB for a 512-token chunk at position 131k of GPT-OSS). Without sinks, PyTorch's fused SDPA keeps
        # serving until the kernel has been timed against it on a GPU.
        if out is None and t > 1 and prefill is not None and self.sinks is not None:
            out = prefill(self.layer, q, k, v, batch, self.scale, window, self.sinks)
        if out is None:
            if batch.cache is not None:
                k, v = batch.cache.update(self.layer, k, v, batch)
            out = attention(q, k, v, batch.mask(window), self.scale, self.sinks, batch.aligned_causal(window))
        return self.output(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def _fused_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      batch: ForwardBatch) -> torch.Tensor | None:
        """A decode step (one token per sequence) through the cache's fused store-and-attend kernel, where the cache
        has one (``PagedKVCache.decode_attention``) and it applies; ``None`` otherwise."""
        fused = getattr(batch.cache, "decode_attention", None)
        if fused is None or q.shape[2] != 1:
            return None
        return fused(self.layer, q, k, v, batch, self.scale, self.sliding_window, self.sinks)

    def extra_repr(self) -> str:
        return (f"layer={self.layer}, heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"window={self.sliding_window}, sinks={self.sinks is not None}")
