"""Pieces shared by the block formats: reading fields out of raw blocks in torch, writing them in numpy.

Bit-exactness with ``gguf.quants`` depends on doing the same float32 operations in the same order; the helpers here
only move bits (integer unpacking and fp16 -> fp32 widening, both exact), so every rounding step stays visible in
the format's own ``dequantize``.
"""

from __future__ import annotations

import numpy as np
import torch

_SHIFT_CACHE: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}


def shifts(device: torch.device, *values: int) -> torch.Tensor:
    """A uint8 tensor of bit shifts on ``device`` (cached: small constants should not be re-uploaded per call)."""
    key = (device, values)
    t = _SHIFT_CACHE.get(key)
    if t is None:
        t = _SHIFT_CACHE[key] = torch.tensor(values, dtype=torch.uint8, device=device)
    return t


def f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte ``offset`` of every block, widened to float32, shape ``(n, 1)``."""
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).float()


def nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Low nibbles then high nibbles of ``qs`` ``(n, m)``: shape ``(n, 2, m)`` (ggml's usual 4-bit order)."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=1)


def low_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Split each byte of ``packed`` ``(n, m)`` into ``8 // bits`` fields, lowest first: shape ``(n, 8 // bits, m)``.

    This is ggml's layout for 2-bit quants (``qs`` of Q2_K/Q3_K), 1-bit high masks (Q3_K/Q5_K) and Q6_K's high
    bits: field ``k`` of byte ``j`` belongs to value ``k * m + j``.
    """
    per_byte = 8 // bits
    s = shifts(packed.device, *range(0, 8, bits)).reshape(1, per_byte, 1)
    return (packed.unsqueeze(1) >> s) & ((1 << bits) - 1)


def bits_le32(qh: torch.Tensor) -> torch.Tensor:
    """The 32 bits of a little-endian uint32 stored as 4 bytes ``(n, 4)``, bit ``i`` at column ``i``: ``(n, 32)``."""
    s = shifts(qh.device, *range(8)).reshape(1, 1, 8)
    return ((qh.unsqueeze(2) >> s) & 1).reshape(qh.shape[0], 32)


# --- numpy side: writing blocks -------------------------------------------------------------------------------------


def put_f16(out: np.ndarray, offset: int, values: np.ndarray) -> None:
    """Store ``values`` (one per block) as fp16 at byte ``offset`` of each block of ``out`` ``(n, type_size)``."""
    out[:, offset : offset + 2] = np.asarray(values, dtype=np.float16).reshape(-1, 1).view(np.uint8)


def random_bytes(rng: np.random.Generator, n_blocks: int, type_size: int) -> np.ndarray:
    """Uniform random block bytes ``(n_blocks, type_size)``; drawn as uint32 words, several times faster than
    drawing bytes one by one."""
    n = n_blocks * type_size
    words = rng.integers(0, 1 << 32, size=(n + 3) // 4, dtype=np.uint32)
    return words.view(np.uint8)[:n].reshape(n_blocks, type_size)


def block_scales(rng: np.random.Generator, n_blocks: int, scale: float, level_rms: float) -> np.ndarray:
    """Per-block scales so that values ``scale_i * level`` have an RMS near ``scale``, varied by +-25% between
    blocks so that tensors are not uniform."""
    return (scale / level_rms) * rng.uniform(0.75, 1.25, size=n_blocks).astype(np.float32)


def rms(levels: np.ndarray) -> float:
    """RMS of integer levels drawn uniformly: the magnitude of a random block in units of its scale."""
    return float(np.sqrt(np.mean(np.square(np.asarray(levels, dtype=np.float64)))))
