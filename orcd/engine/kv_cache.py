"""KV caches: the contiguous one (one slot per sequence, the whole context each) and the paged one the engine uses.

Both follow ``orcd.nn.batch.LayerCache``: ``update`` stores the batch's new keys and values and returns what
attention reads. FP16 on CUDA (half the memory), FP32 on CPU (CPU half matmuls are slow and the references compare
in float32).

``KVCache``: per layer ``(n_slots, n_kv_heads, n_ctx, head_dim)``; a token at position ``p`` of the sequence in
slot ``s`` lives at ``[s, :, p]``. Simple and exact; tests and references use it directly.

``PagedKVCache``: per layer one pool of ``n_blocks * block_size`` rows of ``(n_kv_heads, head_dim)``. A sequence
holds a list of blocks (its block table, kept by ``BlockManager``); position ``p`` lives at row
``table[p // block_size] * block_size + p % block_size``. Blocks are taken as sequences grow and shared between
sequences with a common prompt prefix. Attention reads each sequence's rows gathered into ``(B, H_kv, kv_length,
D)``: index arithmetic on device tensors only, so the decode step can be captured in a CUDA graph. A one-token
step may instead store and attend in one Triton kernel (``decode_attention``) that reads the blocks in place;
a prefill chunk stores, then attends in place through another (``prefill_attention``): no gathered window.
"""

from __future__ import annotations

import torch

from orcd.arch import ModelConfig
from orcd.engine.blocks import BlockManager
from orcd.errors import InvalidRequest
from orcd.nn.batch import ForwardBatch
from orcd.nn.triton_support import use_kernels

DEFAULT_BLOCK_SIZE = 16


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
                  dtype: torch.dtype | None = None) -> KVCache:
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


