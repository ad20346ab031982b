"""What one forward pass of a ``CausalLM`` works on: the calling convention between the engine and the models.

A forward takes a ``ForwardBatch``: ``B`` sequences of ``T`` new tokens each, with each token's position in its own
sequence. With a KV cache, each sequence owns a cache slot; the new keys and values are written at
``[slot, :, position]`` and attention reads positions ``0 .. kv_length - 1`` of every slot, so sequences of
different lengths decode in one batched forward and the causal mask (key position <= query position) hides what
a shorter sequence has not written. Without a cache (tests, scoring) the tokens attend to each other only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class LayerCache(Protocol):
    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: "ForwardBatch"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` ``(B, H_kv, T, D)`` of layer ``layer`` at the batch's slots and positions; return the
        keys and values attention reads, ``(B, H_kv, batch.kv_length, D)``."""
        ...


@dataclass
class ForwardBatch:
    tokens: torch.Tensor  # (B, T) int64
    positions: torch.Tensor  # (B, T) int64, each token's position in its sequence
    cache: LayerCache | None = None
    slots: list[int] | None = None  # the cache slot of each sequence (required with a cache)
    kv_length: int = 0  # positions of each slot attention reads: max position + 1 (set by __post_init__)
    starts: list[int] | None = None  # host copy of each sequence's first position (set by __post_init__)
    memo: dict[Any, Any] = field(default_factory=dict)  # per-forward values shared by layers (masks, cos/sin)

    def __post_init__(self) -> None:
        if self.tokens.shape != self.positions.shape or self.tokens.dim() != 2:
            raise ValueError(f"tokens {tuple(self.tokens.shape)} and positions {tuple(self.positions.shape)} "
                             "must both be (batch, tokens)")
        if self.cache is not None:
            if self.slots is None or len(self.slots) != self.tokens.shape[0]:
                raise ValueError("a forward with a KV cache needs one slot per sequence")
            # Host-side numbers, so that layers never wait on the device to learn them.
            if self.starts is None:
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
