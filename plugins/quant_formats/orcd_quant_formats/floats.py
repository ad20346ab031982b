"""Unquantized storage types: F32, F16, BF16 (block size 1)."""

import gguf
import numpy as np
import torch

from orcd.quant import QuantFormat
from orcd_quant_formats.blocks import random_bytes


def _random_floats(
    rng: np.random.Generator, n: int, scale: float, word: type, mantissa_bits: int, bias: int
) -> np.ndarray:
    """``n`` random IEEE floats built from bits (far faster than converting normals): random sign and mantissa,
    exponent chosen so magnitudes lie in ``[scale / 2, 2 * scale)``. ``word`` is the unsigned type of the format."""
    bits = random_bytes(rng, n, np.dtype(word).itemsize).view(word).reshape(n)
    top = int(np.floor(np.log2(scale))) + bias - 1  # biased exponent of the lower binade
    top = min(max(top, 1), 2 * bias - 1)  # stay normal and finite
    sign_mantissa = word((1 << (np.dtype(word).itemsize * 8 - 1)) | ((1 << mantissa_bits) - 1))
    exponent = (word(top) + ((bits >> word(mantissa_bits)) & word(1))) << word(mantissa_bits)
    return (bits & sign_mantissa) | exponent


class F32(QuantFormat):
    ggml_type, block_size, type_size = gguf.GGMLQuantizationType.F32, 1, 4

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.float32).reshape(-1, 1)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(values, dtype=np.float32).view(np.uint8)

    def random_blocks(self, n_blocks: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
        return _random_floats(rng, n_blocks, scale, np.uint32, 23, 127).view(np.uint8).reshape(n_blocks, 4)


class F16(QuantFormat):
    ggml_type, block_size, type_size = gguf.GGMLQuantizationType.F16, 1, 2

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.float16).float().reshape(-1, 1)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(values, dtype=np.float32).astype(np.float16).view(np.uint8)

    def random_blocks(self, n_blocks: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
        return _random_floats(rng, n_blocks, scale, np.uint16, 10, 15).view(np.uint8).reshape(n_blocks, 2)


class BF16(QuantFormat):
    ggml_type, block_size, type_size = gguf.GGMLQuantizationType.BF16, 1, 2

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.bfloat16).float().reshape(-1, 1)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), gguf.GGMLQuantizationType.BF16)

    def random_blocks(self, n_blocks: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
        return _random_floats(rng, n_blocks, scale, np.uint16, 7, 127).view(np.uint8).reshape(n_blocks, 2)