class PagedKVCache:
    """K and V pools of fixed-size blocks shared by all sequences, addressed through block tables.

    ``slots`` in a ``ForwardBatch`` are sequence ids of ``blocks`` (the ``BlockManager``); the batch's
    ``block_tables`` (device, ``(B, n)``) give their blocks, or are built here from the manager when absent.
    With ``scratch_block`` one more block is allocated that no sequence ever holds: padding rows of a
    fixed-shape (CUDA graph) batch write there.
    """

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        n_blocks: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        prefix_cache: bool = True,
        scratch_block: bool = False,
    ) -> None:
        device = torch.device(device)
        self.device = device
        self.dtype = dtype or default_cache_dtype(device)
        self.block_size = block_size
        self.blocks = BlockManager(n_blocks, block_size, prefix_cache)
        self.scratch_block = n_blocks if scratch_block else None
        rows = (n_blocks + int(scratch_block)) * block_size
        shape = (rows, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(n_layers)]

    @classmethod
    def for_model(cls, config: ModelConfig, n_tokens: int, device: torch.device | str, dtype: torch.dtype | None = None,
                  block_size: int = DEFAULT_BLOCK_SIZE, prefix_cache: bool = True,
                  scratch_block: bool = False) -> PagedKVCache:
        """A pool holding at least ``n_tokens`` positions (rounded up to whole blocks)."""
        n_blocks = -(-n_tokens // block_size)
        return cls(config.block_count, config.head_count_kv, config.head_dim, n_blocks, block_size, device, dtype,
                   prefix_cache, scratch_block)

    @property
    def n_blocks(self) -> int:
        return self.blocks.n_blocks

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def block_tables(self, seq_ids: list[int], n_blocks: int | None = None) -> torch.Tensor:
        """``(B, n_blocks)`` int64 block table of the sequences, on the device. Entries past a sequence's blocks
        are block 0: only positions after the sequence's last one map there, and the causal mask hides them."""
        tables = [self.blocks.table(s) for s in seq_ids]
        width = n_blocks if n_blocks is not None else max(len(t) for t in tables)
        rows = [t[:width] + [0] * (width - len(t)) for t in tables]
        return torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)

    # --- the LayerCache protocol ---------------------------------------------------------------------------------
    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _, read = self._rows(batch)
        b, h, _, d = k.shape
        kc, vc = self._write(layer, k, v, batch)
        length = batch.kv_length
        keys = kc.index_select(0, read).view(b, length, h, d).transpose(1, 2)
        values = vc.index_select(0, read).view(b, length, h, d).transpose(1, 2)
        return keys, values

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` ``(B, H_kv, T, D)`` at the batch's positions; returns the layer's pools."""
        write, _ = self._rows(batch)
        b, h, t, d = k.shape
        kc, vc = self.k[layer], self.v[layer]
        kc.index_copy_(0, write, k.transpose(1, 2).reshape(b * t, h, d).to(self.dtype))
        vc.index_copy_(0, write, v.transpose(1, 2).reshape(b * t, h, d).to(self.dtype))
        return kc, vc

    def decode_attention(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
        window: int | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The one-token decode step of a layer in one fused kernel (``orcd.nn.decode_attention``): store ``k``/``v``
        ``(B, H_kv, 1, D)`` like ``update`` and return ``attention``'s ``(B, H_q, 1, D)`` over the sequences'
        blocks, with the batch's mask (causal, ``window``) and ``sinks``. ``None`` where the kernel does not apply
        (more than one token per sequence, no Triton, not on CUDA, kernels off): the caller then takes
        ``update`` and ``attention``, which stay the oracle."""
        kc, vc = self.k[layer], self.v[layer]
        if q.shape[2] != 1 or not use_kernels(q, k, v, kc, batch.positions):
            return None
        # needs Triton: imported only when it runs
        from orcd.nn.decode_attention import decode_attention

        tables = self._tables(batch)
        return decode_attention(q, k, v, kc, vc, tables, batch.positions, self.block_size, batch.kv_length, scale,
                                window, sinks)

    def prefill_attention(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
        window: int | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """A prefill chunk (``T > 1`` tokens per sequence) of a layer: store ``k``/``v`` ``(B, H_kv, T, D)`` like
        ``update`` and return ``attention``'s ``(B, H_q, T, D)`` from a Triton kernel that reads the blocks in place
        (``orcd.nn.prefill_attention``): no gathered read window, no ``(T, S)`` scores. ``None`` where the kernel
        does not apply (one token, no Triton, not on CUDA, kernels off); the cache is then untouched and the caller
        takes ``update`` and ``attention``, which stay the oracle."""
        kc, vc = self.k[layer], self.v[layer]
        if q.shape[2] < 2 or not use_kernels(q, k, v, kc, batch.positions):
            return None
        # needs Triton: imported only when it runs
        from orcd.nn.prefill_attention import prefill_attention

        self._write(layer, k, v, batch)
        return prefill_attention(q, kc, vc, self._tables(batch), batch.positions, self.block_size, scale, window,
                                 sinks)

    def _tables(self, batch: ForwardBatch) -> torch.Tensor:
        """The batch's block tables (built from the manager when the batch has none), checked to cover the read."""
        tables = batch.block_tables
        if tables is None:
            key = ("paged_tables", id(self))
            if key not in batch.memo:
                assert batch.slots is not None
                batch.memo[key] = self.block_tables(list(batch.slots), -(-batch.kv_length // self.block_size))
            tables = batch.memo[key]
        if tables.shape[1] * self.block_size < batch.kv_length:
            raise InvalidRequest(f"the block tables cover {tables.shape[1] * self.block_size} positions but attention "
                                 f"reads {batch.kv_length}", field="block_tables")
        return tables

    def _rows(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool rows where the batch's new tokens go ``(B*T,)`` and rows attention reads ``(B*kv_length,)``, in
        sequence-major order; computed once per forward (every layer shares them)."""
        key = ("paged_rows", id(self))
        if key not in batch.memo:
            tables = self._tables(batch)
            bs = self.block_size
            pos = batch.positions
            write = torch.gather(tables, 1, pos // bs) * bs + pos % bs
            offsets = torch.arange(bs, device=tables.device)
            read = (tables.unsqueeze(-1) * bs + offsets).flatten(1)[:, : batch.kv_length]
            batch.memo[key] = (write.reshape(-1), read.reshape(-1))
        return batch.memo[key]
