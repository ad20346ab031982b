"""The legacy block formats: 32 values per block, one fp16 scale (and for ``_1`` types an fp16 offset).

Layouts (bytes): Q4_0 ``d | qs[16]``, Q4_1 ``d | m | qs[16]``, Q5_0 ``d | qh[4] | qs[16]``, Q5_1
``d | m | qh[4] | qs[16]``, Q8_0 ``d | qs[32] (int8)``. A 4-bit ``qs`` byte ``j`` holds value ``j`` in its low
nibble and value ``j + 16`` in its high nibble; ``qh`` is a little-endian uint32 whose bit ``i`` is bit 4 of value
``i``. gguf computes ``d * q`` (``_0``) and ``(d * q) + m`` (``_1``) in float32. The product of an fp16 scale
(11 significant bits) and a level of at most 8 bits is exact in float32, so the only rounding is the final addition:
any order of the same float32 operations (or a fused multiply-add) gives the same bits, but computing in fp16/bf16
would not -- the rule for future fused kernels too. Offsets are applied to the integer levels, and the float work
is done in place on the output, so a call allocates one float32 tensor (what bounds the reference path's tiles).
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from orcd.quant import QuantFormat
from orcd_quant_formats.blocks import bits_le32, block_scales, f16, nibbles, put_f16, random_bytes, rms
from orcd_quant_formats.kernels import FusedLinear

T = gguf.GGMLQuantizationType


class _GgufQuantizer(QuantFormat):
    """Legacy types quantize with gguf's numpy code (a port of ggml's reference quantizers)."""

    def quantize(self, values: np.ndarray) -> np.ndarray:
        return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), T(self.ggml_type))


def _four_bit(qs: torch.Tensor) -> torch.Tensor:
    return nibbles(qs).reshape(qs.shape[0], 32)


def _five_bit(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    return _four_bit(qs) | (bits_le32(qh) << 4)


class Q4_0(FusedLinear, _GgufQuantizer):
    ggml_type, block_size, type_size = T.Q4_0, 32, 18

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        q = _four_bit(blocks[:, 2:]).to(torch.int8) - 8
        return q.float().mul_(f16(blocks, 0))

    def random_blocks(self, n_blocks: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
        out = random_bytes(rng, n_blocks, self.type_size)
        put_f16(out, 0, block_scales(rng, n_blocks, scale, rms(np.arange(-8, 8))))
        return out


class Q4_1(FusedLinear, _GgufQuantizer):
    ggml_type, block_size, type_size = T.Q4_1, 32, 20

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        q = _four_bit(blocks[:, 4:]).float()
        return q.mul_(f16(blocks, 0)).add_(f16(blocks, 2))

    def random_blocks(self, n_blocks: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
        out = random_bytes(rng, n_blocks, self.type_size)
        d = block_scales(rng, n_blocks, scale, rms(np.arange(16) - 7.5))
        put_f16(out, 0, d)
        put_f16(out, 2, -7.5 * d)  # centre the levels on zero, as quantized weights are
        return out


class Q5_0(FusedLinear, _GgufQuantizer):
    ggml_type, block_size, type_size = T.Q5_0, 32, 22

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        q = _five_bit(blocks[:, 2:6], blocks[:, 6:]).to(torch.int8) - 16
        return q.float().mul_(f16(blocks, 0))

    def random_blocks(self, n_blocks: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
        out = random_bytes(rng, n_blocks, self.type_size)
        put_f16(out, 0, block_scales(rng, n_blocks, scale, rms(np.arange(-16, 16))))
        return out


class Q5_1(FusedLinear, _GgufQuantizer):
    ggml_type, block_size, type_size = T.Q5_1, 32, 24

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        q = _five_bit(blocks[:, 4:8], blocks[:, 8:]).float()
        return q.mul_(f16(blocks, 0)).add_(f16(blocks, 2))

    def random_blocks(self, n_blocks: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
        out = random_bytes(rng, n_blocks, self.type_size)
        d = block_scales(rng, n_blocks, scale, rms(np.arange(32) - 15.5))
        put_f16(out, 0, d)
        put_f16(out, 2, -15.5 * d)
        return out


class Q8_0(FusedLinear, _GgufQuantizer):
    ggml_type, block_size, type_size = T.Q8_0, 32, 34

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks[:, 2:].view(torch.int8).float().mul_(f16(blocks, 0))

    def random_blocks(self, n_blocks: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
        out = random_bytes(rng, n_blocks, self.type_size)
        put_f16(out, 0, block_scales(rng, n_blocks, scale, rms(np.arange(-128, 128))))
        return out


LEGACY_FORMATS = (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)
