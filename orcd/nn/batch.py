"""What one forward pass of a ``CausalLM`` works on: the calling convention between the engine and the models.

A forward takes a ``ForwardBatch``: ``B`` sequences of ``T`` new tokens each, with each token's position in its own
sequence. With a KV cache, each sequence has a cache slot; the new keys and values are stored at the sequence's
positions and attention reads positions ``0 .. kv_length - 1`` of every sequence, so sequences of different
lengths decode in one batched forward and the causal mask (key position <= query position) hides what a shorter
sequence has not written. Without a cache (tests, scoring) the tokens attend to each other only.

Where a position lives is the cache's business (``LayerCache.update``): a contiguous cache indexes
``[slot, :, position]``; a paged cache (``orcd.engine.kv_cache.PagedKVCache``) looks the position up in the
sequence's block table, passed as ``block_tables``. Models never see the difference: they hand ``k``/``v`` to
``batch.cache.update`` and attend over what it returns with ``batch.mask(window)``.

A forward whose shapes and host-side numbers (``kv_length``, ``starts``) are given up front, with its tokens,
positions and block tables in device tensors, makes no host synchronisation: it can be captured in a CUDA graph
and replayed with new values written into the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class LayerCache(Protocol):
    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` ``(B, H_kv, T, D)`` of layer ``layer`` at the batch's slots and positions; return the
        keys and values attention reads, ``(B, H_kv, batch.kv_length, D)``."""
        ...


@dataclass
class ForwardBatch:
    tokens: torch.Tensor  # (B, T) int64
    positions: torch.Tensor  # (B, T) int64, each token's position in its sequence
    cache: LayerCache | None = None
    slots: list[int] | None = None  # the cache slot (paged: sequence id) of each sequence (required with a cache)
    kv_length: int = 0  # positions of each slot attention reads: max position + 1 (set by __post_init__)
    starts: list[int] | None = None  # host copy of each sequence's first position (contiguous cache; set if absent)
    block_tables: torch.Tensor | None = None  # (B, n_blocks) int64 on the device: a paged cache's blocks
    memo: dict[Any, Any] = field(default_factory=dict)  # per-forward values shared by layers (masks, cos/sin)

    def __post_init__(self) -> None:
        if self.tokens.shape != self.positions.shape or self.tokens.dim() != 2:
            raise ValueError(f"tokens {tuple(self.tokens.shape)} and positions {tuple(self.positions.shape)} "
                             "must both be (batch, tokens)")
        if self.cache is not None:
            if self.slots is None or len(self.slots) != self.tokens.shape[0]:
                raise ValueError("a forward with a KV cache needs one slot per sequence")
            # Host-side numbers, so that layers never wait on the device to learn them.
            if self.starts is None and self.block_tables is None:
                self.starts = self.positions[:, 0].tolist()
            if not self.kv_length:
                self.kv_length = int(self.positions.max()) + 1

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def key_positions(self) -> torch.Tensor:
        """Positions of the keys attention sees: the cache's ``0 .. kv_length - 1``, or the batch's own."""
        if self.cache is None:
            return self.positions
        return torch.arange(self.kv_length, device=self.device)

    def aligned_causal(self, window: int | None = None) -> bool:
        """True when the mask is plain causal over aligned positions: one sequence whose queries are keys
        ``0 .. T - 1`` of its cache (a prompt's first chunk), and no window cuts in. Fused kernels then need no
        mask tensor. Decided from host-side numbers only (False when they are not known)."""
        b, t = self.tokens.shape
        if self.cache is None or (window is not None and window < t):
            return False
        return b == 1 and self.starts == [0] and self.kv_length == t

    def mask(self, window: int | None = None) -> torch.Tensor:
        """Boolean ``(B, 1, T, S)``, True where a query may attend to a key: causal, and within ``window``
        positions (query - key < window) when a sliding window is given. Computed once per forward and window."""
        key = ("mask", window)
        if key not in self.memo:
            self.memo[key] = attention_mask(self.positions, self.key_positions(), window)
        return self.memo[key]


def attention_mask(q_positions: torch.Tensor, k_positions: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """``q_positions`` ``(B, T)``, ``k_positions`` ``(B, S)`` or ``(S,)`` → boolean ``(B, 1, T, S)``."""
    q = q_positions.unsqueeze(-1)  # (B, T, 1)
    k = k_positions.unsqueeze(-2) if k_positions.dim() == 2 else k_positions.view(1, 1, -1)
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    return allowed.unsqueeze(1)
