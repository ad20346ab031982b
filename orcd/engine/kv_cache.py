"""The KV cache: static per-layer K and V tensors, one slot per sequence, allocated once for the engine's context.

Layout per layer: ``(n_slots, n_kv_heads, n_ctx, head_dim)``; a token at position ``p`` of the sequence in slot
``s`` lives at ``[s, :, p]``. FP16 on CUDA (half the memory; attention upcasts), FP32 on CPU (CPU half matmuls
are slow and the references compare in float32).
"""

from __future__ import annotations

import torch

from orcd.arch import ModelConfig
from orcd.errors import InvalidRequest
from orcd.nn.batch import ForwardBatch


def default_cache_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_slots: int,
        n_kv_heads: int,
        head_dim: int,
        n_ctx: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        device = torch.device(device)
        self.n_slots, self.n_ctx, self.device = n_slots, n_ctx, device
        self.dtype = dtype or default_cache_dtype(device)
        shape = (n_slots, n_kv_heads, n_ctx, head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(n_layers)]
        self._free = list(range(n_slots))

    @classmethod
    def for_model(cls, config: ModelConfig, n_slots: int, n_ctx: int, device: torch.device | str,
                  dtype: torch.dtype | None = None) -> "KVCache":
        return cls(config.block_count, n_slots, config.head_count_kv, config.head_dim, n_ctx, device, dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    # --- slots ---------------------------------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV cache slot")  # the engine admits only while free_slots > 0
        return self._free.pop(0)

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.n_slots:
            raise RuntimeError(f"KV cache slot {slot} is not in use")
        self._free.append(slot)
        self._free.sort()

    # --- the LayerCache protocol ---------------------------------------------------------------------------------
    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.kv_length > self.n_ctx:
            raise InvalidRequest(f"position {batch.kv_length - 1} is outside the context of {self.n_ctx} tokens",
                                 field="n_ctx")
        kc, vc = self.k[layer], self.v[layer]
        slots, starts = batch.slots, batch.starts
        assert slots is not None and starts is not None
        b, t = batch.positions.shape
        if b == 1:
            # One sequence (a prefill chunk or a lone decode): its positions are contiguous from starts[0], so
            # plain slices do it (no index tensors, no copies on read).
            s, start = slots[0], starts[0]
            kc[s, :, start : start + t] = k[0].to(self.dtype)
            vc[s, :, start : start + t] = v[0].to(self.dtype)
            return kc[s : s + 1, :, : batch.kv_length], vc[s : s + 1, :, : batch.kv_length]
        index = torch.tensor(slots, device=self.device)
        # Advanced indices on dims 0 and 2 put (B, T) first: the values go in as (B, T, H_kv, D).
        kc[index[:, None], :, batch.positions] = k.transpose(1, 2).to(self.dtype)
        vc[index[:, None], :, batch.positions] = v.transpose(1, 2).to(self.dtype)
        if slots == list(range(slots[0], slots[0] + b)):
            window = slice(slots[0], slots[0] + b)
            return kc[window, :, : batch.kv_length], vc[window, :, : batch.kv_length]
        return kc[:, :, : batch.kv_length].index_select(0, index), vc[:, :, : batch.kv_length].index_select(0, index)
